"""Writes for runs, the usage ledger and the audit trail."""

from __future__ import annotations

import dataclasses
import enum
import logging
import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.db.models.functions import Now
from django.utils import timezone

from keys.models import KeyStatus, ProviderKey
from keys.selectors import provider_key_get_usable_for_org
from keys.services import provider_key_record_use
from orgs.models import Actor, ApiKey, Organization, User, actor_label
from orgs.permissions import ORG_SUSPENDED
from orgs.services import org_update, signups_unconfirmed_purge
from runs import events
from runs.agent import AgentLimits
from runs.models import (
    TERMINAL_STATUSES,
    AuditEvent,
    Project,
    Run,
    RunKind,
    RunStatus,
)

# Claiming, ending runs and the token cap's reservations have modules of their own; what callers use is
# re-exported here.
from runs.services.claiming import ORG_RUN_QUEUE_FULL as ORG_RUN_QUEUE_FULL
from runs.services.claiming import org_queue_check, record_key_openings, run_claim_on_attach, running_fields
from runs.services.claiming import run_claim as run_claim
from runs.services.claiming import runs_claim_queued as runs_claim_queued
from runs.services.ending import FINISH_COLUMNS as FINISH_COLUMNS
from runs.services.ending import MODEL_MAX_CHARS as MODEL_MAX_CHARS
from runs.services.ending import RunEnd as RunEnd
from runs.services.ending import UsageEntry as UsageEntry
from runs.services.ending import count_ended
from runs.services.ending import run_finish as run_finish
from runs.services.ending import run_usage_add as run_usage_add
from runs.services.ending import runs_finish as runs_finish
from runs.services.tokens import TOKEN_CAP_REACHED as TOKEN_CAP_REACHED
from runs.services.tokens import run_first_call_estimate, tokens_release, tokens_reserve
from runs.services.tokens import tokens_estimate as tokens_estimate

logger = logging.getLogger(__name__)


class Attached(enum.Enum):
    """What ``run_attach`` did with a run."""

    NOTHING = "nothing"  # not waiting for a watcher (already started, unwatched, or over)
    SUBMITTED = "submitted"  # handed to the executors once committed (by the caller, with ``submit=False``)
    CLAIMED = "claimed"  # claimed ``running`` for the caller's executor, which must now execute it


@transaction.atomic
def audit_purge(*, older_than_days: int) -> int:
    """Delete audit events older than ``older_than_days`` days; returns how many went. Idempotent."""
    if older_than_days < 1:
        raise ValueError("older_than_days must be at least 1")
    cutoff = timezone.now() - timedelta(days=older_than_days)
    deleted, _ = AuditEvent.objects.filter(created_at__lt=cutoff).delete()
    return deleted


# --- Runs ---------------------------------------------------------------------------------------------------

OBJECTIVE_MAX_CHARS = 8000
NOT_CANCELLABLE = "not_cancellable"

# Kinds whose runs wait for their watcher unless created with ``watch=False``: a chat run's answer *is* its stream.
WATCHED_BY_DEFAULT = frozenset({RunKind.CHAT})


def _actor_fields(actor: Actor) -> dict[str, Any]:
    return {
        "created_by_user": actor if isinstance(actor, User) else None,
        "created_by_api_key": actor if isinstance(actor, ApiKey) else None,
        "created_by_label": actor_label(actor),
    }


@transaction.atomic
def run_create(
    *,
    org: Organization,
    actor: Actor,
    provider_key_id: uuid.UUID | str | None = None,
    model: str,
    objective: str = "",
    kind: str = RunKind.CHAT,
    watch: bool | None = None,
    limits: Mapping[str, Any] | None = None,
    project: Project | None = None,
    created_by_label: str | None = None,
    publish_status: bool = True,
    token_estimate: int | None = None,
    held_key: ProviderKey | None = None,
    key_use: str | None = None,
    run_id: uuid.UUID | None = None,
) -> Run:
    """A new run. ``chat`` and ``agent`` runs are queued and handed to the executor after commit (refused with
    ``org_run_queue_full`` when the org's queue is full: ``runs.services.claiming``); ``completion`` runs (the
    proxy) start immediately in the caller's request.

    The org's monthly token cap: the run's first provider call is reserved against it here (refused with
    ``token_cap_reached`` when there is no room), ``token_estimate`` tokens if given (a proxy call: its prompt
    and max_tokens, ``runs.services.tokens.tokens_estimate``), else the estimate for the run's kind.

    ``watch`` (default: per kind, ``WATCHED_BY_DEFAULT``): the run calls the provider only once its stream is
    attached (``run_attach``); nobody within ``RUN_ATTACH_WINDOW_SECONDS`` → cancelled ``not_watched``, no tokens
    spent. ``watch=False`` starts at once, for callers who want the result (a workspace, the token count) rather
    than the stream.

    ``limits`` (agent runs): overrides of the deployment's ``AgentLimits``, validated against its caps; the run
    records the budgets it gets. ``project`` (agent runs, resolved in ``org`` by the caller): work in the project's
    persistent workspace. ``created_by_label``: who started it when neither a user nor a key did (a webhook).

    ``publish_status=False``: the caller publishes the run's first status event itself after commit (the proxy
    does it from its event loop without waiting, so Redis is not on the path to the first token).

    ``held_key`` instead of ``provider_key_id``: the key row the caller resolved in ``org`` during this request and
    is about to use (the gateway, from its generation-checked cache: a revocation replaces the generation, so the
    row is as fresh as a second read would be); it is held to the same rules (the org's, not revoked).

    ``key_use``: the purpose of an opening of the key that starts with the run (the gateway's call): its
    ``key.used`` audit row and ``last_used_at`` are written in the run's transaction, the run's id as reference.

    ``run_id``: the new run's id, chosen by the caller (the gateway names its answer after the run before the row is
    committed); a fresh one otherwise."""
    if org.is_suspended:
        # The gates refuse a suspended org before this (with the operators' reason); this is the wall every other
        # way in meets. No reason here: a webhook's refusal goes back to GitHub, for the repository's readers.
        raise ValidationError("This organization is suspended: no run can start.", code=ORG_SUSPENDED)
    if held_key is not None:
        key = held_key if held_key.org_id == org.id and held_key.status != KeyStatus.REVOKED else None
    elif provider_key_id is not None:
        key = provider_key_get_usable_for_org(org=org, key_id=provider_key_id)
    else:
        key = None
    if key is None:
        # Another org's key and a missing one look the same.
        raise ValidationError({"provider_key": "No such provider key."}, code="not_found")
    model = (model or "").strip()
    if not model or len(model) > MODEL_MAX_CHARS:
        raise ValidationError({"model": f"Choose a model (at most {MODEL_MAX_CHARS} characters)."})
    objective = (objective or "").strip()
    if kind == RunKind.CHAT and not objective:
        raise ValidationError({"objective": "Say what the run should do."})
    if len(objective) > OBJECTIVE_MAX_CHARS:
        raise ValidationError({"objective": f"Keep the objective under {OBJECTIVE_MAX_CHARS:,} characters."})
    if kind not in RunKind.values:
        raise ValidationError({"kind": "Unknown run kind."})
    if kind == RunKind.AGENT and not objective:
        raise ValidationError({"objective": "Say what the agent should build or do."})
    if limits and kind != RunKind.AGENT:
        raise ValidationError({"limits": "Only agent runs take limits."})
    if project is not None and (kind != RunKind.AGENT or project.org_id != org.id):
        raise ValidationError({"project": "Only agent runs of the project's organization work on a project."})
    run_limits: dict[str, Any] = {}
    if kind == RunKind.AGENT:
        try:
            run_limits = dataclasses.asdict(org_agent_limits(org=org).merged(limits or {}))
        except ValueError as exc:
            raise ValidationError({"limits": str(exc)}) from None
    if kind != RunKind.COMPLETION:
        org_queue_check(org=org, kind=kind)
    if token_estimate is None:
        token_estimate = run_first_call_estimate(kind=kind, objective=objective)
    estimate = max(0, token_estimate)
    reserved_in = tokens_reserve(org=org, estimate=estimate)
    now = timezone.now()
    starts_now = kind == RunKind.COMPLETION
    if watch is None:
        watch = kind in WATCHED_BY_DEFAULT
    run = Run.objects.create(
        id=run_id or uuid.uuid4(),
        org=org,
        kind=kind,
        objective=objective,
        provider_key=key,
        provider=key.provider,
        model=model,
        status=RunStatus.RUNNING if starts_now else RunStatus.QUEUED,
        started_at=now if starts_now else None,
        watch=watch and not starts_now,
        limits=run_limits,
        project=project,
        tokens_reserved=estimate if reserved_in is not None else 0,
        tokens_reserved_month=reserved_in,
        **_actor_fields(actor),
    )
    if created_by_label is not None and actor is None:
        run.created_by_label = created_by_label[:254]
        run.save(update_fields=["created_by_label"])
    if key_use is not None:
        provider_key_record_use(key=key, actor=actor, purpose=key_use, reference=str(run.id))
    transaction.on_commit(lambda: _after_create(run, publish_status=publish_status))
    return run


@transaction.atomic
def run_attach(*, run: Run, claim_for: str | None = None, submit: bool = True) -> Attached:
    """A watcher's stream is attached to ``run`` (already authorized for the caller's org): a watched run waiting
    for it is handed to the executors, once committed. Idempotent (later watchers join the stream).

    ``claim_for``: the id of an executor of this process holding a free slot for the run. The run is then claimed
    for it in the same transaction when it may start (``run_claim_on_attach``): ``run`` is updated in place
    (``running``, its org loaded) and the caller hands it to that executor; otherwise it is handed over as usual.
    ``submit=False``: the caller hands a ``SUBMITTED`` run over itself (``runs.executor.submit``) once this has
    returned, committed: a stream does so from its event loop, without its thread waiting for the workers' nudge."""
    now = timezone.now()
    claimed = claim_for is not None and run.waiting_for_watcher and run_claim_on_attach(run=run)
    fields: dict[str, Any] = {"attached_at": now}
    if claimed and claim_for is not None:
        fields |= running_fields(claim_for)
    started = (
        Run.objects.filter(id=run.id, status=RunStatus.QUEUED, watch=True, attached_at__isnull=True).update(**fields)
        == 1
    )
    if not started and run.attached_at is None:
        # An unwatched run someone follows anyway: remembered, so its page does not claim nobody saw it.
        Run.objects.filter(id=run.id, attached_at__isnull=True).update(attached_at=now)
    if not started:
        return Attached.NOTHING
    for name, value in fields.items():
        setattr(run, name, value)
    if claimed:
        record_key_openings([run])
        return Attached.CLAIMED
    if submit:
        transaction.on_commit(lambda: _submit(run.id))
    return Attached.SUBMITTED


def _submit(run_id: uuid.UUID) -> None:
    from runs import executor  # the executor imports services; import at call time

    executor.submit(run_id)


def _after_create(run: Run, *, publish_status: bool = True) -> None:
    if publish_status:
        try:
            events.publish(run, events.status_event(run))
        except Exception as exc:  # live lists miss one update; the run itself must still be handed over
            logger.warning("run %s: status event not published (%s)", run.id, type(exc).__name__)
    if run.kind != RunKind.COMPLETION and not run.waiting_for_watcher:
        _submit(run.id)


# A run without heartbeats (executed inside a request) still running after this long has been lost: far beyond
# any provider call's deadline.
UNATTENDED_RUN_LIMIT = timedelta(minutes=15)


def run_heartbeat(*, run_ids: list[uuid.UUID], worker_id: str) -> int:
    """Proof of life for the runs a worker is executing (one UPDATE); returns how many are still running. Stamped
    with the database's clock when the statement runs (``runs_reap_lost`` reads it with the same clock): a heartbeat
    that waited for a connection (the database restarting) is not written already as old as the wait."""
    return Run.objects.filter(id__in=run_ids, worker_id=worker_id, status=RunStatus.RUNNING).update(heartbeat_at=Now())


@transaction.atomic
def run_request_cancel(*, run: Run, actor: Actor) -> Run:
    """Cancel a run. A queued run ends at once; a running one is flagged and its executor stops the provider
    call (it watches the flag and the run's channel-layer group)."""
    locked = Run.objects.select_for_update().get(id=run.id)
    if locked.is_terminal:
        return locked
    if locked.kind == RunKind.COMPLETION:
        # A proxy call lives in its client's HTTP request, which no executor watches: closing that connection is
        # what stops it. Refuse rather than promise a cancellation nothing would carry out.
        raise ValidationError(
            "Calls through the OpenAI-compatible endpoint stop when their client closes the connection; "
            "they cannot be cancelled from here.",
            code=NOT_CANCELLABLE,
        )
    now = timezone.now()
    if locked.status == RunStatus.QUEUED:
        locked.status = RunStatus.CANCELLED
        locked.finished_at = now
        locked.error_kind = "cancelled"
        locked.error_message = "Cancelled before it started."
        fields = tokens_release(run=locked)
        locked.save(update_fields=["status", "finished_at", "error_kind", "error_message", *fields])
        count_ended(locked)
        transaction.on_commit(lambda: events.publish(locked, events.finished_event(locked, seq=0)))
    elif locked.cancel_requested_at is None:
        locked.cancel_requested_at = now
        locked.save(update_fields=["cancel_requested_at"])
        transaction.on_commit(lambda: _signal_cancel(locked))
    return locked


@transaction.atomic
def runs_cancel_for_org(*, org: Organization, actor: Actor) -> list[Run]:
    """Cancel every queued and running run of ``org`` (its suspension), through ``run_request_cancel``. Proxy
    completions are left to end with their client's request, which no executor watches (``NOT_CANCELLABLE``)."""
    active = Run.objects.filter(org=org).exclude(status__in=TERMINAL_STATUSES).exclude(kind=RunKind.COMPLETION)
    return [run_request_cancel(run=run, actor=actor) for run in active.order_by("created_at", "id")]


def runs_cancel_for_suspended_orgs() -> list[Run]:
    """Every executor's sweep: a run of a suspended org that is still queued or running (one created in the
    instant its org was being suspended, after ``runs_cancel_for_org`` looked) is cancelled too. Claims skip such
    runs meanwhile, so none of them starts."""
    active = (
        Run.objects.filter(org__suspended_at__isnull=False, cancel_requested_at__isnull=True)
        .exclude(status__in=TERMINAL_STATUSES)
        .exclude(kind=RunKind.COMPLETION)
    )
    return [run_request_cancel(run=run, actor=SUSPENDED_ACTOR) for run in active.order_by("created_at", "id")[:500]]


SUSPENDED_ACTOR = "CesaFlow (organization suspended)"


def _signal_cancel(run: Run) -> None:
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": "run.cancel", "run_id": str(run.id)}
    # The executor listens on the run's control group (it does not join the event group it publishes to). The
    # event group still gets the message for any in-request listener; websocket and SSE clients ignore it. Best
    # effort: the executor also polls ``cancel_requested_at``, so a lost message only costs a fraction of a second.
    try:
        async_to_sync(layer.group_send)(events.run_control_group(run.id), message)
        async_to_sync(layer.group_send)(events.run_group(run.id), message)
    except Exception as exc:  # the channel layer being down must not turn a recorded cancel into a 500
        logger.warning("run %s: cancel signal not sent (%s)", run.id, type(exc).__name__)


NOT_WATCHED = "not_watched"


@transaction.atomic
def runs_expire_unwatched(*, window: timedelta) -> list[Run]:
    """Cancel watched runs nobody attached to within ``window`` of their creation (``not_watched``): the provider
    was never called, so no tokens were spent, and an answer nobody could see is not bought."""
    now = timezone.now()
    # In org order: releasing reservations updates each org's budget row, always in the same order.
    expired = list(
        Run.objects.select_for_update(skip_locked=True)
        .filter(status=RunStatus.QUEUED, watch=True, attached_at__isnull=True, created_at__lt=now - window)
        .order_by("org_id", "id")
    )
    for run in expired:
        run.status = RunStatus.CANCELLED
        run.finished_at = now
        run.error_kind = NOT_WATCHED
        run.error_message = "Nobody opened the run in time, so it never started and used no tokens."
        fields = tokens_release(run=run)
        run.save(update_fields=["status", "finished_at", "error_kind", "error_message", *fields])
        count_ended(run)
    for run in expired:
        transaction.on_commit(
            lambda run=run: events.publish(run, events.finished_event(run, seq=0)),  # type: ignore[misc]
            robust=True,
        )
    return expired


@transaction.atomic
def runs_reap_lost(*, stale_after: timedelta, unattended_after: timedelta = UNATTENDED_RUN_LIMIT) -> list[Run]:
    """Mark running runs whose executor stopped heart-beating as failed (``worker_lost``).

    Runs executed inside a request (proxy completions) have no heartbeat; one still ``running`` after
    ``unattended_after`` outlived any call's deadline: its process died before recording the end.
    """
    now = timezone.now()
    # The database's clock, as heartbeats are stamped (``run_heartbeat``): no skew between hosts' clocks.
    lost = list(
        Run.objects.select_for_update(skip_locked=True)
        .filter(
            Q(heartbeat_at__lt=Now() - stale_after)
            | Q(heartbeat_at__isnull=True, started_at__lt=Now() - unattended_after),
            status=RunStatus.RUNNING,
        )
        .order_by("org_id", "id")  # budget rows are updated in the same order by every reaper
    )
    for run in lost:
        run.status = RunStatus.FAILED
        run.finished_at = now
        run.error_kind = "worker_lost"
        run.error_message = "The process executing this run stopped; the run cannot resume."
        run.usage_complete = False
        # Its reservation goes too: whatever its calls used but never reported is lost with the process.
        fields = tokens_release(run=run)
        run.save(update_fields=["status", "finished_at", "error_kind", "error_message", "usage_complete", *fields])
        count_ended(run)
    for run in lost:
        # robust: one failed publish (the channel layer is down) must not skip the others.
        transaction.on_commit(
            lambda run=run: events.publish(run, events.finished_event(run, seq=0)),  # type: ignore[misc]
            robust=True,
        )
    return lost


def agent_default_limits() -> AgentLimits:
    """The deployment's agent budgets: ``AgentLimits`` with ``settings.AGENT_LIMITS`` applied."""
    return AgentLimits().merged(settings.AGENT_LIMITS)


def org_agent_limits(*, org: Organization) -> AgentLimits:
    """The budgets an org's agent runs get unless a run asks for others: the deployment's defaults with the org's
    overrides. An override the deployment's caps no longer allow (lowered since) is ignored, not fatal."""
    limits = agent_default_limits()
    try:
        return limits.merged(org.agent_limits or {})
    except ValueError:
        logger.warning("org %s: stored agent limits are outside the deployment caps; using the defaults", org.id)
        return limits


def org_agent_limits_set(*, org: Organization, actor: Actor, overrides: Mapping[str, Any]) -> Organization:
    """Set the org's own agent budgets (only the given names; the rest follow the deployment). Validated against
    the deployment's caps here, stored and audited by ``org_update``."""
    try:
        agent_default_limits().merged(overrides)
    except ValueError as exc:
        raise ValidationError({"agent_limits": str(exc)}) from None
    return org_update(org=org, actor=actor, agent_limits=dict(overrides))


def retention_purge() -> dict[str, int]:
    """The periodic retention jobs besides workspaces: audit events past ``AUDIT_RETENTION_DAYS``, webhook
    delivery ids past ``WEBHOOK_DELIVERY_RETENTION_DAYS`` and sign-ups left unconfirmed past their link's lifetime.
    What each deleted (counts only)."""
    from runs.webhooks.services import webhook_deliveries_purge  # webhooks build on these services

    return {
        "audit_events": audit_purge(older_than_days=settings.AUDIT_RETENTION_DAYS),
        "webhook_deliveries": webhook_deliveries_purge(older_than_days=settings.WEBHOOK_DELIVERY_RETENTION_DAYS),
        "unconfirmed_signups": signups_unconfirmed_purge(),
    }
