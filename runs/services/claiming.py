"""Handing queued runs to executors: within each organization's caps, and fairly across organizations.

An org's chat and agent runs take *slots* (``run_slots``): a chat run one, an agent run ``RUN_AGENT_WEIGHT``. At
most ``RUN_ORG_MAX_RUNNING`` slots of an org execute at once; its other runs wait queued and start in turn, never
refused. At most ``RUN_ORG_MAX_QUEUED`` slots wait: ``run_create`` refuses a run beyond that
(``org_queue_check``, code ``org_run_queue_full``). Proxy completions take no slot: they execute in their client's
request, not in an executor, and the per-org rate limits bound them.

Claims are serialized per org, not globally: a claim locks the rows of the orgs it takes runs from
(``FOR NO KEY UPDATE``; skipped when another claim holds them, so executors never wait for each other), counts
their running slots after taking the lock, and claims within the cap. Two executors therefore never take an org
past its cap, and a run still executes exactly once (its row is locked too).

The order is round-robin by load: each run goes to the org with the fewest slots executing, ties to the org whose
run has waited longest; within an org, oldest first. A run of an org with nothing executing is thus started by the
next free slot of any executor, ahead of every org that already has runs executing, however long their backlog.
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Collection
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Exists, Min, OuterRef, Q, QuerySet
from django.utils import timezone

from cesaflow.lib import request_context
from keys.models import KeyStatus, ProviderKey
from keys.services import provider_key_record_opening
from orgs.models import Organization
from runs.models import Project, Run, RunKind, RunStatus
from runs.selectors import EXECUTION_RELATED, unscoped_org_run_slots

# Queued runs an executor may start: unwatched ones, and watched ones whose stream is attached.
READY = Q(watch=False) | Q(attached_at__isnull=False)

# Kinds an executor knows how to run (``completion`` runs execute in the proxy's request).
EXECUTABLE_KINDS = (RunKind.CHAT, RunKind.AGENT)

# What execution reads with a run, but its org: ``run_claim`` has that row already, locked.
_BESIDE_ORG = tuple(name for name in EXECUTION_RELATED if name != "org")

ORG_RUN_QUEUE_FULL = "org_run_queue_full"


def run_slots(kind: str) -> int:
    """The slots a run of ``kind`` takes against its org's caps."""
    return int(settings.RUN_AGENT_WEIGHT) if kind == RunKind.AGENT else 1


def org_queue_check(*, org: Organization, kind: str) -> None:
    """Refuse a new run of ``kind`` when the org's queued runs already take ``RUN_ORG_MAX_QUEUED`` slots
    (``ValidationError`` code ``org_run_queue_full``). Call inside the transaction that creates the run: it locks
    the org's row until then, so concurrent creations are counted one after the other."""
    list(Organization.objects.select_for_update(no_key=True).filter(id=org.id).values_list("id", flat=True))
    limit = int(settings.RUN_ORG_MAX_QUEUED)
    queued = unscoped_org_run_slots(org_ids=[org.id], status=RunStatus.QUEUED).get(org.id, 0)
    if queued + run_slots(kind) > limit:
        raise ValidationError(
            f"This organization already has as many runs waiting to start as it may ({limit} slots; a chat run "
            f"takes 1, an agent run {run_slots(RunKind.AGENT)}). Wait for some to start or cancel some, then try "
            "again.",
            code=ORG_RUN_QUEUE_FULL,
        )


def _startable() -> QuerySet[Run]:
    """Queued runs an executor may start, by their own columns: of a kind it runs, unwatched or attached."""
    return Run.objects.filter(READY, status=RunStatus.QUEUED, kind__in=EXECUTABLE_KINDS)


def _ready() -> QuerySet[Run]:
    # Runs whose project already has one executing are left out in SQL: a backlog on one busy project must not
    # hold up the project's org's other runs, nor anyone else's.
    project_busy = Exists(
        Run.objects.filter(project_id=OuterRef("project_id"), status=RunStatus.RUNNING, project__isnull=False)
    )
    return _startable().filter(org__suspended_at__isnull=True).exclude(project_busy)


def _serialized(candidates: list[Run]) -> list[Run]:
    """The candidates that may start now: at most one per project, and none on a project that has a run
    executing. Inside the claim's transaction: the project rows are locked (skip locked) until the claimed run is
    committed ``running``, so two executors never start two runs on one project."""
    project_ids = {run.project_id for run in candidates if run.project_id is not None}
    if not project_ids:
        return candidates
    free = set(
        Project.objects.select_for_update(skip_locked=True).filter(id__in=project_ids).values_list("id", flat=True)
    )
    busy = set(Run.objects.filter(project_id__in=free, status=RunStatus.RUNNING).values_list("project_id", flat=True))
    chosen: list[Run] = []
    for run in candidates:
        if run.project_id is not None:
            if run.project_id not in free or run.project_id in busy:
                continue
            busy.add(run.project_id)  # one per project per claim
        chosen.append(run)
    return chosen


def running_fields(worker_id: str) -> dict[str, Any]:
    """The columns a claim sets: the run is ``running`` for ``worker_id`` from now."""
    now = timezone.now()
    return {"status": RunStatus.RUNNING, "started_at": now, "worker_id": worker_id[:64], "heartbeat_at": now}


def usable_key(run: Run) -> ProviderKey | None:
    """The run's provider key, unless it was deleted or revoked since the run was created."""
    key = run.provider_key
    return None if key is None or key.status == KeyStatus.REVOKED else key


def record_key_openings(runs: list[Run]) -> None:
    """In a claim's transaction: a chat run's one provider call opens its key, and that opening is recorded here
    (``key.used``, or ``key.decrypt_failed``; ``provider_key_record_opening``), with the claim, as the gateway
    records its calls' with their run. The executor then opens the key in memory from the row the claim read
    (``runs.execution_common.opened_adapter``), with no database hop between the claim and the provider call
    (issue #13). Not for runs whose key is revoked or whose cancellation is already asked for (they make no call),
    nor for agent runs: they open their key once per turn, each recorded then."""
    # The run's own record, not the claimer's: a watcher's request (its address, its request id) that claimed the
    # run on attaching must not be written on it, as it is on no other record of the run's execution.
    token = request_context.bind(request_context.RequestContext())
    try:
        for run in runs:
            key = usable_key(run)
            if run.kind != RunKind.CHAT or key is None or run.cancel_requested_at:
                continue
            if key.org_id == run.org_id:
                key.org = run.org  # the run's org row, already read: the audit row names it
            actor = run.created_by_user or run.created_by_api_key
            provider_key_record_opening(key=key, actor=actor, purpose="run", reference=str(run.id))
    finally:
        request_context.unbind(token)


def _start(runs: list[Run], worker_id: str) -> None:
    fields = running_fields(worker_id)
    for run in runs:
        for name, value in fields.items():
            setattr(run, name, value)
    if runs:
        Run.objects.filter(id__in=[run.id for run in runs]).update(**fields)
    record_key_openings(runs)


@transaction.atomic
def run_claim(*, run_id: uuid.UUID, worker_id: str) -> Run | None:
    """Claim this queued run for execution: exactly one caller wins (row lock, skip locked); None otherwise — for a
    watched run nobody has attached to yet, and for a run whose org has no free slot (it stays queued: an executor
    claims it once a slot is free). The run comes as ``execution`` reads it (``unscoped_run_for_execution``)."""
    # The org first (waiting briefly for a creation or another claim of this org), then the run: every claim and
    # creation takes the org's lock before any run's, so they cannot deadlock. The queue scan's conditions
    # (``_ready``) are checked here as the run's own columns (``_startable``) and the rest apart, which PostgreSQL
    # plans several times faster for one run (this claim is on the path from a watcher attaching to the run's first
    # words, issue #13): the org's suspension on the row just locked, a busy project in ``_serialized``.
    org = Organization.objects.select_for_update(no_key=True, of=("self",)).filter(runs__id=run_id).first()
    if org is None or org.suspended_at is not None:
        return None
    run = (
        _startable()
        .select_related(*_BESIDE_ORG)
        .select_for_update(skip_locked=True, of=("self",))
        .filter(id=run_id)
        .first()
    )
    if run is None or not _serialized([run]):
        return None
    running = unscoped_org_run_slots(org_ids=[org.id], status=RunStatus.RUNNING).get(org.id, 0)
    if running + run_slots(run.kind) > int(settings.RUN_ORG_MAX_RUNNING):
        return None
    run.org = org
    _start([run], worker_id)
    return run


def run_claim_on_attach(*, run: Run) -> bool:
    """Inside ``run_attach``'s transaction, before its update: may the watched run being attached be claimed at
    once for an executor of the attaching process (which reserved a slot for it)? Then the run starts without a
    hand-over and a claim of its own (issue #13: the run stream's first words). True if the run may be claimed;
    ``run_attach`` then sets it ``running`` in the same update. Within the org's cap, as any claim: the org's row is
    locked first (the lock order of every claim and creation), then its running slots counted. Runs of a project
    are left to the executors' claims, which serialize a project's runs; so are runs of a suspended org, and
    kinds no executor runs. On True, ``run.org`` is the org's row as locked (execution reads its settings)."""
    if run.project_id is not None or run.kind not in EXECUTABLE_KINDS:
        return False
    org = Organization.objects.select_for_update(no_key=True).filter(id=run.org_id, suspended_at__isnull=True).first()
    if org is None:
        return False
    running = unscoped_org_run_slots(org_ids=[org.id], status=RunStatus.RUNNING).get(org.id, 0)
    if running + run_slots(run.kind) > int(settings.RUN_ORG_MAX_RUNNING):
        return False
    run.org = org
    return True


def runs_claim_queued(*, worker_id: str, limit: int, among: Collection[uuid.UUID] | None = None) -> list[Run]:
    """Claim up to ``limit`` queued runs for ``worker_id``, round-robin across orgs within their caps (see the
    module docstring), as ``execution`` reads them (``unscoped_run_for_execution``). ``among``: only these runs
    (an executor that does not look at the whole queue retries the runs handed to it). Concurrent claimers never
    claim the same run and never wait for each other."""
    if limit < 1:
        return []
    ready = _startable()
    if among is not None:
        ready = ready.filter(id__in=list(among))
    # Every executor looks at the queue each time one of its runs ends, and there is usually nothing to start: one
    # indexed existence check then, not a transaction around the fair claim's grouped read (0.8 against 3.0-4.2 ms
    # a look, issue #13). A run that becomes ready just after it is started by its own submission or the next look,
    # as one that became ready just after the grouped read always was.
    if not ready.exists():
        return []
    return _claim_queued(worker_id=worker_id, limit=limit, among=among)


@transaction.atomic
def _claim_queued(*, worker_id: str, limit: int, among: Collection[uuid.UUID] | None) -> list[Run]:
    ready = _ready()
    if among is not None:
        ready = ready.filter(id__in=list(among))
    waiting: dict[uuid.UUID, datetime] = dict(
        ready.order_by().values("org_id").annotate(oldest=Min("created_at")).values_list("org_id", "oldest")
    )
    cap = int(settings.RUN_ORG_MAX_RUNNING)
    running = unscoped_org_run_slots(org_ids=waiting, status=RunStatus.RUNNING)
    # Least loaded first, then longest waiting; orgs at their cap are not even locked. A few more orgs than runs
    # wanted: those another claimer holds are skipped, and this claim takes the next ones.
    order = sorted(
        (org_id for org_id in waiting if running.get(org_id, 0) < cap),
        key=lambda org_id: (running.get(org_id, 0), waiting[org_id]),
    )[: 4 * limit]
    locked = list(
        Organization.objects.select_for_update(skip_locked=True, no_key=True)
        .filter(id__in=order)
        .values_list("id", flat=True)
    )
    if not locked:
        return []
    # Counted again now that the orgs are locked: claims committed meanwhile are included.
    running = unscoped_org_run_slots(org_ids=locked, status=RunStatus.RUNNING)
    heap = [(running.get(org_id, 0), waiting[org_id], org_id) for org_id in locked]
    heapq.heapify(heap)
    queues: dict[uuid.UUID, list[Run]] = {}
    chosen: list[Run] = []
    while heap and len(chosen) < limit:
        load, _, org_id = heapq.heappop(heap)
        if org_id not in queues and load >= cap:  # at its cap since the first count
            queues[org_id] = []
        elif org_id not in queues:
            # The org's oldest runs, read when it is first served: twice what could fit, as some may be skipped
            # for their project (_serialized; projects belong to one org, so one org's runs at a time will do).
            wanted = 2 * min(cap - load, limit)
            queues[org_id] = _serialized(
                list(
                    ready.select_related(*EXECUTION_RELATED)
                    .select_for_update(skip_locked=True, of=("self",))
                    .filter(org_id=org_id)
                    .order_by("created_at", "id")[:wanted]
                )
            )
        queue = queues[org_id]
        if not queue:
            continue
        run = queue.pop(0)
        load += run_slots(run.kind)
        if load > cap:
            # The org's oldest run does not fit (an agent run needs several slots): it waits for them, and the
            # org's later runs wait behind it rather than overtake it for ever.
            continue
        chosen.append(run)
        if queue:
            heapq.heappush(heap, (load, queue[0].created_at, org_id))
    _start(chosen, worker_id)
    return chosen
