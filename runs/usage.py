"""The usage ledger, read: token totals by provider, model, member or day, and the daily bar chart as inline SVG.

Reads only, always scoped to an org (``UsageRecord`` is append-only; ``runs.services.run_finish`` writes it).
Periods are whole UTC days with an inclusive ``until``, the same as the audit filters. The chart is rendered on
the server so it reads without JavaScript, and it carries no ``style`` attribute (the CSP forbids inline
styles): colours come from classes in ``static/css/app.css``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from django.db.models import Case, CharField, Count, F, Max, Q, QuerySet, Sum, Value, When
from django.db.models.functions import TruncDate
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from keys.models import Provider
from orgs.models import Organization
from runs.models import UsageRecord

GroupBy = Literal["provider", "model", "member", "day"]
GROUP_BYS: tuple[GroupBy, ...] = ("provider", "model", "member", "day")
# A year and a day: a whole year compared with the same day a year earlier. Longer ranges belong in the CSV.
MAX_PERIOD_DAYS = 366
UNKNOWN_MEMBER = "(deleted user or key)"


@dataclass(frozen=True)
class UsagePeriod:
    """Whole UTC days from ``since`` to ``until``, both included."""

    since: date
    until: date

    @classmethod
    def this_month(cls, now: datetime | None = None) -> UsagePeriod:
        today = (now or timezone.now()).astimezone(UTC).date()
        return cls(since=today.replace(day=1), until=today)

    @property
    def start(self) -> datetime:
        return datetime.combine(self.since, time.min, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        """Exclusive: midnight after ``until``."""
        return datetime.combine(self.until + timedelta(days=1), time.min, tzinfo=UTC)

    @property
    def days(self) -> list[date]:
        return [self.since + timedelta(days=n) for n in range((self.until - self.since).days + 1)]


class PeriodError(ValueError):
    """The filters do not make a usable period; ``field`` names the culprit, the message is for people."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def usage_period(since: date | None, until: date | None) -> UsagePeriod:
    """The period the filters ask for, shared by the page, the CSV export and the API so they accept and refuse
    the same things. Nothing given: this month so far; only ``since``: up to today; only ``until``: from the
    first of that month. Raises ``PeriodError``."""
    default = UsagePeriod.this_month()
    if since is None and until is None:
        return default
    for name, value in (("since", since), ("until", until)):
        if value is not None and value >= date.max:
            raise PeriodError(name, "Choose a date before the year 9999.")
    if since is None:
        assert until is not None  # noqa: S101 (narrowing: both None returned above)
        since = until.replace(day=1)
    if until is None:
        until = max(default.until, since)
    if since > until:
        raise PeriodError("until", "“until” must be on or after “since”.")
    if (until - since).days + 1 > MAX_PERIOD_DAYS:
        raise PeriodError("since", f"Choose a period of at most {MAX_PERIOD_DAYS} days.")
    return UsagePeriod(since=since, until=until)


@dataclass(frozen=True)
class UsageRow:
    """Token totals of one group (a provider, a model, a member or a day)."""

    key: str
    input_tokens: int
    output_tokens: int
    calls: int
    # Only for group_by=member: who it was (a user or an org API key; both None once they are deleted).
    user_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    # Only for group_by=day.
    day: date | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def label(self) -> str:
        """How a person reads the key: provider display names, everything else as is."""
        if self.key in Provider.values:
            return str(Provider(self.key).label)
        return self.key


def usage_records_for_org(*, org: Organization, period: UsagePeriod) -> QuerySet[UsageRecord]:
    return UsageRecord.objects.filter(org=org, created_at__gte=period.start, created_at__lt=period.end)


_SUMS: dict[str, Any] = {
    "in_tokens": Sum("input_tokens", default=0),
    "out_tokens": Sum("output_tokens", default=0),
    "n_calls": Count("id"),
}


def _member_groups(records: QuerySet[UsageRecord]) -> QuerySet[UsageRecord, dict[str, Any]]:
    # Grouped by who (user id, API key id), not by the label snapshot, so an email change does not split a
    # member in two; runs whose creator is gone keep their label as the only thing left to group by.
    return (
        records.values(
            member_user=F("run__created_by_user_id"),
            member_api_key=F("run__created_by_api_key_id"),
            orphan_label=Case(
                When(
                    run__created_by_user__isnull=True,
                    run__created_by_api_key__isnull=True,
                    then="run__created_by_label",
                ),
                default=Value(""),
                output_field=CharField(),
            ),
        )
        .annotate(email=Max("run__created_by_user__email"), snapshot=Max("run__created_by_label"), **_SUMS)
        .order_by()
    )


def usage_by(*, org: Organization, period: UsagePeriod, group_by: GroupBy) -> list[UsageRow]:
    """One row per group: busiest first (days in calendar order), ties broken by name for a stable order."""
    records = usage_records_for_org(org=org, period=period)
    rows: list[UsageRow] = []
    if group_by == "member":
        for group in _member_groups(records):
            if group["member_user"]:
                key = group["email"] or group["snapshot"]
            elif group["member_api_key"]:
                key = group["snapshot"]
            else:
                key = group["orphan_label"] or UNKNOWN_MEMBER
            rows.append(
                UsageRow(
                    key=key,
                    input_tokens=group["in_tokens"],
                    output_tokens=group["out_tokens"],
                    calls=group["n_calls"],
                    user_id=group["member_user"],
                    api_key_id=group["member_api_key"],
                )
            )
    elif group_by == "day":
        days = records.annotate(on=TruncDate("created_at", tzinfo=UTC)).values("on").annotate(**_SUMS).order_by("on")
        return [
            UsageRow(
                key=group["on"].isoformat(),
                day=group["on"],
                input_tokens=group["in_tokens"],
                output_tokens=group["out_tokens"],
                calls=group["n_calls"],
            )
            for group in days
        ]
    else:
        field = "provider" if group_by == "provider" else "model"
        for group in records.values(field).annotate(**_SUMS).order_by():
            rows.append(
                UsageRow(
                    key=group[field],
                    input_tokens=group["in_tokens"],
                    output_tokens=group["out_tokens"],
                    calls=group["n_calls"],
                )
            )
    rows.sort(key=lambda row: (-row.total_tokens, row.key))
    return rows


def usage_totals(rows: Sequence[UsageRow]) -> UsageRow:
    """The sum of some rows (any grouping: every ledger row is in exactly one group)."""
    return UsageRow(
        key="total",
        input_tokens=sum(r.input_tokens for r in rows),
        output_tokens=sum(r.output_tokens for r in rows),
        calls=sum(r.calls for r in rows),
    )


def usage_daily(*, org: Organization, period: UsagePeriod) -> list[UsageRow]:
    """Every day of the period in order, days without usage included (as zeros), for the chart."""
    found = {row.day: row for row in usage_by(org=org, period=period, group_by="day")}
    return [
        found.get(day) or UsageRow(key=day.isoformat(), day=day, input_tokens=0, output_tokens=0, calls=0)
        for day in period.days
    ]


@dataclass(frozen=True)
class UsageDetail:
    """One CSV line: a day, a provider, a model and a member."""

    day: date
    provider: str
    model: str
    member: str
    input_tokens: int
    output_tokens: int
    calls: int
    incomplete_calls: int


def usage_details(*, org: Organization, period: UsagePeriod) -> Iterator[UsageDetail]:
    """The period's ledger, summed per day, provider, model and member, in that order (the CSV export)."""
    groups = (
        usage_records_for_org(org=org, period=period)
        .values(
            on=TruncDate("created_at", tzinfo=UTC),
            prov=F("provider"),
            mdl=F("model"),
            member_user=F("run__created_by_user_id"),
            member_api_key=F("run__created_by_api_key_id"),
            member_label=Case(
                When(run__created_by_user__isnull=False, then="run__created_by_user__email"),
                default="run__created_by_label",
                output_field=CharField(),
            ),
        )
        .annotate(incomplete=Count("id", filter=Q(complete=False)), **_SUMS)
        .order_by("on", "prov", "mdl", "member_label")
    )
    for group in groups.iterator(chunk_size=2000):
        yield UsageDetail(
            day=group["on"],
            provider=group["prov"],
            model=group["mdl"],
            member=group["member_label"] or UNKNOWN_MEMBER,
            input_tokens=group["in_tokens"],
            output_tokens=group["out_tokens"],
            calls=group["n_calls"],
            incomplete_calls=group["incomplete"],
        )


# --- The daily bar chart ------------------------------------------------------------------------------------------

_W, _H = 760, 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 16, 44


def compact_number(value: float) -> str:
    """1234 -> "1.2k", 3_000_000 -> "3M": axis labels that fit."""
    for threshold, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if abs(value) >= threshold:
            text = f"{value / threshold:.1f}".removesuffix(".0")
            return f"{text}{suffix}"
    return f"{value:g}"


def nice_ceiling(value: int) -> int:
    """The chart's top: four equal whole gridline steps (1, 2, 2.5 or 5 times a power of ten) covering ``value``."""
    needed = max(value / 4, 1)
    magnitude = 10 ** math.floor(math.log10(needed))
    multiples = (1, 2, 2.5, 5, 10) if magnitude >= 10 else (1, 2, 5, 10)
    step = next(m * magnitude for m in multiples if m * magnitude >= needed)
    return int(step * 4)


def daily_chart_svg(days: Sequence[UsageRow], *, title: str) -> SafeString:
    """Stacked bars (input below, output above) per day, with gridlines, axis labels, a legend and a ``<title>``
    per bar (the hover text). Pure: the same rows give the same SVG."""
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    peak = max((d.total_tokens for d in days), default=0)
    top = nice_ceiling(peak)
    scale = plot_h / top
    slot = plot_w / max(len(days), 1)
    bar_w = max(slot * 0.72, 1.0)
    base_y = _TOP + plot_h
    total = sum(d.total_tokens for d in days)
    busiest = max(days, key=lambda d: d.total_tokens, default=None)
    summary = f"{total:,} tokens in total."
    if busiest is not None and busiest.total_tokens:
        summary += f" Busiest day: {busiest.key} with {busiest.total_tokens:,} tokens."

    parts: list[SafeString] = [
        format_html(
            '<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {} {}" role="img" '
            'aria-labelledby="usage-chart-title usage-chart-desc" preserveAspectRatio="xMidYMid meet">'
            '<title id="usage-chart-title">{}</title><desc id="usage-chart-desc">{}</desc>',
            _W,
            _H,
            title,
            summary,
        )
    ]
    # Horizontal gridlines with their values on the left.
    for step in range(5):
        value = top * step / 4
        y = base_y - value * scale
        parts.append(
            format_html(
                '<line class="chart-grid" x1="{}" y1="{}" x2="{}" y2="{}"/>'
                '<text class="chart-label" x="{}" y="{}" text-anchor="end" dominant-baseline="middle">{}</text>',
                _LEFT,
                f"{y:.1f}",
                _W - _RIGHT,
                f"{y:.1f}",
                _LEFT - 8,
                f"{y:.1f}",
                compact_number(value),
            )
        )
    # At most ~12 day labels, so they never overlap.
    label_every = max(1, math.ceil(len(days) / 12))
    for index, day in enumerate(days):
        x = _LEFT + index * slot + (slot - bar_w) / 2
        in_h = day.input_tokens * scale
        out_h = day.output_tokens * scale
        hover = (
            f"{day.key}: {day.input_tokens:,} input + {day.output_tokens:,} output = {day.total_tokens:,} tokens"
            f" ({day.calls:,} call{'s' if day.calls != 1 else ''})"
        )
        parts.append(
            format_html(
                '<g class="chart-bar"><title>{}</title>'
                '<rect class="chart-slot" x="{}" y="{}" width="{}" height="{}"/>'
                '<rect class="chart-input" x="{}" y="{}" width="{}" height="{}"/>'
                '<rect class="chart-output" x="{}" y="{}" width="{}" height="{}"/></g>',
                hover,
                f"{_LEFT + index * slot:.1f}",
                _TOP,
                f"{slot:.1f}",
                plot_h,
                f"{x:.1f}",
                f"{base_y - in_h:.1f}",
                f"{bar_w:.1f}",
                f"{in_h:.1f}",
                f"{x:.1f}",
                f"{base_y - in_h - out_h:.1f}",
                f"{bar_w:.1f}",
                f"{out_h:.1f}",
            )
        )
        if index % label_every == 0 and day.day is not None:
            parts.append(
                format_html(
                    '<text class="chart-label" x="{}" y="{}" text-anchor="middle">{}</text>',
                    f"{x + bar_w / 2:.1f}",
                    base_y + 16,
                    f"{day.day:%b} {day.day.day}" if label_every > 1 or index == 0 or day.day.day == 1 else day.day.day,
                )
            )
    parts.append(
        format_html('<line class="chart-axis" x1="{}" y1="{}" x2="{}" y2="{}"/>', _LEFT, base_y, _W - _RIGHT, base_y)
    )
    # Legend, bottom right.
    legend_y = _H - 10
    parts.append(
        format_html(
            '<g class="chart-legend"><rect class="chart-input" x="{}" y="{}" width="10" height="10"/>'
            '<text class="chart-label" x="{}" y="{}">input tokens</text>'
            '<rect class="chart-output" x="{}" y="{}" width="10" height="10"/>'
            '<text class="chart-label" x="{}" y="{}">output tokens</text></g>',
            _W - 230,
            legend_y - 9,
            _W - 215,
            legend_y,
            _W - 120,
            legend_y - 9,
            _W - 105,
            legend_y,
        )
    )
    if not total:
        parts.append(
            format_html(
                '<text class="chart-empty" x="{}" y="{}" text-anchor="middle">No usage in this period.</text>',
                _LEFT + plot_w / 2,
                _TOP + plot_h / 2,
            )
        )
    parts.append(mark_safe("</svg>"))
    return mark_safe("".join(parts))  # noqa: S308 (every part above went through format_html)
