"""``POST /hooks/github/<project>/``: GitHub-shaped deliveries, signatures computed here, runs left queued."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.cache import cache
from django.test import AsyncClient, Client

from runs.models import AuditEvent, Run, RunKind, RunStatus, WebhookDelivery
from runs.projects.services import project_create
from runs.webhooks.services import (
    project_github_connect,
    project_github_disconnect,
    project_github_rotate,
    signature_failure_counts,
)
from tests.runs.test_execution_support import sim_key
from tests.runs.webhooks import payloads
from tests.runs.webhooks.conftest import REPOSITORY, Hook, connected_project, deliver, hook_url, sign

pytestmark = pytest.mark.django_db

LABEL = f"GitHub webhook ({REPOSITORY})"
UNVERIFIED = {
    "error": {
        "code": "unauthenticated",
        "message": "The delivery's signature could not be verified.",
        "details": {},
    }
}


def _nothing_recorded() -> None:
    assert Run.objects.count() == 0
    assert WebhookDelivery.objects.count() == 0


# --- Events that start a run ---------------------------------------------------------------------------------


def test_labeled_issue_starts_an_agent_run_on_the_project(hook: Hook):
    payload = payloads.issues_labeled(REPOSITORY, title="Add a CSV export", body="For every project, please.")
    response = hook.deliver(payload, event="issues", delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958")

    assert response.status_code == 202
    run = Run.objects.get()
    assert response.json() == {"status": "run_started", "run_id": str(run.id)}
    assert run.kind == RunKind.AGENT
    assert run.project_id == hook.project.id
    assert run.org_id == hook.project.org_id
    assert run.provider_key_id == hook.key.id
    assert run.model == "fake/echo"
    assert run.objective == "Add a CSV export\n\nFor every project, please."
    assert run.created_by_label == LABEL
    assert run.created_by_user is None
    assert run.created_by_api_key is None
    assert run.status == RunStatus.QUEUED
    assert run.watch is False
    delivery = WebhookDelivery.objects.get()
    assert (delivery.delivery_id, delivery.event, delivery.action) == (
        "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "issues",
        "labeled",
    )
    assert (delivery.outcome, delivery.run_id, delivery.reason) == ("run_started", run.id, "")
    started = AuditEvent.objects.get(event=AuditEvent.WEBHOOK_RUN_STARTED)
    assert started.actor_label == LABEL
    assert started.org_id == hook.project.org_id
    assert started.target_id == str(run.id)
    assert started.metadata["delivery_id"] == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert started.metadata["repository"] == REPOSITORY


def test_labeled_issue_without_a_body_uses_its_title(hook: Hook):
    response = hook.deliver(payloads.issues_labeled(REPOSITORY, title="Bump the linter", body=None))
    assert response.status_code == 202
    assert Run.objects.get().objective == "Bump the linter"


def test_label_match_ignores_case(hook: Hook):
    response = hook.deliver(payloads.issues_labeled(REPOSITORY, label="CesaFlow"))
    assert response.json()["status"] == "run_started"


@pytest.mark.parametrize("association", ["OWNER", "MEMBER", "COLLABORATOR"])
def test_comment_command_from_a_collaborator_starts_a_run(hook: Hook, association):
    payload = payloads.issue_comment_created(
        REPOSITORY, body="/cesaflow Fix the flaky test in tests/test_io.py", association=association
    )
    response = hook.deliver(payload, event="issue_comment")
    assert response.status_code == 202
    run = Run.objects.get()
    assert response.json() == {"status": "run_started", "run_id": str(run.id)}
    assert run.objective == "Fix the flaky test in tests/test_io.py"
    assert run.created_by_label == LABEL
    assert WebhookDelivery.objects.get().action == "created"


def test_repository_match_ignores_case(hook: Hook):
    response = hook.deliver(payloads.issues_labeled("Octo-Org/Widgets"))
    assert response.json()["status"] == "run_started"


def test_async_client_delivery_is_handled_the_same(hook: Hook):
    """The view is async: under an ASGI request too (AsyncClient), a signed delivery is verified and answered."""
    body = payloads.encode(payloads.ping(REPOSITORY))

    async def post() -> Any:
        return await AsyncClient().post(
            hook_url(hook.project.id),
            data=body,
            content_type="application/json",
            headers={
                "X-Hub-Signature-256": sign(hook.secret, body),
                "X-GitHub-Event": "ping",
                "X-GitHub-Delivery": str(uuid.uuid4()),
            },
        )

    response = async_to_sync(post)()
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "pong"}


# --- Events that do not -------------------------------------------------------------------------------------


def test_ping_answers_pong_and_is_recorded(hook: Hook):
    response = hook.deliver(payloads.ping(REPOSITORY), event="ping")
    assert response.status_code == 200
    assert response.json() == {"status": "pong"}
    delivery = WebhookDelivery.objects.get()
    assert (delivery.event, delivery.action, delivery.outcome) == ("ping", "", "pong")
    assert Run.objects.count() == 0


@pytest.mark.parametrize(
    ("event", "payload"),
    [
        ("push", {"ref": "refs/heads/main", "repository": payloads.repository(REPOSITORY)}),
        ("issues", {**payloads.issues_labeled(REPOSITORY), "action": "opened"}),
        ("issues", payloads.issues_labeled(REPOSITORY, label="bug")),
        ("issue_comment", {**payloads.issue_comment_created(REPOSITORY), "action": "edited"}),
        ("issue_comment", payloads.issue_comment_created(REPOSITORY, body="LGTM, thanks!")),
        ("issue_comment", payloads.issue_comment_created(REPOSITORY, body="/cesaflow")),
        ("issue_comment", payloads.issue_comment_created(REPOSITORY, body="/cesaflow    ")),
    ],
)
def test_other_events_and_actions_are_ignored(hook: Hook, event, payload):
    response = hook.deliver(payload, event=event)
    assert response.status_code == 202
    assert response.json()["status"] == "ignored"
    assert response.json()["reason"]
    assert Run.objects.count() == 0
    assert WebhookDelivery.objects.get().outcome == "ignored"


@pytest.mark.parametrize("association", ["CONTRIBUTOR", "FIRST_TIME_CONTRIBUTOR", "FIRST_TIMER", "MANNEQUIN", "NONE"])
def test_comment_command_from_a_non_collaborator_is_ignored(hook: Hook, association):
    payload = payloads.issue_comment_created(REPOSITORY, body="/cesaflow rm -rf everything", association=association)
    response = hook.deliver(payload, event="issue_comment")
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "ignored"
    assert association in body["reason"]
    assert "collaborators" in body["reason"]
    assert Run.objects.count() == 0
    delivery = WebhookDelivery.objects.get()
    assert (delivery.outcome, delivery.reason) == ("ignored", body["reason"])


def test_delivery_for_another_repository_is_ignored_with_a_reason(hook: Hook):
    response = hook.deliver(payloads.issues_labeled("mallory/widgets"))
    assert response.status_code == 202
    assert response.json() == {
        "status": "ignored",
        "reason": "The delivery is for another repository than the connected one.",
    }
    assert Run.objects.count() == 0
    assert WebhookDelivery.objects.get().reason == "The delivery is for another repository than the connected one."


def test_delivery_naming_no_repository_is_ignored(hook: Hook):
    payload = payloads.issues_labeled(REPOSITORY)
    del payload["repository"]
    response = hook.deliver(payload)
    assert response.json() == {"status": "ignored", "reason": "The delivery names no repository."}


def test_project_without_a_default_key_ignores_the_delivery_with_the_reason(cast, settings):
    settings.RUN_EXECUTOR = "worker"
    project = project_create(org=cast.org_a, actor=cast.admin_a.user, name="Keyless")
    secret = project_github_connect(project=project, actor=cast.admin_a.user, repository=REPOSITORY)
    body = payloads.encode(payloads.issues_labeled(REPOSITORY))
    response = deliver(Client(), project.id, body, secret=secret)
    assert response.status_code == 202
    assert response.json() == {"status": "ignored", "reason": "Choose a provider key (the project has no default)."}
    assert Run.objects.count() == 0
    delivery = WebhookDelivery.objects.get()
    assert (delivery.outcome, delivery.reason) == ("ignored", "Choose a provider key (the project has no default).")


def test_token_cap_reached_ignores_the_delivery_with_the_reason(hook: Hook):
    hook.project.org.monthly_token_cap = 0
    hook.project.org.save(update_fields=["monthly_token_cap"])
    response = hook.deliver(payloads.issues_labeled(REPOSITORY))
    assert response.status_code == 202
    assert response.json()["status"] == "ignored"
    # Said without the organization's figures: GitHub's delivery log is readable by the repository's people.
    assert response.json()["reason"] == "The organization's monthly token cap is reached."
    assert Run.objects.count() == 0


# --- Signatures: every failure is the same 401 and leaves nothing behind ----------------------------------------


def _other_project_secret(hook: Hook, cast) -> str:
    _, secret = connected_project(cast.org_a, cast.admin_a.user, hook.key, name="Gadgets")
    return secret


@pytest.mark.parametrize(
    "case",
    [
        "wrong_secret",
        "reserialized_body",
        "body_changed_by_one_byte",
        "missing_header",
        "sha1_header_only",
        "sha1_prefix",
        "no_prefix",
        "truncated_hex",
        "non_hex",
        "empty_secret",
        "other_project_secret",
        "unknown_project",
    ],
)
def test_unverifiable_delivery_gets_401_and_starts_nothing(hook: Hook, cast, case):
    body = payloads.encode(payloads.issues_labeled(REPOSITORY))
    good = sign(hook.secret, body)
    project_id = hook.project.id
    kwargs: dict[str, object] = {}
    signature: str | None = None
    sent = body
    if case == "wrong_secret":
        signature = sign("It's a Secret to Everybody", body)
    elif case == "reserialized_body":
        # The same JSON document, re-serialized with spaces: its signature does not cover these bytes.
        signature = good
        sent = json.dumps(json.loads(body), indent=2).encode()
    elif case == "body_changed_by_one_byte":
        signature = good
        sent = body.replace(b"Add a CSV export", b"Add a CSV exporT")
    elif case == "missing_header":
        signature = None
    elif case == "sha1_header_only":
        kwargs["HTTP_X_HUB_SIGNATURE"] = "sha1=" + "0" * 40
    elif case == "sha1_prefix":
        signature = "sha1=" + good.removeprefix("sha256=")
    elif case == "no_prefix":
        signature = good.removeprefix("sha256=")
    elif case == "truncated_hex":
        signature = good[:-2]
    elif case == "non_hex":
        signature = good[:-1] + "g"
    elif case == "empty_secret":
        signature = sign("", body)
    elif case == "other_project_secret":
        signature = sign(_other_project_secret(hook, cast), body)
    elif case == "unknown_project":
        signature = good
        project_id = uuid.uuid4()
    response = deliver(Client(), project_id, sent, secret=None, signature=signature, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 401
    assert response.json() == UNVERIFIED
    _nothing_recorded()


def test_another_orgs_project_with_this_orgs_valid_signature_looks_like_an_unknown_project(hook: Hook, cast, simulator):
    key_b = sim_key(cast.org_b, cast.admin_b.user, simulator)
    project_b, _secret_b = connected_project(cast.org_b, cast.admin_b.user, key_b, name="Widgets B")
    body = payloads.encode(payloads.issues_labeled(REPOSITORY))

    to_org_b = deliver(Client(), project_b.id, body, secret=hook.secret)
    to_nowhere = deliver(Client(), uuid.uuid4(), body, secret=hook.secret)
    unconnected = project_create(org=cast.org_a, actor=cast.admin_a.user, name="Not connected")
    to_unconnected = deliver(Client(), unconnected.id, body, secret=hook.secret)

    for response in (to_org_b, to_nowhere, to_unconnected):
        assert response.status_code == 401
        assert response.content == to_nowhere.content
        assert response.json() == UNVERIFIED
    _nothing_recorded()


def test_signature_failures_are_counted_and_audited_once_per_minute(hook: Hook):
    before = signature_failure_counts()
    body = payloads.encode(payloads.issues_labeled(REPOSITORY))
    for _ in range(3):
        assert hook.deliver(body, secret="not the secret").status_code == 401
    assert hook.deliver(body, secret=None).status_code == 401
    assert deliver(hook.client, uuid.uuid4(), body, secret=hook.secret).status_code == 401

    failed = AuditEvent.objects.filter(event=AuditEvent.WEBHOOK_SIGNATURE_FAILED)
    assert failed.count() == 1  # one per project per minute, however many forgeries
    event = failed.get()
    assert event.org_id == hook.project.org_id
    assert event.target_id == str(hook.project.id)
    assert event.metadata["kind"] == "mismatch"
    after = signature_failure_counts()
    assert after.get("mismatch", 0) - before.get("mismatch", 0) == 3
    assert after.get("missing", 0) - before.get("missing", 0) == 1
    assert after.get("unknown_project", 0) - before.get("unknown_project", 0) == 1

    cache.clear()  # the minute is over
    assert hook.deliver(body, secret="still not the secret").status_code == 401
    assert failed.count() == 2


# --- Rotation and disconnection -----------------------------------------------------------------------------


def test_rotation_accepts_the_previous_secret_until_the_next_rotation(hook: Hook, cast):
    first = hook.secret
    second = project_github_rotate(project=hook.project, actor=cast.admin_a.user)
    assert second != first

    assert hook.deliver(payloads.ping(REPOSITORY), event="ping", secret=second).status_code == 200
    assert hook.deliver(payloads.ping(REPOSITORY, hook_id=2), event="ping", secret=first).status_code == 200

    third = project_github_rotate(project=hook.project, actor=cast.admin_a.user)
    assert hook.deliver(payloads.ping(REPOSITORY, hook_id=3), event="ping", secret=first).status_code == 401
    assert hook.deliver(payloads.ping(REPOSITORY, hook_id=4), event="ping", secret=second).status_code == 200
    assert hook.deliver(payloads.ping(REPOSITORY, hook_id=5), event="ping", secret=third).status_code == 200


def test_disconnected_project_refuses_every_secret(hook: Hook, cast):
    rotated = project_github_rotate(project=hook.project, actor=cast.admin_a.user)
    project_github_disconnect(project=hook.project, actor=cast.admin_a.user)
    for secret in (hook.secret, rotated):
        response = hook.deliver(payloads.issues_labeled(REPOSITORY), secret=secret)
        assert response.status_code == 401
        assert response.json() == UNVERIFIED
    _nothing_recorded()


# --- Replays ------------------------------------------------------------------------------------------------


def test_redelivery_of_the_same_delivery_is_a_duplicate_and_starts_no_second_run(hook: Hook):
    body = payloads.encode(payloads.issues_labeled(REPOSITORY))
    delivery = str(uuid.uuid4())
    first = hook.deliver(body, delivery=delivery)
    again = hook.deliver(body, delivery=delivery)
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json() == {"status": "duplicate"}
    assert Run.objects.count() == 1
    assert WebhookDelivery.objects.get().outcome == "run_started"  # the duplicate adds no row


def test_same_body_under_a_fresh_delivery_id_starts_nothing(hook: Hook):
    """The delivery id is not signed: a captured delivery resent under a new GUID is still a replay."""
    body = payloads.encode(payloads.issues_labeled(REPOSITORY))
    original = str(uuid.uuid4())
    assert hook.deliver(body, delivery=original).status_code == 202
    replay = hook.deliver(body, delivery=str(uuid.uuid4()))
    assert replay.status_code == 200
    assert replay.json() == {"status": "duplicate", "reason": f"Same body as delivery {original}."}
    assert Run.objects.count() == 1
    assert WebhookDelivery.objects.filter(outcome="duplicate").count() == 1


def test_same_delivery_id_with_another_body_is_a_conflict(hook: Hook):
    delivery = str(uuid.uuid4())
    assert hook.deliver(payloads.issues_labeled(REPOSITORY, title="One"), delivery=delivery).status_code == 202
    response = hook.deliver(payloads.issues_labeled(REPOSITORY, title="Two"), delivery=delivery)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"
    assert Run.objects.count() == 1
    assert Run.objects.get().objective.startswith("One")
    assert WebhookDelivery.objects.count() == 1


def test_delivery_ids_are_per_project(hook: Hook, cast):
    other, other_secret = connected_project(cast.org_a, cast.admin_a.user, hook.key, name="Gadgets")
    delivery = str(uuid.uuid4())
    assert hook.deliver(payloads.ping(REPOSITORY), event="ping", delivery=delivery).status_code == 200
    body = payloads.encode(payloads.ping(REPOSITORY))
    response = deliver(hook.client, other.id, body, secret=other_secret, event="ping", delivery=delivery)
    assert response.json() == {"status": "pong"}


@pytest.mark.parametrize("delivery", ["", "x" * 101, "id with spaces", "abc\u00e9"])
def test_missing_or_malformed_delivery_id_is_400(hook: Hook, delivery):
    response = hook.deliver(payloads.issues_labeled(REPOSITORY), delivery=delivery)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_delivery_id"
    _nothing_recorded()


def test_missing_event_header_is_400(hook: Hook):
    response = hook.deliver(payloads.issues_labeled(REPOSITORY), event="")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_event"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2, 3]", b"\xff\xfe", b"[" * 100_000])
def test_invalid_json_is_400_once_the_signature_verifies(hook: Hook, body):
    response = hook.deliver(body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    _nothing_recorded()


def test_invalid_json_with_a_bad_signature_is_401(hook: Hook):
    assert hook.deliver(b"{not json", secret="wrong").json() == UNVERIFIED


# --- Transport: method, content type, size, CSRF and sessions -------------------------------------------------


def test_get_is_405_with_allow_post(hook: Hook):
    response = hook.client.get(hook_url(hook.project.id))
    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data"])
def test_non_json_content_type_is_415(hook: Hook, content_type):
    body = payloads.encode(payloads.ping(REPOSITORY))
    response = hook.deliver(body, event="ping", content_type=content_type)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    _nothing_recorded()


def test_json_with_a_charset_is_accepted(hook: Hook):
    response = hook.deliver(payloads.ping(REPOSITORY), event="ping", content_type="application/json; charset=utf-8")
    assert response.status_code == 200


def test_oversized_body_is_413_before_any_verification(hook: Hook, settings):
    settings.WEBHOOK_MAX_BODY_BYTES = 4096
    payload = payloads.issues_labeled(REPOSITORY, body="x" * 5000)
    # Correctly signed, and still refused: the size is checked before the body is read.
    response = hook.deliver(payload)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    unsigned = hook.deliver(payload, secret=None)
    assert unsigned.status_code == 413
    _nothing_recorded()
    assert not AuditEvent.objects.filter(event=AuditEvent.WEBHOOK_SIGNATURE_FAILED).exists()


def test_body_at_the_cap_is_accepted(hook: Hook, settings):
    body = payloads.encode(payloads.ping(REPOSITORY))
    settings.WEBHOOK_MAX_BODY_BYTES = len(body)
    assert hook.deliver(body, event="ping").status_code == 200


def test_understated_content_length_is_never_read_past(hook: Hook, settings):
    """A body longer than its Content-Length: only the declared bytes are read, so the signature (over the whole
    body) does not verify."""
    settings.WEBHOOK_MAX_BODY_BYTES = 4096
    body = payloads.encode(payloads.issues_labeled(REPOSITORY, body="x" * 5000))
    response = hook.deliver(body, CONTENT_LENGTH="100")
    assert response.status_code == 401
    _nothing_recorded()


def test_hook_needs_no_csrf_token_and_sets_no_cookie(hook: Hook):
    client = Client(enforce_csrf_checks=True)
    body = payloads.encode(payloads.ping(REPOSITORY))
    response = deliver(client, hook.project.id, body, secret=hook.secret, event="ping")
    assert response.status_code == 200
    assert not response.cookies
    assert response["Cache-Control"] == "no-store"
    assert response["Content-Type"] == "application/json"
    assert response["X-Content-Type-Options"] == "nosniff"  # exempt from CSRF, not from the security headers


def test_the_previous_secret_is_refused_once_the_rotation_grace_is_over(hook: Hook, cast):
    from datetime import timedelta

    from django.utils import timezone

    from runs.webhooks.services import ROTATION_GRACE

    first = hook.secret
    second = project_github_rotate(project=hook.project, actor=cast.admin_a.user)
    # A day later (the grace), the leaked secret someone rotated away from no longer starts anything.
    type(hook.project).objects.filter(id=hook.project.id).update(
        github_secret_rotated_at=timezone.now() - ROTATION_GRACE - timedelta(seconds=1)
    )
    assert hook.deliver(payloads.ping(REPOSITORY), event="ping", secret=first).status_code == 401
    assert hook.deliver(payloads.ping(REPOSITORY, hook_id=2), event="ping", secret=second).status_code == 200


@pytest.mark.parametrize("kind", ["issues", "issue_comment"])
def test_a_replay_of_an_old_signed_delivery_under_a_new_id_starts_nothing(hook: Hook, kind: str):
    # GitHub signs no timestamp: a body captured from the delivery log stays valid. Once its id is purged (after
    # WEBHOOK_DELIVERY_RETENTION_DAYS) only its own timestamps can tell it is old.
    if kind == "issues":
        payload = payloads.issues_labeled(REPOSITORY)
        payload["issue"]["updated_at"] = "2019-05-15T15:20:21Z"
    else:
        payload = payloads.issue_comment_created(REPOSITORY)
        payload["comment"]["created_at"] = "2019-05-15T15:20:21Z"
    response = hook.deliver(payload, event=kind)
    assert response.status_code == 202
    assert response.json()["status"] == "ignored"
    assert "older than the replay window" in response.json()["reason"]
    assert Run.objects.count() == 0
