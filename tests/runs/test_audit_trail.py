"""The audit trail itself: retention (purge_audit), inert metadata, and never a secret in any row."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core import serializers
from django.core.management import call_command
from django.utils import timezone
from freezegun import freeze_time
from rest_framework.test import APIClient

from cesaflow.lib import request_context
from orgs.services import api_key_create, api_key_revoke
from runs.audit import audit_record
from runs.models import AuditEvent
from runs.services import audit_purge

pytestmark = pytest.mark.django_db


def _event_aged(org, age: timedelta, now, label: str) -> AuditEvent:
    with freeze_time(now - age):
        return audit_record(event=AuditEvent.LOGGED_OUT, org=org, actor=None, metadata={"label": label})


def _labels() -> set[str]:
    return {e.metadata.get("label") for e in AuditEvent.objects.filter(event=AuditEvent.LOGGED_OUT)}


def _purge(*args: str) -> str:
    out = io.StringIO()
    call_command("purge_audit", *args, stdout=out)
    return out.getvalue()


def test_purge_keeps_90_day_old_events_and_deletes_older_ones(cast):
    now = timezone.now()
    _event_aged(cast.org_a, timedelta(days=1), now, "recent")
    _event_aged(cast.org_a, timedelta(days=90), now, "exactly 90 days")
    _event_aged(cast.org_b, timedelta(days=90, seconds=1), now, "just past 90 days")
    _event_aged(None, timedelta(days=400), now, "ancient, no org")
    with freeze_time(now):
        output = _purge()
    assert _labels() == {"recent", "exactly 90 days"}
    assert "Deleted 2 audit events older than 90 days." in output


def test_purge_is_idempotent(cast):
    now = timezone.now()
    _event_aged(cast.org_a, timedelta(days=100), now, "old")
    before = AuditEvent.objects.count()
    with freeze_time(now):
        assert "Deleted 1 " in _purge()
        assert "Deleted 0 " in _purge()
    assert AuditEvent.objects.count() == before - 1


def test_purge_days_option_sets_the_retention(cast):
    now = timezone.now()
    _event_aged(cast.org_a, timedelta(days=29), now, "29 days")
    _event_aged(cast.org_a, timedelta(days=31), now, "31 days")
    with freeze_time(now):
        _purge("--days", "30")
    assert _labels() == {"29 days"}


def test_purge_default_follows_the_retention_setting(cast, settings):
    settings.AUDIT_RETENTION_DAYS = 10
    now = timezone.now()
    _event_aged(cast.org_a, timedelta(days=9), now, "9 days")
    _event_aged(cast.org_a, timedelta(days=11), now, "11 days")
    with freeze_time(now):
        _purge()
    assert _labels() == {"9 days"}


def test_purge_refuses_less_than_one_day(cast):
    now = timezone.now()
    _event_aged(cast.org_a, timedelta(days=2), now, "kept")
    with pytest.raises(SystemExit):
        _purge("--days", "0")
    with pytest.raises(ValueError, match="at least 1"):
        audit_purge(older_than_days=0)
    assert _labels() == {"kept"}


def test_metadata_and_labels_are_stored_without_control_characters(cast):
    token = request_context.bind(
        request_context.RequestContext(ip="192.0.2.1", user_agent="evil\r\nX-Injected: 1\x1b[2J")
    )
    try:
        event = audit_record(
            event=AuditEvent.LOGIN_FAILED,
            org=cast.org_a,
            actor="mallory@evil.example\n2025-01-01 INFO admin logged in",
            metadata={"email": "a\nb\x1b[31mred\x1b[0m\x00", "nested": {"list": ["x\ry", 1, None]}},
        )
    finally:
        request_context.unbind(token)
    stored = AuditEvent.objects.get(pk=event.pk)
    assert stored.metadata == {"email": "ab[31mred[0m", "nested": {"list": ["xy", 1, None]}}
    assert stored.actor_label == "mallory@evil.example2025-01-01 INFO admin logged in"
    assert stored.user_agent == "evilX-Injected: 1[2J"


def test_metadata_is_kept_small(cast):
    event = audit_record(
        event=AuditEvent.LOGGED_OUT,
        org=cast.org_a,
        actor=None,
        metadata={"long": "x" * 10_000, **{f"k{i}": i for i in range(50)}},
    )
    stored = AuditEvent.objects.get(pk=event.pk)
    assert len(stored.metadata) <= 20
    assert all(len(str(v)) <= 200 for v in stored.metadata.values())


def test_unregistered_event_names_are_refused(cast):
    with pytest.raises(ValueError, match="unregistered"):
        audit_record(event="made.up", org=cast.org_a, actor=None)


def test_no_api_key_secret_ever_appears_in_any_audit_event(cast):
    secrets = [cast.admin_a.api_secret, cast.dev_a.api_secret, cast.admin_b.api_secret, cast.dev_b.api_secret]
    # Keys made every way there is: service, API with a session, API with a key, the management command.
    _, secret = api_key_create(org=cast.org_a, name="service", actor=cast.admin_a.user)
    secrets.append(secret)
    response = cast.admin_a.session_api().post("/api/v1/api-keys", {"name": "session"}, format="json")
    secrets.append(response.json()["key"])
    response = cast.admin_b.api().post("/api/v1/api-keys", {"name": "key"}, format="json")
    secrets.append(response.json()["key"])
    out = io.StringIO()
    call_command("create_api_key", "--org", "org-a", "--name", "command", stdout=out)
    secrets.append(out.getvalue().strip().splitlines()[-1])
    # Use, fail and revoke them too.
    for secret in secrets:
        client = APIClient()
        client.credentials(HTTP_X_API_KEY=secret)
        client.get("/api/v1/org")
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret[:-1]}X")
        client.get("/api/v1/org")
    api_key_revoke(api_key=cast.dev_a.api_key, actor=cast.admin_a.user)
    cast.admin_a.api().delete(f"/api/v1/api-keys/{cast.dev_b.api_key.id}")  # another org's: 404, still no leak

    dump = serializers.serialize("json", AuditEvent.objects.all())
    assert AuditEvent.objects.filter(event=AuditEvent.API_KEY_CREATED).count() >= 8
    for secret in secrets:
        body = secret.split("_")[-1]  # the part after the public prefix is the secret proper
        assert secret not in dump
        assert body[:16] not in dump
