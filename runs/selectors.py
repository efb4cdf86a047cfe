"""Reads of run and audit data, always scoped to an org."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import UTC, date, datetime, time, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import F, Q, QuerySet, Sum
from django.utils import timezone

from orgs.models import Organization
from runs.models import AuditEvent, Run, RunKind, RunStatus, UsageRecord


def audit_events_for_org(
    *,
    org: Organization,
    event: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[AuditEvent]:
    """The org's audit trail, newest first. ``actor`` matches a user id, an API key id or the actor label
    (case-insensitive substring, e.g. part of an email)."""
    events = AuditEvent.objects.filter(org=org).select_related("actor_user", "actor_api_key")
    if event:
        events = events.filter(event=event)
    if actor:
        match = Q(actor_label__icontains=actor)
        if _looks_like_uuid(actor):
            match |= Q(actor_user_id=actor) | Q(actor_api_key_id=actor)
        events = events.filter(match)
    if since is not None:
        events = events.filter(created_at__gte=since)
    if until is not None:
        events = events.filter(created_at__lt=until)
    return events.order_by("-created_at", "-id")


def _looks_like_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


# --- Runs and usage -----------------------------------------------------------------------------------------


def run_get_for_org(*, org: Organization, run_id: uuid.UUID | str) -> Run | None:
    """The org's run with this id, or None (another org's run and a missing one look the same)."""
    try:
        return Run.objects.select_related("provider_key", "created_by_user", "created_by_api_key").get(
            org=org, id=run_id
        )
    except (Run.DoesNotExist, ValidationError, ValueError, TypeError):
        return None


def runs_for_org(
    *,
    org: Organization,
    status: str | None = None,
    kind: str | None = None,
    created_by: str | None = None,
) -> QuerySet[Run]:
    """The org's runs, newest first. ``created_by`` is a user id or an API key id."""
    runs = Run.objects.filter(org=org).select_related("provider_key", "created_by_user", "created_by_api_key")
    if status:
        runs = runs.filter(status=status)
    if kind:
        runs = runs.filter(kind=kind)
    if created_by:
        if not _looks_like_uuid(created_by):
            return runs.none()
        runs = runs.filter(Q(created_by_user_id=created_by) | Q(created_by_api_key_id=created_by))
    return runs.order_by("-created_at", "-id")


def month_start(now: datetime | None = None) -> datetime:
    now = now or timezone.now()
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def tokens_used_this_month(*, org: Organization) -> int:
    """Input + output tokens of the org's provider calls since the start of this calendar month (UTC)."""
    return tokens_used_in_month(org_id=org.id, month=month_start().date())


def tokens_used_in_month(*, org_id: uuid.UUID, month: date) -> int:
    """Input + output tokens in the org's ledger for the calendar month (UTC) that starts on ``month``."""
    start = datetime.combine(month, time.min, tzinfo=UTC)
    end = datetime.combine((start + timedelta(days=32)).replace(day=1).date(), time.min, tzinfo=UTC)
    totals = UsageRecord.objects.filter(org_id=org_id, created_at__gte=start, created_at__lt=end).aggregate(
        total=Sum(F("input_tokens") + F("output_tokens"))
    )
    return int(totals["total"] or 0)


def unscoped_org_run_slots(*, org_ids: Collection[uuid.UUID], status: str) -> dict[uuid.UUID, int]:
    """The slots the chat and agent runs of these orgs in ``status`` (queued or running) take, per org (orgs
    without any are left out): a chat run takes one, an agent run ``RUN_AGENT_WEIGHT``. Proxy completions are
    requests, not executor work: they take none."""
    if not org_ids:
        return {}
    # Summed here, not in SQL: the rows are few (the caps bound them) and Django builds a plain query in about half
    # the time of an aggregate (``Sum(Case(When …))``), on the path of every claim and creation (issue #13).
    agent = int(settings.RUN_AGENT_WEIGHT)
    rows = (
        Run.objects.filter(org_id__in=list(org_ids), status=status, kind__in=[RunKind.CHAT, RunKind.AGENT])
        .order_by()
        .values_list("org_id", "kind")
    )
    taken: dict[uuid.UUID, int] = {}
    for org_id, kind in rows:
        taken[org_id] = taken.get(org_id, 0) + (agent if kind == RunKind.AGENT else 1)
    return taken


# --- Executor reads (no org: the executor acts for whichever org queued the run) ------------------------------


# What executing a run reads beside it: its org's settings, its key, its creator.
EXECUTION_RELATED = ("org", "provider_key", "created_by_user", "created_by_api_key")


def unscoped_run_for_execution(*, run_id: uuid.UUID) -> Run | None:
    """The run with its key and creator, for the executor that claimed it."""
    return Run.objects.select_related(*EXECUTION_RELATED).filter(id=run_id).first()


def unscoped_runs_to_stop(*, run_ids: list[uuid.UUID], worker_id: str) -> dict[uuid.UUID, str]:
    """Which of an executor's runs must stop, and why: ``cancelled`` (someone asked) or ``lost`` (the run ended
    elsewhere or belongs to another executor now: reaped after a stalled heartbeat). One query for all of them."""
    if not run_ids:
        return {}
    rows = Run.objects.filter(id__in=run_ids).values_list("id", "status", "worker_id", "cancel_requested_at")
    # A run that is gone altogether (its org was deleted) is lost too.
    found: dict[uuid.UUID, str] = dict.fromkeys(run_ids, "lost")
    for run_id, status, owner, cancel_requested_at in rows:
        if status == RunStatus.RUNNING and owner == worker_id:
            if cancel_requested_at is None:
                del found[run_id]
            else:
                found[run_id] = "cancelled"
    return found


def unscoped_runs_still_queued(*, run_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of these runs are still queued (an executor forgets the runs handed to it that will never start)."""
    if not run_ids:
        return set()
    return set(Run.objects.filter(id__in=run_ids, status=RunStatus.QUEUED).values_list("id", flat=True))
