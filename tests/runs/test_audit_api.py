"""GET /api/v1/audit-events: the org's trail for holders of ``audit:read``, filtered and cursor-paginated."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from freezegun import freeze_time
from rest_framework.test import APIClient

from cesaflow.lib import request_context
from orgs.models import Membership
from orgs.permissions import DEVELOPER_CAPABILITIES
from orgs.services import api_key_create, membership_change_role, org_update
from runs.audit import audit_record
from runs.models import AuditEvent

pytestmark = pytest.mark.django_db

URL = "/api/v1/audit-events"


def _events(client: APIClient, query: str = "") -> list[dict[str, Any]]:
    response = client.get(f"{URL}{query}")
    assert response.status_code == 200, response.content
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def test_events_carry_who_what_target_where_and_when(cast):
    token = request_context.bind(request_context.RequestContext(ip="203.0.113.5", user_agent="pytest-agent/1"))
    try:
        org_update(org=cast.org_a, actor=cast.admin_a.user, name="Org A2")
    finally:
        request_context.unbind(token)
    event = AuditEvent.objects.get(event=AuditEvent.ORG_SETTINGS_CHANGED)
    row = _events(cast.admin_a.api(), f"?event={AuditEvent.ORG_SETTINGS_CHANGED}")[0]
    assert row == {
        "id": str(event.id),
        "event": "org.settings_changed",
        "actor": {"kind": "user", "id": str(cast.admin_a.user.id), "label": "alice@a.example"},
        "target": {"type": "organization", "id": str(cast.org_a.id)},
        "ip": "203.0.113.5",
        "user_agent": "pytest-agent/1",
        "metadata": {"changes": {"name": ["Org A", "Org A2"]}},
        "created_at": event.created_at.isoformat().replace("+00:00", "Z"),
    }


def test_api_key_actors_and_anonymous_actors_are_told_apart(cast):
    cast.admin_a.api().patch("/api/v1/org", {"name": "Via key"}, format="json")
    audit_record(event=AuditEvent.LOGIN_FAILED, org=cast.org_a, actor="mallory@evil.example")
    rows = {row["event"]: row for row in _events(cast.admin_a.api())}
    assert rows["org.settings_changed"]["actor"]["kind"] == "api_key"
    assert rows["org.settings_changed"]["actor"]["id"] == str(cast.admin_a.api_key.id)
    assert cast.admin_a.api_secret not in rows["org.settings_changed"]["actor"]["label"]
    assert rows["auth.login_failed"]["actor"] == {"kind": "anonymous", "id": None, "label": "mallory@evil.example"}
    assert rows["auth.login_failed"]["target"] == {"type": None, "id": None}


def test_filter_by_event(cast):
    rows = _events(cast.admin_a.api(), f"?event={AuditEvent.API_KEY_CREATED}")
    assert rows
    assert {row["event"] for row in rows} == {AuditEvent.API_KEY_CREATED}


def test_filter_by_actor_id_or_label(cast):
    org_update(org=cast.org_a, actor=cast.dev_a.api_key, name="By dave's key")
    client = cast.admin_a.api()
    by_user = _events(client, f"?actor={cast.admin_a.user.id}")
    assert by_user
    assert {row["actor"]["id"] for row in by_user} == {str(cast.admin_a.user.id)}
    by_key = _events(client, f"?actor={cast.dev_a.api_key.id}")
    assert [row["event"] for row in by_key] == [AuditEvent.ORG_SETTINGS_CHANGED]
    by_label = _events(client, "?actor=DAVE@A.EXAMPLE")
    assert by_label
    # Dave himself and his key (named after him): a substring of the label, case-insensitive.
    assert {row["actor"]["kind"] for row in by_label} == {"user", "api_key"}
    assert all("dave@a.example" in row["actor"]["label"] for row in by_label)


def test_filter_by_time_window(cast):
    now = timezone.now()
    for days in (1, 3, 5):
        with freeze_time(now - timedelta(days=days)):
            audit_record(event=AuditEvent.LOGGED_OUT, org=cast.org_a, actor=cast.dev_a.user, metadata={"d": days})
    client = cast.admin_a.api()
    since = (now - timedelta(days=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    until = (now - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = _events(client, f"?event={AuditEvent.LOGGED_OUT}&since={since}&until={until}")
    assert [row["metadata"]["d"] for row in rows] == [3]
    rows = _events(client, f"?event={AuditEvent.LOGGED_OUT}&since={since}")
    assert [row["metadata"]["d"] for row in rows] == [1, 3]
    rows = _events(client, f"?event={AuditEvent.LOGGED_OUT}&until={until}")
    assert [row["metadata"]["d"] for row in rows] == [3, 5]
    offset = (now - timedelta(days=4)).isoformat().replace("+00:00", "%2B00:00")  # a percent-encoded "+" offset
    assert len(_events(client, f"?event={AuditEvent.LOGGED_OUT}&since={offset}")) == 2


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("?since=yesterday", "since"),
        ("?until=2025-13-45T00:00:00Z", "until"),
        ("?since=2025-01-01T00:00:00Z&until=2024-01-01T00:00:00Z", "until"),
        ("?event=no.such_event", "event"),
        ("?actor=" + "x" * 300, "actor"),
    ],
)
def test_bad_filters_are_a_400_in_the_error_shape(cast, query, field):
    response = cast.admin_a.api().get(f"{URL}{query}")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert field in error["details"]["fields"]


def test_paginates_newest_first_with_a_cursor(cast):
    now = timezone.now()
    for minutes in range(7):
        with freeze_time(now - timedelta(minutes=minutes)):
            audit_record(event=AuditEvent.LOGGED_OUT, org=cast.org_a, actor=cast.dev_a.user, metadata={"m": minutes})
    client = cast.admin_a.api()
    seen: list[int] = []
    url: str | None = f"{URL}?event={AuditEvent.LOGGED_OUT}&limit=3"
    while url:
        page = client.get(url).json()
        seen += [row["metadata"]["m"] for row in page["results"]]
        url = page["next"]
        if url:
            assert "event=auth.logged_out" in url  # filters survive paging
    assert seen == list(range(7))


def test_a_tampered_cursor_is_a_400(cast):
    response = cast.admin_a.api().get(f"{URL}?cursor=cD1ub3QtYS1kYXRl")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_cursor"


def test_a_key_without_audit_read_gets_403(cast):
    _, secret = api_key_create(
        org=cast.org_a, name="no audit", actor=cast.admin_a.user, scopes=["org:read", "api_keys:manage"]
    )
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=secret)
    response = client.get(URL)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"
    assert "audit:read" not in DEVELOPER_CAPABILITIES  # hence the Developer 403 in the matrix


def test_an_admin_sees_only_their_orgs_trail(cast):
    membership_change_role(
        membership=Membership.objects.get(user=cast.dev_b.user), role="admin", actor=cast.admin_b.user
    )
    ids_b = {row["id"] for row in _events(cast.admin_b.api(), "?limit=200")}
    assert ids_b == {str(i) for i in AuditEvent.objects.filter(org=cast.org_b).values_list("id", flat=True)}
    ids_a = {row["id"] for row in _events(cast.admin_a.api(), "?limit=200")}
    assert not ids_a & ids_b


@pytest.mark.parametrize("extra", [1, 5])
def test_list_query_count_does_not_grow_with_events(cast, django_assert_num_queries, extra):
    for i in range(extra):
        audit_record(event=AuditEvent.LOGGED_OUT, org=cast.org_a, actor=cast.dev_a.user, metadata={"i": i})
        audit_record(event=AuditEvent.LOGGED_OUT, org=cast.org_a, actor=cast.dev_a.api_key, metadata={"i": i})
    client = cast.admin_a.api()
    client.get(URL)  # records last_used_at once
    expected = AuditEvent.objects.filter(org=cast.org_a).count()
    # One page of events: the API key itself was verified a moment ago (orgs.api_key_cache)
    with django_assert_num_queries(1):
        response = client.get(URL)
    assert len(response.json()["results"]) == expected
