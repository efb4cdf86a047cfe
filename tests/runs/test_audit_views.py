"""The audit page and its CSV export: filters, pagination, org isolation and CSV formula injection."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from orgs.models import Membership, Role
from runs.audit import audit_record
from runs.models import AuditEvent
from runs.views import AUDIT_PAGE_SIZE, CSV_HEADER, neutralize_csv_cell

pytestmark = pytest.mark.django_db

AUDIT = reverse("runs:audit")
CSV = reverse("runs:audit_csv")


def _csv_rows(response) -> list[list[str]]:
    assert response["Content-Type"].startswith("text/csv")
    return list(csv.reader(io.StringIO(response.content.decode())))


def _at(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=UTC)


def test_audit_page_shows_the_events_of_dashboard_actions(cast):
    client = cast.admin_a.client()
    membership = Membership.objects.get(user=cast.dev_a.user, org=cast.org_a)
    client.post(reverse("orgs:member_role", kwargs={"membership_id": membership.id}), {"role": Role.ADMIN})
    client.post(reverse("orgs:team"), {"email": "newbie@a.example", "role": Role.DEVELOPER})
    client.post(reverse("orgs:api_key_revoke", kwargs={"api_key_id": cast.dev_a.api_key.id}))
    client.post(reverse("orgs:settings"), {"name": "Org A2"})
    content = client.get(AUDIT).content.decode()
    for event in (
        AuditEvent.MEMBER_ROLE_CHANGED,
        AuditEvent.INVITATION_SENT,
        AuditEvent.API_KEY_REVOKED,
        AuditEvent.API_KEY_CREATED,
        AuditEvent.ORG_SETTINGS_CHANGED,
    ):
        assert event in content
    assert "newbie@a.example" in content


def test_event_filter(cast):
    client = cast.admin_a.client()
    client.post(reverse("orgs:settings"), {"name": "Org A2"})
    response = client.get(AUDIT, {"event": AuditEvent.ORG_SETTINGS_CHANGED})
    events = [event.event for event, _details in response.context["rows"]]
    assert events == [AuditEvent.ORG_SETTINGS_CHANGED]


def test_actor_filter_matches_part_of_an_email(cast):
    response = cast.admin_a.client().get(AUDIT, {"actor": "dave@"})
    rows = response.context["rows"]
    assert rows
    assert all(event.actor_label == "dave@a.example" for event, _details in rows)


def test_since_and_until_are_whole_utc_days(cast):
    for day in ("2026-01-01T23:59:00", "2026-01-02T00:00:00", "2026-01-02T23:59:59", "2026-01-03T00:00:00"):
        event = audit_record(event=AuditEvent.LOGIN_FAILED, org=cast.org_a, actor=f"{day}@x.example")
        AuditEvent.objects.filter(id=event.id).update(created_at=_at(day))
    response = cast.admin_a.client().get(AUDIT, {"since": "2026-01-02", "until": "2026-01-02"})
    labels = sorted(event.actor_label for event, _details in response.context["rows"])
    assert labels == ["2026-01-02T00:00:00@x.example", "2026-01-02T23:59:59@x.example"]


@pytest.mark.parametrize(
    "params",
    [
        {"since": "yesterday"},
        {"until": "2026-13-45"},
        {"event": "no.such_event"},
        {"since": "2026-02-02", "until": "2026-02-01"},
    ],
)
def test_invalid_filters_show_errors_not_500(cast, params):
    response = cast.admin_a.client().get(AUDIT, params)
    assert response.status_code == 200
    assert response.context["form"].errors
    assert response.context["page"] is None
    assert cast.admin_a.client().get(CSV, params).status_code == 400


def test_pagination_keeps_filters(cast):
    for i in range(AUDIT_PAGE_SIZE + 5):
        audit_record(event=AuditEvent.LOGIN_FAILED, org=cast.org_a, actor=f"spray{i}@x.example")
    client = cast.admin_a.client()
    first = client.get(AUDIT, {"event": AuditEvent.LOGIN_FAILED})
    assert len(first.context["rows"]) == AUDIT_PAGE_SIZE
    assert "?event=auth.login_failed&amp;page=2" in first.content.decode()
    second = client.get(AUDIT, {"event": AuditEvent.LOGIN_FAILED, "page": 2})
    assert len(second.context["rows"]) == 5
    assert client.get(AUDIT, {"page": "nonsense"}).status_code == 200


def _queries(client, url) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


def test_audit_page_query_count_does_not_grow_with_rows(cast):
    client = cast.admin_a.client()
    client.get(AUDIT)  # warm the session
    few = _queries(client, AUDIT)
    for i in range(30):
        audit_record(event=AuditEvent.LOGIN_SUCCEEDED, org=cast.org_a, actor=cast.admin_a.user)
        audit_record(event=AuditEvent.API_KEY_REVOKED, org=cast.org_a, actor=cast.admin_a.api_key, metadata={"i": i})
    assert _queries(client, AUDIT) == few
    assert _queries(client, CSV) <= few


def test_other_orgs_events_are_never_shown(cast):
    audit_record(event=AuditEvent.LOGIN_FAILED, org=cast.org_b, actor="only-in-b@b.example")
    client = cast.admin_a.client()
    assert "only-in-b@b.example" not in client.get(AUDIT).content.decode()
    assert "only-in-b@b.example" not in client.get(CSV).content.decode()
    assert "only-in-b@b.example" in cast.admin_b.client().get(AUDIT).content.decode()


def test_csv_has_header_and_filtered_rows(cast):
    client = cast.admin_a.client()
    client.post(reverse("orgs:settings"), {"name": "Org A2"})
    response = client.get(CSV, {"event": AuditEvent.API_KEY_CREATED})
    assert response.status_code == 200
    assert response["Content-Disposition"].startswith('attachment; filename="audit-org-a-')
    rows = _csv_rows(response)
    assert rows[0] == CSV_HEADER
    assert len(rows) == 3  # the cast's two org A keys
    assert {row[1] for row in rows[1:]} == {AuditEvent.API_KEY_CREATED}
    assert {row[2] for row in rows[1:]} == {"alice@a.example", "dave@a.example"}
    everything = _csv_rows(client.get(CSV))
    assert AuditEvent.ORG_SETTINGS_CHANGED in {row[1] for row in everything[1:]}


def test_csv_neutralizes_formula_injection(cast):
    payload = '=HYPERLINK("http://evil.example","x")'
    audit_record(
        event=AuditEvent.LOGIN_FAILED,
        org=cast.org_a,
        actor=payload,
        metadata={"email": "+cmd|' /C calc'!A0"},
    )
    rows = _csv_rows(cast.admin_a.client().get(CSV, {"event": AuditEvent.LOGIN_FAILED}))
    assert len(rows) == 2
    row = dict(zip(rows[0], rows[1], strict=True))
    assert row["actor"] == "'" + payload
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in rows[1])


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("alice@a.example", "alice@a.example"),
        ("", ""),
    ],
)
def test_neutralize_csv_cell(cell, expected):
    assert neutralize_csv_cell(cell) == expected


@pytest.mark.parametrize("name", ["runs:audit", "runs:audit_csv"])
def test_the_last_representable_day_is_a_form_error_not_a_500(cast, name):
    response = cast.admin_a.client().get(reverse(name), {"until": "9999-12-31"})
    assert response.status_code in {200, 400}
