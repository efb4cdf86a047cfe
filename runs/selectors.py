"""Reads of run and audit data, always scoped to an org."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from django.core.exceptions import ValidationError
from django.db.models import F, Q, QuerySet, Sum
from django.utils import timezone

from orgs.models import Organization
from runs.models import AuditEvent, Run, RunStatus, UsageRecord


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
    totals = UsageRecord.objects.filter(org=org, created_at__gte=month_start()).aggregate(
        total=Sum(F("input_tokens") + F("output_tokens"))
    )
    return int(totals["total"] or 0)


# --- Executor reads (no org: the executor acts for whichever org queued the run) ------------------------------


def unscoped_run_for_execution(*, run_id: uuid.UUID) -> Run | None:
    """The run with its key and creator, for the executor that claimed it."""
    return (
        Run.objects.select_related("org", "provider_key", "created_by_user", "created_by_api_key")
        .filter(id=run_id)
        .first()
    )


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
