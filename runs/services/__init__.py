"""Writes for runs, the usage ledger and the audit trail."""

from __future__ import annotations

import dataclasses
import enum
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from cesaflow.lib.metrics import RUNS_FINISHED
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
    UsageRecord,
)

# Claiming and the token cap's reservations have modules of their own; what callers use is re-exported here.
from runs.services.claiming import ORG_RUN_QUEUE_FULL as ORG_RUN_QUEUE_FULL
from runs.services.claiming import org_queue_check, record_key_openings, run_claim_on_attach, running_fields
from runs.services.claiming import run_claim as run_claim
from runs.services.claiming import runs_claim_queued as runs_claim_queued
from runs.services.tokens import TOKEN_CAP_REACHED as TOKEN_CAP_REACHED
from runs.services.tokens import run_first_call_estimate, tokens_release, tokens_reserve, tokens_settle, tokens_used
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
MODEL_MAX_CHARS = 200

# Kinds whose runs wait for their watcher unless created with ``watch=False``: a chat run's answer *is* its stream.
WATCHED_BY_DEFAULT = frozenset({RunKind.CHAT})


@dataclass(frozen=True)
class UsageEntry:
    """Token counts of one provider call, for the usage ledger."""

    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    complete: bool


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
    """Proof of life for the runs a worker is executing (one UPDATE); returns how many are still running."""
    return Run.objects.filter(id__in=run_ids, worker_id=worker_id, status=RunStatus.RUNNING).update(
        heartbeat_at=timezone.now()
    )


def _count_ended(run: Run) -> None:
    """``cesaflow_runs_finished_total``, once the end is committed."""
    kind, status = str(run.kind), str(run.status)
    transaction.on_commit(lambda: RUNS_FINISHED.labels(kind, status).inc())


# What ending a run reads and writes: every column a writer other than the run's own caller may change.
FINISH_COLUMNS: Final = (
    "status",
    "finished_at",
    "usage_complete",
    "error_kind",
    "error_message",
    "input_tokens",
    "output_tokens",
    "tokens_reserved",
    "tokens_reserved_month",
)


@dataclass(frozen=True)
class RunEnd:
    """How one run ended, for ``runs_finish``: its terminal ``status``, one usage entry per provider call not
    recorded yet, and ``usage_complete`` (default: every entry complete, and at least one).

    ``held_run``: the instance of run ``run_id`` the caller created in this request (the gateway). Under the row
    lock only the columns another writer may have changed since (``FINISH_COLUMNS``: a cancel, the reaper, usage
    recorded meanwhile) are read again, into it, instead of the whole row; the same instance is returned."""

    run_id: uuid.UUID
    status: str
    usage: list[UsageEntry]
    usage_complete: bool | None = None
    error_kind: str = ""
    error_message: str = ""
    held_run: Run | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.status not in TERMINAL_STATUSES:
            raise ValueError(f"not a terminal status: {self.status!r}")


def run_finish(
    *,
    run_id: uuid.UUID,
    status: str,
    usage: list[UsageEntry],
    usage_complete: bool | None = None,
    error_kind: str = "",
    error_message: str = "",
    held_run: Run | None = None,
) -> Run:
    """Record the end of one run (``runs_finish``, which see)."""
    end = RunEnd(run_id, status, usage, usage_complete, error_kind, error_message, held_run)
    try:
        return runs_finish([end])[run_id]
    except KeyError:
        raise Run.DoesNotExist(f"no run {run_id}") from None


def _refreshed(run: Run, values: Sequence[Any]) -> Run:
    for column, value in zip(FINISH_COLUMNS, values, strict=True):
        setattr(run, column, value)
    return run


@transaction.atomic
def runs_finish(ends: Sequence[RunEnd]) -> dict[uuid.UUID, Run]:
    """Record the end of runs: status, times, token totals and one usage-ledger row per provider call. The
    usage counts against the org's monthly cap, and what is left of each run's reservation is released. One
    transaction for all of them: the rows locked in one statement (in id order), one ``UPDATE`` per budget row,
    one ``INSERT`` of the ledger rows, and the runs' updates (one statement for several runs), so that a process
    ending many runs at once (the gateway's writer, ``runs.api.run_ends``) pays for a handful of statements, not a
    handful per run. Returns the runs by id; an end whose run does not exist is left out.

    Idempotent: a run that already ended (reaped, cancelled while queued) keeps its first outcome, but the
    usage of calls that really happened is still recorded, because the provider bills them. At most one end per
    run in one call."""
    by_id = {end.run_id: end for end in ends}
    if len(by_id) != len(ends):
        raise ValueError("one end per run")
    locked = Run.objects.select_for_update().filter(id__in=by_id).order_by("id")
    held = {end.run_id: end.held_run for end in ends if end.held_run is not None and end.held_run.id == end.run_id}
    runs: dict[uuid.UUID, Run] = {}
    if len(held) == len(ends):
        for run_id, *columns in locked.values_list("id", *FINISH_COLUMNS):
            runs[run_id] = _refreshed(held[run_id], columns)
    else:
        for row in locked:
            fresh = [getattr(row, column) for column in FINISH_COLUMNS]
            runs[row.id] = _refreshed(held[row.id], fresh) if row.id in held else row
    if not runs:
        return runs

    def counted(entries: list[UsageEntry]) -> tuple[int, int]:
        return sum(max(0, e.input_tokens) for e in entries), sum(max(0, e.output_tokens) for e in entries)

    tokens_settle([(run, sum(counted(by_id[run.id].usage))) for run in runs.values()])
    UsageRecord.objects.bulk_create(
        [
            UsageRecord(
                org_id=run.org_id,
                run=run,
                provider=entry.provider,
                model=entry.model[:MODEL_MAX_CHARS],
                input_tokens=max(0, entry.input_tokens),
                output_tokens=max(0, entry.output_tokens),
                complete=entry.complete,
            )
            for run in runs.values()
            for entry in by_id[run.id].usage
        ]
    )
    now = timezone.now()
    fields = ["input_tokens", "output_tokens", "tokens_reserved", "tokens_reserved_month"]
    for run in runs.values():
        end = by_id[run.id]
        input_tokens, output_tokens = counted(end.usage)
        run.input_tokens += input_tokens
        run.output_tokens += output_tokens
        if not run.is_terminal:
            run.status = end.status
            run.finished_at = now
            run.usage_complete = (
                end.usage_complete
                if end.usage_complete is not None
                else bool(end.usage) and all(e.complete for e in end.usage)
            )
            run.error_kind = end.error_kind[:32]
            run.error_message = end.error_message[:300]
            fields += ["status", "finished_at", "usage_complete", "error_kind", "error_message"]
            _count_ended(run)
    # Every written column is one of FINISH_COLUMNS, read under the lock: a run already over writes back its own.
    _runs_write(list(runs.values()), list(dict.fromkeys(fields)))
    return runs


def _runs_write(runs: list[Run], fields: list[str]) -> None:
    """``fields`` of each of ``runs`` (their own values per run) in one ``UPDATE … FROM UNNEST(…)``, a column
    array per field as Django 5.2 itself sends a ``bulk_create``. Not ``bulk_update``: its ``CASE WHEN`` per field
    and run costs more to build than the statements it saves (a batch of 50 runs took 1.7 s of a 1.8 s profile of
    ending them); not ``save()`` per run: a statement each. No signal is sent, as by ``bulk_update``: nothing
    listens to a run's saves."""
    meta = Run._meta
    quote = connection.ops.quote_name
    by_name = {field.name: field for field in meta.concrete_fields}
    written = [by_name["id"], *(by_name[name] for name in fields)]
    names = [quote(field.column) for field in written]
    arrays = ", ".join(f"%s::{field.db_type(connection)}[]" for field in written)
    assignments = ", ".join(f"{name} = v.{name}" for name in names[1:])
    # The names come from the model, the values are bound.
    sql = f"UPDATE {quote(meta.db_table)} AS r SET {assignments} FROM UNNEST({arrays}) AS v({', '.join(names)})"  # noqa: S608
    values = [[field.get_db_prep_save(getattr(run, field.attname), connection) for run in runs] for field in written]
    with connection.cursor() as cursor:
        cursor.execute(f"{sql} WHERE r.{names[0]} = v.{names[0]}", values)


@transaction.atomic
def run_usage_add(*, run_id: uuid.UUID, entry: UsageEntry) -> None:
    """One provider call's usage, recorded as it happens (agent runs make many calls): a ledger row, the run's
    totals, and the org's monthly count (that much of the run's reservation is used up). ``run_finish`` later adds
    only what was not recorded yet."""
    run = (
        Run.objects.select_for_update().only("id", "org_id", "tokens_reserved", "tokens_reserved_month").get(id=run_id)
    )
    if tokens_used(run=run, tokens=max(0, entry.input_tokens) + max(0, entry.output_tokens)):
        run.save(update_fields=["tokens_reserved", "tokens_reserved_month"])
    UsageRecord.objects.create(
        org_id=run.org_id,
        run_id=run.id,
        provider=entry.provider,
        model=entry.model[:MODEL_MAX_CHARS],
        input_tokens=max(0, entry.input_tokens),
        output_tokens=max(0, entry.output_tokens),
        complete=entry.complete,
    )
    Run.objects.filter(id=run_id).update(
        input_tokens=F("input_tokens") + max(0, entry.input_tokens),
        output_tokens=F("output_tokens") + max(0, entry.output_tokens),
    )


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
        _count_ended(locked)
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
        _count_ended(run)
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
    lost = list(
        Run.objects.select_for_update(skip_locked=True)
        .filter(
            Q(heartbeat_at__lt=now - stale_after) | Q(heartbeat_at__isnull=True, started_at__lt=now - unattended_after),
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
        _count_ended(run)
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
