"""Usage: the aggregation over the usage ledger, the Usage page (tables, SVG chart, cap), its CSV export, the
``GET /api/v1/usage`` endpoint, and the monthly token cap setting.

The numbers are checked exactly against ``UsageRecord`` rows created here, at chosen times around the period's
edges (whole UTC days, ``until`` inclusive).
"""

from __future__ import annotations

import csv
import io
import re
import secrets
from datetime import UTC, date, datetime
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from freezegun import freeze_time

from keys.models import Provider, ProviderKey
from keys.services import provider_key_create
from orgs.models import Role, User
from orgs.permissions import DEVELOPER_CAPABILITIES, USAGE_READ
from orgs.services import MONTHLY_TOKEN_CAP_MAX, api_key_create, org_update
from runs.models import AuditEvent, Run, UsageRecord
from runs.services import run_create
from runs.usage import (
    MAX_PERIOD_DAYS,
    PeriodError,
    UsagePeriod,
    UsageRow,
    compact_number,
    daily_chart_svg,
    nice_ceiling,
    usage_by,
    usage_daily,
    usage_period,
)
from runs.views import USAGE_CSV_HEADER

pytestmark = pytest.mark.django_db

USAGE = reverse("runs:usage")
USAGE_CSV = reverse("runs:usage_csv")
API = "/api/v1/usage"
NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
MARCH = UsagePeriod(since=date(2026, 3, 1), until=date(2026, 3, 15))


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _key(org: Any, actor: Any, label: str, provider: str = Provider.OPENAI) -> ProviderKey:
    return provider_key_create(
        org=org, actor=actor, provider=provider, label=label, secret="sk-test-" + secrets.token_urlsafe(24)
    )


def _record(run: Run, when: str, input_tokens: int, output_tokens: int, *, model: str = "", complete: bool = True):
    return UsageRecord.objects.create(
        org=run.org,
        run=run,
        provider=run.provider,
        model=model or run.model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        complete=complete,
        created_at=_at(when),
    )


class Ledger:
    """Org A's March: three members (a user whose email changed, an org API key, a deleted user), two providers,
    three models, and records just inside and just outside 2026-03-01..2026-03-15; plus Org B's big numbers."""

    def __init__(self, cast: Any) -> None:
        openai = _key(cast.org_a, cast.admin_a.user, "main")
        anthropic = _key(cast.org_a, cast.admin_a.user, "claude", Provider.ANTHROPIC)
        temp = User.objects.create_user(email="temp@a.example", password="x" * 12)
        cast.org_a.memberships.create(user=temp, role=Role.DEVELOPER)

        self.dev_run = run_create(
            org=cast.org_a, actor=cast.dev_a.user, provider_key_id=openai.id, model="gpt-4o-mini", objective="a"
        )
        self.key_run = run_create(
            org=cast.org_a, actor=cast.admin_a.api_key, provider_key_id=anthropic.id, model="claude-s", objective="b"
        )
        temp_run = run_create(org=cast.org_a, actor=temp, provider_key_id=openai.id, model="gpt-4.1", objective="c")
        _record(self.dev_run, "2026-03-01T00:00:00", 100, 50)  # first instant of the period
        _record(self.dev_run, "2026-03-02T10:00:00", 10, 5)
        _record(self.key_run, "2026-03-02T11:00:00", 1000, 200, complete=False)
        _record(temp_run, "2026-03-15T23:59:59", 7, 3)  # last second of the period
        _record(self.dev_run, "2026-02-28T23:59:59", 999, 999)  # the day before
        _record(self.dev_run, "2026-03-16T00:00:00", 888, 888)  # the day after

        openai_b = _key(cast.org_b, cast.admin_b.user, "main")
        run_b = run_create(
            org=cast.org_b, actor=cast.admin_b.user, provider_key_id=openai_b.id, model="gpt-4o-mini", objective="z"
        )
        _record(run_b, "2026-03-02T09:00:00", 5000, 5000)

        # Members are grouped by who they are, not by the label snapshot taken when the run started.
        cast.dev_a.user.email = "dave2@a.example"
        cast.dev_a.user.save(update_fields=["email"])
        self.temp_id = temp.id
        temp.delete()
        self.key_label = Run.objects.get(id=self.key_run.id).created_by_label


@pytest.fixture
def ledger(cast) -> Ledger:
    with freeze_time(NOW):
        return Ledger(cast)


def _plain(rows: list[UsageRow]) -> list[tuple[str, int, int, int]]:
    return [(r.key, r.input_tokens, r.output_tokens, r.calls) for r in rows]


# --- Aggregation ----------------------------------------------------------------------------------------------------


def test_usage_by_provider_is_exact(cast, ledger):
    rows = usage_by(org=cast.org_a, period=MARCH, group_by="provider")
    assert _plain(rows) == [("anthropic", 1000, 200, 1), ("openai", 117, 58, 3)]
    assert [r.label for r in rows] == ["Anthropic", "OpenAI"]


def test_usage_by_model_is_exact(cast, ledger):
    rows = usage_by(org=cast.org_a, period=MARCH, group_by="model")
    assert _plain(rows) == [("claude-s", 1000, 200, 1), ("gpt-4o-mini", 110, 55, 2), ("gpt-4.1", 7, 3, 1)]


def test_usage_by_member_groups_by_person_or_key_not_by_label(cast, ledger):
    rows = usage_by(org=cast.org_a, period=MARCH, group_by="member")
    assert _plain(rows) == [
        (ledger.key_label, 1000, 200, 1),
        ("dave2@a.example", 110, 55, 2),  # the current email, though the run recorded the old one
        ("temp@a.example", 7, 3, 1),  # a deleted user keeps the label snapshot
    ]
    assert ledger.key_label.startswith("API key alice key")
    assert (rows[0].user_id, rows[0].api_key_id) == (None, cast.admin_a.api_key.id)
    assert (rows[1].user_id, rows[1].api_key_id) == (cast.dev_a.user.id, None)
    assert (rows[2].user_id, rows[2].api_key_id) == (None, None)


def test_usage_by_day_and_the_daily_series_with_empty_days(cast, ledger):
    rows = usage_by(org=cast.org_a, period=MARCH, group_by="day")
    assert _plain(rows) == [("2026-03-01", 100, 50, 1), ("2026-03-02", 1010, 205, 2), ("2026-03-15", 7, 3, 1)]
    daily = usage_daily(org=cast.org_a, period=MARCH)
    assert [d.key for d in daily] == [f"2026-03-{n:02d}" for n in range(1, 16)]
    assert [d.total_tokens for d in daily] == [150, 1215] + [0] * 12 + [10]


def test_a_period_includes_its_last_day_and_nothing_after(cast, ledger):
    one_day = UsagePeriod(since=date(2026, 3, 16), until=date(2026, 3, 16))
    assert _plain(usage_by(org=cast.org_a, period=one_day, group_by="model")) == [("gpt-4o-mini", 888, 888, 1)]
    feb = UsagePeriod(since=date(2026, 2, 1), until=date(2026, 2, 28))
    assert _plain(usage_by(org=cast.org_a, period=feb, group_by="day")) == [("2026-02-28", 999, 999, 1)]


def test_another_orgs_usage_never_counts(cast, ledger):
    rows = usage_by(org=cast.org_b, period=MARCH, group_by="provider")
    assert _plain(rows) == [("openai", 5000, 5000, 1)]


@freeze_time(NOW)
def test_period_defaults_and_limits():
    assert usage_period(None, None) == UsagePeriod(date(2026, 3, 1), date(2026, 3, 15))
    assert usage_period(date(2026, 1, 10), None) == UsagePeriod(date(2026, 1, 10), date(2026, 3, 15))
    assert usage_period(None, date(2026, 2, 20)) == UsagePeriod(date(2026, 2, 1), date(2026, 2, 20))
    with pytest.raises(PeriodError) as reversed_range:
        usage_period(date(2026, 3, 2), date(2026, 3, 1))
    assert reversed_range.value.field == "until"
    with pytest.raises(PeriodError) as too_long:
        usage_period(date(2025, 1, 1), date(2026, 1, 2))
    assert too_long.value.field == "since"
    assert usage_period(date(2025, 1, 1), date(2025, 1, 1) + (date(2026, 1, 1) - date(2025, 1, 1)))
    assert MAX_PERIOD_DAYS == 366


# --- The chart ------------------------------------------------------------------------------------------------------


def test_chart_is_inline_svg_with_a_bar_and_a_hover_title_per_day_and_no_inline_style(cast, ledger):
    svg = str(daily_chart_svg(usage_daily(org=cast.org_a, period=MARCH), title="Tokens per day"))
    assert svg.startswith('<svg class="chart" xmlns="http://www.w3.org/2000/svg"')
    assert svg.endswith("</svg>")
    assert svg.count('<g class="chart-bar">') == 15
    assert "<title>2026-03-02: 1,010 input + 205 output = 1,215 tokens (2 calls)</title>" in svg
    assert '<desc id="usage-chart-desc">1,375 tokens in total. Busiest day: 2026-03-02 with 1,215 tokens.</desc>' in svg
    # The CSP forbids inline styles: colours come from classes.
    assert "style" not in svg
    assert "<script" not in svg


def test_chart_bar_heights_are_proportional_to_tokens():
    days = [
        UsageRow(key="2026-03-01", day=date(2026, 3, 1), input_tokens=100, output_tokens=100, calls=1),
        UsageRow(key="2026-03-02", day=date(2026, 3, 2), input_tokens=50, output_tokens=0, calls=1),
    ]
    svg = str(daily_chart_svg(days, title="t"))
    heights = [
        float(h)
        for h in re.findall(r'<rect class="chart-input" x="[\d.]+" y="[\d.]+" width="[\d.]+" height="([\d.]+)"', svg)
    ]
    assert heights[0] == pytest.approx(2 * heights[1], abs=0.1)


def test_empty_chart_says_so():
    svg = str(
        daily_chart_svg(
            [UsageRow(key="2026-03-01", day=date(2026, 3, 1), input_tokens=0, output_tokens=0, calls=0)], title="t"
        )
    )
    assert "No usage in this period." in svg


def test_axis_numbers_are_compact_and_round():
    assert [compact_number(v) for v in (0, 950, 1000, 1250, 2_500_000, 3_000_000_000)] == [
        "0",
        "950",
        "1k",
        "1.2k",
        "2.5M",
        "3G",
    ]
    assert [nice_ceiling(v) for v in (0, 3, 5, 99, 101, 1234, 41_000)] == [4, 4, 8, 100, 200, 2000, 80_000]


# --- The page -------------------------------------------------------------------------------------------------------


@freeze_time(NOW)
def test_usage_page_shows_this_month_by_provider_model_and_member_and_the_chart(cast, ledger):
    response = cast.dev_a.client().get(USAGE)
    assert response.status_code == 200
    content = response.content.decode()
    assert response.context["period"] == MARCH
    assert _plain(response.context["by_provider"]) == [("anthropic", 1000, 200, 1), ("openai", 117, 58, 3)]
    assert [r.key for r in response.context["by_member"]] == [ledger.key_label, "dave2@a.example", "temp@a.example"]
    assert response.context["totals"].total_tokens == 1375
    assert '<svg class="chart"' in content
    assert "1,375" in content
    assert "dave2@a.example" in content
    assert "claude-s" in content
    # Org B's numbers are nowhere.
    assert "5,000" not in content
    assert "No cap is set" in content
    # The inputs show the period the page is about, and the export asks for exactly that period.
    assert 'name="since" value="2026-03-01"' in content
    assert f'href="{USAGE_CSV}?since=2026-03-01&amp;until=2026-03-15"' in content
    assert re.search(r"<[^>]+ style=", content) is None


@freeze_time(NOW)
def test_usage_page_shows_the_cap_and_how_much_is_used(cast, ledger):
    org_update(org=cast.org_a, actor=cast.admin_a.user, monthly_token_cap=1000)
    content = cast.dev_a.client().get(USAGE).content.decode()
    # Everything since March 1 counts against the cap: 150 + 15 + 1200 + 10 + 1776.
    assert "3,151 of 1,000 tokens used this month (100%)" in content
    assert "The cap is reached" in content
    assert '<progress class="cap-meter cap-reached" max="1000" value="1000">' in content


@freeze_time(NOW)
def test_usage_page_filters_by_dates_and_refuses_bad_ones(cast, ledger):
    client = cast.dev_a.client()
    response = client.get(USAGE, {"since": "2026-03-02", "until": "2026-03-02"})
    assert _plain(response.context["by_model"]) == [("claude-s", 1000, 200, 1), ("gpt-4o-mini", 10, 5, 1)]
    for bad in ({"since": "yesterday"}, {"since": "2026-03-05", "until": "2026-03-01"}, {"since": "2020-01-01"}):
        response = client.get(USAGE, bad)
        assert response.status_code == 400, bad
        assert "chart" not in response.context


@freeze_time(NOW)
def test_usage_page_query_count_does_not_grow_with_the_ledger(cast, ledger):
    client = cast.dev_a.client()
    client.get(USAGE)

    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert client.get(USAGE).status_code == 200
        return len(queries)

    before = count()
    for n in range(20):
        _record(ledger.dev_run, f"2026-03-{(n % 14) + 1:02d}T08:00:00", 1, 1, model=f"model-{n}")
    assert count() == before
    # session, user, membership + org, then provider, day, model and member totals
    assert before == 7


# --- CSV ------------------------------------------------------------------------------------------------------------


def _csv(response) -> list[list[str]]:
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"].startswith('attachment; filename="usage-org-a-')
    return list(csv.reader(io.StringIO(response.content.decode())))


@freeze_time(NOW)
def test_csv_export_lists_the_period_per_day_provider_model_and_member(cast, ledger):
    rows = _csv(cast.dev_a.client().get(USAGE_CSV))
    assert rows == [
        USAGE_CSV_HEADER,
        ["2026-03-01", "openai", "gpt-4o-mini", "dave2@a.example", "100", "50", "150", "1", "0"],
        ["2026-03-02", "anthropic", "claude-s", ledger.key_label, "1000", "200", "1200", "1", "1"],
        ["2026-03-02", "openai", "gpt-4o-mini", "dave2@a.example", "10", "5", "15", "1", "0"],
        ["2026-03-15", "openai", "gpt-4.1", "temp@a.example", "7", "3", "10", "1", "0"],
    ]


@freeze_time(NOW)
def test_csv_export_uses_the_same_filters_and_refuses_bad_ones(cast, ledger):
    client = cast.dev_a.client()
    rows = _csv(client.get(USAGE_CSV, {"since": "2026-03-16", "until": "2026-03-16"}))
    assert rows[1:] == [["2026-03-16", "openai", "gpt-4o-mini", "dave2@a.example", "888", "888", "1776", "1", "0"]]
    response = client.get(USAGE_CSV, {"until": "not-a-date"})
    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/plain")


@freeze_time(NOW)
def test_csv_export_neutralizes_formulas_in_models_and_member_labels(cast):
    key = _key(cast.org_a, cast.admin_a.user, "main")
    evil = User.objects.create_user(email="=cmd@a.example", password="x" * 12)
    cast.org_a.memberships.create(user=evil, role=Role.DEVELOPER)
    for model in ('=HYPERLINK("http://x")', "+1+2", "-3", "@SUM(A1)", "\tTAB"):
        run = run_create(org=cast.org_a, actor=evil, provider_key_id=key.id, model=model.strip(), objective="x")
        _record(run, "2026-03-03T00:00:00", 1, 1, model=model)
    rows = _csv(cast.admin_a.client().get(USAGE_CSV))
    models = sorted(row[2] for row in rows[1:])
    assert models == sorted(['\'=HYPERLINK("http://x")', "'+1+2", "'-3", "'@SUM(A1)", "'\tTAB"])
    assert {row[3] for row in rows[1:]} == {"'=cmd@a.example"}


# --- API ------------------------------------------------------------------------------------------------------------


@freeze_time(NOW)
def test_api_usage_by_provider(cast, ledger):
    response = cast.dev_a.api().get(API, {"group_by": "provider"})
    assert response.status_code == 200, response.content
    assert response.json() == {
        "since": "2026-03-01",
        "until": "2026-03-15",
        "group_by": "provider",
        "results": [
            {"key": "anthropic", "input_tokens": 1000, "output_tokens": 200, "total_tokens": 1200, "calls": 1},
            {"key": "openai", "input_tokens": 117, "output_tokens": 58, "total_tokens": 175, "calls": 3},
        ],
        "totals": {"input_tokens": 1117, "output_tokens": 258, "total_tokens": 1375, "calls": 4},
        "monthly_token_cap": None,
        "tokens_used_this_month": 3151,
    }


@freeze_time(NOW)
def test_api_usage_by_member_names_the_user_or_api_key(cast, ledger):
    body = cast.admin_a.api().get(API, {"group_by": "member"}).json()
    assert [(r["key"], r["user_id"], r["api_key_id"], r["total_tokens"]) for r in body["results"]] == [
        (ledger.key_label, None, str(cast.admin_a.api_key.id), 1200),
        ("dave2@a.example", str(cast.dev_a.user.id), None, 165),
        ("temp@a.example", None, None, 10),
    ]


@freeze_time(NOW)
def test_api_usage_by_day_and_model_with_a_period(cast, ledger):
    body = cast.dev_a.api().get(API, {"since": "2026-03-02", "until": "2026-03-16", "group_by": "day"}).json()
    assert [(r["key"], r["total_tokens"]) for r in body["results"]] == [
        ("2026-03-02", 1215),
        ("2026-03-15", 10),
        ("2026-03-16", 1776),
    ]
    body = cast.dev_a.api().get(API, {"group_by": "model", "since": "2026-03-16"}).json()
    assert body["until"] == "2026-03-16"
    assert [(r["key"], r["calls"]) for r in body["results"]] == [("gpt-4o-mini", 1)]


@freeze_time(NOW)
def test_api_usage_defaults_to_days_of_this_month(cast, ledger):
    body = cast.dev_a.api().get(API).json()
    assert body["group_by"] == "day"
    assert (body["since"], body["until"]) == ("2026-03-01", "2026-03-15")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"since": "2026-13-01"}, "since"),
        ({"until": "yesterday"}, "until"),
        ({"since": "2026-03-01T00:00:00Z"}, "since"),
        ({"since": "2026-03-05", "until": "2026-03-01"}, "until"),
        ({"since": "2024-01-01", "until": "2026-01-01"}, "since"),
        ({"group_by": "org"}, "group_by"),
    ],
)
def test_api_usage_refuses_bad_input_with_the_error_shape(cast, query, field):
    response = cast.dev_a.api().get(API, query)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert field in error["details"]["fields"]


def test_api_usage_needs_credentials(cast):
    from rest_framework.test import APIClient

    response = APIClient().get(API)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


def test_api_usage_for_a_user_without_an_org_is_404(cast):
    response = cast.outsider.session_api().get(API)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_api_usage_needs_the_usage_read_scope(cast):
    scopes = sorted(DEVELOPER_CAPABILITIES - {USAGE_READ})
    _key_row, secret = api_key_create(org=cast.org_a, name="no usage", actor=cast.admin_a.user, scopes=scopes)
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_X_API_KEY=secret)
    response = client.get(API)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


@freeze_time(NOW)
def test_api_usage_of_org_b_sees_only_org_b(cast, ledger):
    body = cast.dev_b.api().get(API, {"group_by": "provider"}).json()
    assert body["totals"]["total_tokens"] == 10_000
    assert [r["key"] for r in body["results"]] == ["openai"]


# --- The tenant gate on the pages -----------------------------------------------------------------------------------


def test_anonymous_visitors_are_sent_to_log_in_from_usage_pages(client):
    for url in (USAGE, USAGE_CSV):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("orgs:login"))


def test_outsider_is_sent_to_create_an_org_from_usage_pages(cast):
    for url in (USAGE, USAGE_CSV):
        response = cast.outsider.client().get(url)
        assert response.status_code == 302
        assert response["Location"] == reverse("orgs:org_create")


def test_admins_and_developers_may_read_usage(cast):
    for member in (cast.admin_a, cast.dev_a):
        assert member.client().get(USAGE).status_code == 200
        assert member.client().get(USAGE_CSV).status_code == 200


# --- The monthly token cap setting ----------------------------------------------------------------------------------


def test_admin_sets_and_removes_the_monthly_token_cap_and_it_is_audited(cast):
    client = cast.admin_a.client()
    assert 'name="monthly_token_cap"' in client.get(reverse("orgs:settings")).content.decode()
    response = client.post(
        reverse("orgs:settings"), {"name": "Org A", "monthly_token_cap": "250000", "agents_may_run_commands": "on"}
    )
    assert response.status_code == 302
    cast.org_a.refresh_from_db()
    assert cast.org_a.monthly_token_cap == 250_000
    event = AuditEvent.objects.get(event=AuditEvent.ORG_SETTINGS_CHANGED)
    assert event.metadata == {"changes": {"monthly_token_cap": [None, 250_000]}}
    assert event.actor_user_id == cast.admin_a.user.id

    client.post(reverse("orgs:settings"), {"name": "Org A", "monthly_token_cap": "", "agents_may_run_commands": "on"})
    cast.org_a.refresh_from_db()
    assert cast.org_a.monthly_token_cap is None
    latest = AuditEvent.objects.filter(event=AuditEvent.ORG_SETTINGS_CHANGED).order_by("-created_at").first()
    assert latest is not None
    assert latest.metadata == {"changes": {"monthly_token_cap": [250_000, None]}}


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "lots", str(MONTHLY_TOKEN_CAP_MAX + 1)])
def test_invalid_caps_are_form_errors(cast, value):
    response = cast.admin_a.client().post(reverse("orgs:settings"), {"name": "Renamed", "monthly_token_cap": value})
    assert response.status_code == 200
    assert "monthly_token_cap" in response.context["form"].errors
    cast.org_a.refresh_from_db()
    assert (cast.org_a.name, cast.org_a.monthly_token_cap) == ("Org A", None)


def test_developer_cannot_change_the_cap(cast):
    response = cast.dev_a.client().post(reverse("orgs:settings"), {"name": "Org A", "monthly_token_cap": "1"})
    assert response.status_code == 403
    cast.org_a.refresh_from_db()
    assert cast.org_a.monthly_token_cap is None
    assert not AuditEvent.objects.filter(event=AuditEvent.ORG_SETTINGS_CHANGED).exists()


def test_org_update_refuses_a_bad_cap_without_changing_anything(cast):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as refused:
        org_update(org=cast.org_a, actor=cast.admin_a.user, name="New name", monthly_token_cap=0)
    assert "monthly_token_cap" in refused.value.message_dict
    assert cast.org_a.name == "Org A"
    cast.org_a.refresh_from_db()
    assert cast.org_a.name == "Org A"


def test_org_update_leaves_the_cap_alone_unless_asked(cast):
    org_update(org=cast.org_a, actor=cast.admin_a.user, monthly_token_cap=500)
    org_update(org=cast.org_a, actor=cast.admin_a.user, name="Renamed")
    cast.org_a.refresh_from_db()
    assert (cast.org_a.name, cast.org_a.monthly_token_cap) == ("Renamed", 500)
    changes = [e.metadata["changes"] for e in AuditEvent.objects.filter(event=AuditEvent.ORG_SETTINGS_CHANGED)]
    assert sorted(map(sorted, changes)) == [["monthly_token_cap"], ["name"]]


@pytest.mark.parametrize("path", ["/usage/", "/usage.csv"])
def test_the_last_representable_day_is_a_form_error_not_a_500(cast, path):
    response = cast.dev_a.client().get(path, {"since": "9999-12-01", "until": "9999-12-31"})
    assert response.status_code in {200, 400}


def test_api_refuses_the_last_representable_day_with_a_400(cast):
    response = cast.dev_a.api().get(API, {"since": "9999-12-01", "until": "9999-12-31"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "validation_error"
