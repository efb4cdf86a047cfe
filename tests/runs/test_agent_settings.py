"""The org's own agent budgets: set by Admins on the agent settings page within the deployment's caps, applied to
every new agent run unless the run's request asks for others."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse

from runs.models import AuditEvent
from runs.services import org_agent_limits_set, run_create
from tests.runs.test_execution_support import sim_key

pytestmark = pytest.mark.django_db

URL = "/settings/agents/"


def test_the_page_is_for_admins(cast):
    assert reverse("runs:agent_settings") == URL
    assert Client().get(URL).status_code == 302
    assert cast.dev_a.client().get(URL).status_code == 403
    assert cast.dev_a.client().post(URL, {"max_steps": "5"}).status_code == 403
    page = cast.admin_a.client().get(URL)
    assert page.status_code == 200
    assert "40 (default)" in page.content.decode()  # the deployment's default shown where nothing is set


def test_admin_sets_limits_that_new_agent_runs_get_and_it_is_audited(cast, simulator):
    response = cast.admin_a.client().post(URL, {"max_steps": "12", "wall_clock_minutes": "5"})
    assert response.status_code == 302
    cast.org_a.refresh_from_db()
    assert cast.org_a.agent_limits == {"max_steps": 12, "wall_clock_s": 300.0}
    event = AuditEvent.objects.get(event=AuditEvent.ORG_SETTINGS_CHANGED, org=cast.org_a)
    assert event.metadata["changes"]["agent_limits"] == [{}, {"max_steps": 12, "wall_clock_s": 300.0}]

    key = sim_key(cast.org_a, cast.admin_a.user, simulator)
    run = run_create(
        org=cast.org_a, actor=cast.dev_a.user, provider_key_id=key.id, model="m", objective="x", kind="agent"
    )
    assert (run.limits["max_steps"], run.limits["wall_clock_s"], run.limits["max_tokens"]) == (12, 300.0, 500_000)
    # A run's request still decides for itself, within the caps.
    asked = run_create(
        org=cast.org_a,
        actor=cast.dev_a.user,
        provider_key_id=key.id,
        model="m",
        objective="x",
        kind="agent",
        limits={"max_steps": 3},
    )
    assert asked.limits["max_steps"] == 3
    # Another org is untouched.
    key_b = sim_key(cast.org_b, cast.admin_b.user, simulator)
    other = run_create(
        org=cast.org_b, actor=cast.admin_b.user, provider_key_id=key_b.id, model="m", objective="x", kind="agent"
    )
    assert other.limits["max_steps"] == 40


def test_values_over_the_deployment_caps_are_form_errors_and_nothing_changes(cast):
    response = cast.admin_a.client().post(URL, {"max_steps": "100000"})
    assert response.status_code == 200
    assert "max_steps must be at most 200" in response.content.decode()
    cast.org_a.refresh_from_db()
    assert cast.org_a.agent_limits == {}
    with pytest.raises(ValidationError):
        org_agent_limits_set(org=cast.org_a, actor=cast.admin_a.user, overrides={"max_tokens": 0})


def test_clearing_the_fields_returns_to_the_deployment_defaults(cast):
    client = cast.admin_a.client()
    client.post(URL, {"max_steps": "12"})
    client.post(URL, {})
    cast.org_a.refresh_from_db()
    assert cast.org_a.agent_limits == {}


def test_the_hourly_retention_job_purges_old_audit_events_and_delivery_ids_only(cast, settings):
    from datetime import timedelta

    from django.utils import timezone

    from runs.models import Project, WebhookDelivery
    from runs.services import retention_purge

    settings.AUDIT_RETENTION_DAYS = 90
    settings.WEBHOOK_DELIVERY_RETENTION_DAYS = 30
    project = Project.objects.create(org=cast.org_a, name="P")
    old, recent = timezone.now() - timedelta(days=91), timezone.now() - timedelta(days=1)
    for delivery_id, when in (("old", timezone.now() - timedelta(days=31)), ("new", recent)):
        WebhookDelivery.objects.create(
            project=project,
            delivery_id=delivery_id,
            event="ping",
            body_sha256="0" * 64,
            outcome="pong",
            received_at=when,
        )
    AuditEvent.objects.create(org=cast.org_a, event=AuditEvent.ORG_CREATED, created_at=old)
    kept = AuditEvent.objects.filter(created_at__gt=old).count()
    assert retention_purge() == {"audit_events": 1, "webhook_deliveries": 1, "unconfirmed_signups": 0}
    assert list(WebhookDelivery.objects.values_list("delivery_id", flat=True)) == ["new"]
    assert AuditEvent.objects.count() == kept
