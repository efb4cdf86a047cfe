"""Connecting, rotating and disconnecting a repository (validated, sealed, audited) and purging delivery records."""

from __future__ import annotations

import uuid
from datetime import timedelta
from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.utils import timezone

from runs.models import AuditEvent, Project, WebhookDelivery
from runs.projects.services import project_create
from runs.webhooks.secrets import webhook_secret_open
from runs.webhooks.services import (
    project_github_connect,
    project_github_disconnect,
    project_github_rotate,
    project_webhook_secrets,
    webhook_deliveries_purge,
)
from tests.runs.webhooks import payloads
from tests.runs.webhooks.conftest import REPOSITORY, Hook, deliver

pytestmark = pytest.mark.django_db


@pytest.fixture
def project(cast) -> Project:
    return project_create(org=cast.org_a, actor=cast.admin_a.user, name="Widgets")


def _audit(event: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(event=event).order_by("created_at"))


@pytest.mark.parametrize(
    "repository",
    ["octo-org/widgets", "o/n", "Octocat/Hello-World", "octo/widgets.js", "octo/.github", "user_emu/repo_1", "a/_"],
)
def test_connect_accepts_githubs_repository_names(project, cast, repository):
    project_github_connect(project=project, actor=cast.admin_a.user, repository=f"  {repository} ")
    project.refresh_from_db()
    assert project.github_repository == repository
    assert project.github_connected


@pytest.mark.parametrize(
    "repository",
    [
        "",
        "octo-org",
        "octo-org/",
        "/widgets",
        "-octo/widgets",
        "octo/wid gets",
        "octo/..",
        "octo/.",
        "octo/widgets.git",
        "octo/widgets/extra",
        "https://github.com/octo/widgets",
        "o" * 40 + "/widgets",
        "octo/" + "w" * 101,
        "octo/widg\u00e9ts",
        "octo/wid\ngets",
    ],
)
def test_connect_refuses_invalid_repository_names(project, cast, repository):
    with pytest.raises(ValidationError) as caught:
        project_github_connect(project=project, actor=cast.admin_a.user, repository=repository)
    assert "repository" in caught.value.message_dict
    project.refresh_from_db()
    assert not project.github_connected
    assert project.github_secret_sealed == ""
    assert not _audit(AuditEvent.GITHUB_CONNECTED)


@pytest.mark.parametrize("label", ["", "   ", "x" * 51, "bad\nlabel"])
def test_connect_refuses_invalid_labels(project, cast, label):
    with pytest.raises(ValidationError) as caught:
        project_github_connect(project=project, actor=cast.admin_a.user, repository=REPOSITORY, label=label)
    assert "label" in caught.value.message_dict


def test_connect_seals_a_new_secret_returns_it_once_and_is_audited(project, cast):
    secret = project_github_connect(project=project, actor=cast.admin_a.user, repository=REPOSITORY, label="ai please")
    stored = Project.objects.get(pk=project.pk)
    assert stored.github_label == "ai please"
    assert stored.github_repository == REPOSITORY
    assert stored.github_secret_sealed.startswith("cf1.")
    assert secret not in stored.github_secret_sealed
    assert stored.github_previous_secret_sealed == ""
    opened = webhook_secret_open(org_id=stored.org_id, project_id=stored.id, sealed=stored.github_secret_sealed)
    assert opened.reveal() == secret
    assert project.github_secret_sealed == stored.github_secret_sealed  # the caller's instance is up to date
    [event] = _audit(AuditEvent.GITHUB_CONNECTED)
    assert event.actor_user_id == cast.admin_a.user.id
    assert event.org_id == cast.org_a.id
    assert event.target_id == str(project.id)
    assert event.metadata == {"repository": REPOSITORY, "label": "ai please", "replaced": False}
    assert secret not in str(event.metadata)


def test_connecting_again_replaces_both_secrets(project, cast):
    first = project_github_connect(project=project, actor=cast.admin_a.user, repository=REPOSITORY)
    project_github_rotate(project=project, actor=cast.admin_a.user)
    third = project_github_connect(project=project, actor=cast.admin_a.user, repository="octo-org/gadgets")
    assert [s.reveal() for s in project_webhook_secrets(project=project)] == [third]
    assert first != third
    assert _audit(AuditEvent.GITHUB_CONNECTED)[-1].metadata["replaced"] is True


def test_rotate_keeps_one_previous_secret_and_is_audited(project, cast):
    first = project_github_connect(project=project, actor=cast.admin_a.user, repository=REPOSITORY)
    second = project_github_rotate(project=project, actor=cast.admin_a.user)
    assert [s.reveal() for s in project_webhook_secrets(project=project)] == [second, first]
    assert project.github_secret_rotated_at is not None
    third = project_github_rotate(project=project, actor=cast.admin_a.user)
    project.refresh_from_db()
    assert [s.reveal() for s in project_webhook_secrets(project=project)] == [third, second]
    events = _audit(AuditEvent.GITHUB_SECRET_ROTATED)
    assert len(events) == 2
    assert events[0].metadata == {"repository": REPOSITORY}
    assert all(s not in str(e.metadata) for e in events for s in (first, second, third))


def test_rotate_needs_a_connected_repository(project, cast):
    with pytest.raises(ValidationError) as caught:
        project_github_rotate(project=project, actor=cast.admin_a.user)
    assert caught.value.code == "not_connected"
    assert not _audit(AuditEvent.GITHUB_SECRET_ROTATED)


def test_disconnect_wipes_both_secrets_and_the_repository_once(project, cast):
    project_github_connect(project=project, actor=cast.admin_a.user, repository=REPOSITORY)
    project_github_rotate(project=project, actor=cast.admin_a.user)
    project_github_disconnect(project=project, actor=cast.admin_a.user)
    stored = Project.objects.get(pk=project.pk)
    assert (stored.github_repository, stored.github_secret_sealed, stored.github_previous_secret_sealed) == ("", "", "")
    assert stored.github_secret_rotated_at is None
    assert not stored.github_connected
    assert project_webhook_secrets(project=stored) == []
    project_github_disconnect(project=project, actor=cast.admin_a.user)  # idempotent
    [event] = _audit(AuditEvent.GITHUB_DISCONNECTED)
    assert event.metadata == {"repository": REPOSITORY}
    assert event.actor_user_id == cast.admin_a.user.id


def test_a_sealed_secret_copied_to_another_project_does_not_verify_there(hook: Hook, cast):
    """Copying the ciphertext (a database write by an attacker or a bad migration) moves no authority: the AAD names
    the project and org it was sealed for."""
    victims = [
        project_create(org=cast.org_a, actor=cast.admin_a.user, name="Same org"),
        project_create(org=cast.org_b, actor=cast.admin_b.user, name="Other org"),
    ]
    for victim in victims:
        Project.objects.filter(pk=victim.pk).update(
            github_repository=REPOSITORY, github_secret_sealed=hook.project.github_secret_sealed
        )
        victim.refresh_from_db()
        assert victim.github_connected
        assert project_webhook_secrets(project=victim) == []
        body = payloads.encode(payloads.issues_labeled(REPOSITORY))
        response = deliver(hook.client, victim.id, body, secret=hook.secret)
        assert response.status_code == 401
    assert not WebhookDelivery.objects.exists()


# --- Retention ----------------------------------------------------------------------------------------------


def _delivery(project: Project, *, days_ago: float) -> WebhookDelivery:
    return WebhookDelivery.objects.create(
        project=project,
        delivery_id=str(uuid.uuid4()),
        event="ping",
        body_sha256="0" * 64,
        outcome="pong",
        received_at=timezone.now() - timedelta(days=days_ago),
    )


def test_purge_deletes_only_deliveries_older_than_the_retention(project):
    old = _delivery(project, days_ago=31)
    recent = _delivery(project, days_ago=29)
    assert webhook_deliveries_purge(older_than_days=30) == 1
    assert list(WebhookDelivery.objects.values_list("id", flat=True)) == [recent.id]
    assert not WebhookDelivery.objects.filter(id=old.id).exists()
    assert webhook_deliveries_purge(older_than_days=30) == 0


def test_purge_refuses_to_forget_ids_github_can_still_redeliver(project):
    _delivery(project, days_ago=2.5)
    with pytest.raises(ValueError, match="at least 3"):
        webhook_deliveries_purge(older_than_days=2)
    assert WebhookDelivery.objects.count() == 1


def test_purge_command_uses_the_retention_setting_by_default(project, settings):
    settings.WEBHOOK_DELIVERY_RETENTION_DAYS = 10
    _delivery(project, days_ago=11)
    kept = _delivery(project, days_ago=9)
    out = StringIO()
    call_command("purge_webhook_deliveries", stdout=out)
    assert "Deleted 1 webhook delivery records older than 10 days." in out.getvalue()
    assert list(WebhookDelivery.objects.values_list("id", flat=True)) == [kept.id]


def test_purge_command_takes_days(project):
    _delivery(project, days_ago=40)
    _delivery(project, days_ago=6)
    out = StringIO()
    call_command("purge_webhook_deliveries", "--days", "5", stdout=out)
    assert WebhookDelivery.objects.count() == 0
    with pytest.raises(SystemExit):
        call_command("purge_webhook_deliveries", "--days", "1", stdout=out, stderr=StringIO())
