"""The executor itself: claims runs, executes them as tasks of its event loop, heartbeats, reaps, stops them on
request (see the package docstring for how executors are deployed)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import secrets
import socket
import uuid
from collections.abc import Coroutine
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from cesaflow.lib import request_context
from runs import events
from runs.execution import STOP_CANCELLED, STOP_LOST, STOP_SHUTDOWN, RunControl, execute_run
from runs.models import Run
from runs.providers import CallLimits
from runs.selectors import unscoped_runs_still_queued, unscoped_runs_to_stop
from runs.services import (
    retention_purge,
    run_claim,
    run_heartbeat,
    runs_cancel_for_suspended_orgs,
    runs_claim_queued,
    runs_expire_unwatched,
    runs_reap_lost,
)
from runs.services.workspaces import workspaces_purge
from runs.workspaces import sandbox_status

logger = logging.getLogger("cesaflow.runs")

# After asking its runs to stop at shutdown, an executor waits this long for them to record their end.
STOP_RECORD_TIMEOUT_SECONDS = 10.0
CLAIM_BATCH = 20
# A supervision tick that waited for the database longer than this fraction of a heartbeat counts as one that lost
# it (``Executor._reap``): normal ticks take milliseconds; a tick this slow on every heartbeat only delays reaping.
WAITED_LOST_FRACTION = 0.5
# Audit events and webhook delivery ids are purged this often by every reaping executor (cheap, idempotent).
RETENTION_INTERVAL_SECONDS = 3600.0


@dataclass(frozen=True)
class ExecutorConfig:
    heartbeat_s: float
    stale_after_s: float
    poll_s: float
    cancel_poll_s: float
    concurrency: int  # runs executing at once in this executor, however they were handed to it
    claim_queued: bool  # look at the queue (workers; inline server executors, to recover after a restart)
    reap: bool  # mark other executors' lost runs failed

    @classmethod
    def from_settings(cls, *, claim_queued: bool, reap: bool, **overrides: Any) -> ExecutorConfig:
        config = cls(
            heartbeat_s=settings.RUN_HEARTBEAT_SECONDS,
            stale_after_s=settings.RUN_STALE_AFTER_SECONDS,
            poll_s=settings.RUN_WORKER_POLL_SECONDS,
            cancel_poll_s=settings.RUN_CANCEL_POLL_SECONDS,
            concurrency=settings.RUN_WORKER_CONCURRENCY,
            claim_queued=claim_queued,
            reap=reap,
        )
        return replace(config, **overrides)


def new_worker_id(label: str) -> str:
    """``label:host:pid:random``: readable in the database, unique per executor instance (max 64 characters)."""
    host = socket.gethostname()[:32] or "host"
    return f"{label}:{host}:{os.getpid()}:{secrets.token_hex(3)}"[:64]


@dataclass
class _ActiveRun:
    control: RunControl
    task: asyncio.Task[None] | None = None


class Executor:
    """Executes runs as tasks of the event loop it is started in.

    ``layer``: None for the process's shared channel layer. An executor on a loop of its own needs its own layer
    instance (channels_redis refuses to receive on two loops at once). ``limits``: provider-call limits (tests).
    """

    def __init__(
        self,
        *,
        config: ExecutorConfig,
        label: str = "executor",
        layer: Any = None,
        limits: CallLimits | None = None,
        worker_id: str = "",
    ) -> None:
        self.config = config
        self.layer = layer
        self.limits = limits
        self.worker_id = worker_id or new_worker_id(label)
        self._active: dict[uuid.UUID, _ActiveRun] = {}
        # Runs submitted to an executor that does not look at the queue, left queued because it or their org had no
        # free slot: retried, fairly (runs_claim_queued), as slots free up. Insertion-ordered.
        self._submitted: dict[uuid.UUID, None] = {}
        self._claiming = 0  # slots held by claims in flight (submissions arrive as concurrent tasks)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._channel: str | None = None
        self._channel_lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._started = False
        self._next_retention = 0.0
        # After this executor lost the database (a supervision tick failed, or waited for it longer than
        # ``_reap``'s ``WAITED_LOST_FRACTION`` of a heartbeat), it reaps nothing for stale-after seconds once the
        # database answers again: every heartbeat missed during the outage, the live executors' too, looks stale,
        # and their runs must not be reaped before they had a chance to heartbeat.
        self._database_lost = False
        self._reap_not_before = 0.0
        self._stopping = False
        self._closed = False

    # --- Lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start supervising (heartbeats, cancel checks, reaping, queue polling). Call in the executor's loop."""
        if self._started:
            return
        self._started = True
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._channel_lock = asyncio.Lock()
        self._spawn_internal(self._supervise(), "supervisor")
        self._spawn_internal(_report_sandbox(), "sandbox-self-test")
        if self._layer() is not None:
            self._spawn_internal(self._listen(), "listener")
        logger.info(
            "executor %s started (claim_queued=%s, reap=%s, concurrency=%d)",
            self.worker_id,
            self.config.claim_queued,
            self.config.reap,
            self.config.concurrency,
        )

    async def stop(self, *, grace_s: float = 0.0) -> None:
        """Stop claiming; give running runs ``grace_s`` to finish; then stop them (recorded failed,
        ``worker_lost``). Runs that do not record their end in time are left to the reaper."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        tasks = self._run_tasks()
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for active in list(self._active.values()):
            active.control.request_stop(STOP_SHUTDOWN)
        tasks = self._run_tasks()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_RECORD_TIMEOUT_SECONDS)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        layer = self._layer()
        if layer is not None and self._channel is not None and self.config.claim_queued:
            with suppress(Exception):
                await layer.group_discard(events.WORKERS_GROUP, self._channel)
        await database_sync_to_async(_close_db_connections)()
        logger.info("executor %s stopped", self.worker_id)

    async def wait_idle(self, timeout: float) -> bool:
        """True once no run is executing (tests, shutdown)."""
        if self._idle is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    @property
    def active_run_ids(self) -> list[uuid.UUID]:
        return list(self._active)

    # --- Claiming -------------------------------------------------------------------------------------------

    async def submit_run(self, run_id: uuid.UUID) -> bool:
        """Claim this queued run and start executing it. False if it does not start now: another executor has it,
        it is not queued, or this executor or the run's org has no free slot. In the last case it stays queued and
        starts, in its turn, once a slot is free (claimed from the queue, or retried by this executor)."""
        if self._stopping:
            return False
        self.start()
        run = None
        if self._free_slots() > 0:
            self._claiming += 1
            try:
                run = await database_sync_to_async(run_claim)(run_id=run_id, worker_id=self.worker_id)
            finally:
                self._claiming -= 1
        if run is None:
            if not self.config.claim_queued:
                self._submitted[run_id] = None
            return False
        self._execute_claimed(run)
        return True

    async def claim_queued(self) -> int:
        """Claim queued runs up to the free capacity, fairly across orgs; returns how many. An executor that does
        not look at the queue claims among the runs submitted to it."""
        capacity = self._free_slots()
        among = None if self.config.claim_queued else list(self._submitted)
        if self._stopping or capacity <= 0 or among == []:
            return 0
        limit = min(capacity, CLAIM_BATCH)
        self._claiming += limit
        try:
            runs = await database_sync_to_async(runs_claim_queued)(worker_id=self.worker_id, limit=limit, among=among)
        finally:
            self._claiming -= limit
        for run in runs:
            self._submitted.pop(run.id, None)
            self._execute_claimed(run)
        if among:
            # Forget the submitted runs that will never start here (cancelled, claimed by someone else).
            waiting = await database_sync_to_async(unscoped_runs_still_queued)(run_ids=list(self._submitted))
            self._submitted = {run_id: None for run_id in self._submitted if run_id in waiting}
        if len(runs) == limit and self._wake is not None:
            self._wake.set()  # there may be more
        return len(runs)

    def reserve_slot(self) -> bool:
        """Hold a slot for a run about to be claimed for this executor by a service of this process
        (``run_attach(claim_for=worker_id)``); False if none is free. ``claimed_elsewhere`` ends the reservation."""
        if self._stopping or self._free_slots() <= 0:
            return False
        self.start()
        self._claiming += 1
        return True

    def claimed_elsewhere(self, run: Run | None) -> None:
        """End a ``reserve_slot`` reservation; ``run``: the run claimed for this executor meanwhile (``running``,
        read as ``execution`` needs it), which it now executes. Call in the executor's loop."""
        self._claiming -= 1
        if run is not None:
            self._execute_claimed(run)
            if self._stopping:  # claimed while this executor stops: recorded at once, not left to the reaper
                self._active[run.id].control.request_stop(STOP_SHUTDOWN)

    def _execute_claimed(self, run: Run) -> None:
        active = _ActiveRun(control=RunControl())
        self._active[run.id] = active
        if self._idle is not None:
            self._idle.clear()
        # A fresh context: the claimer's (a watcher's request: its address, its request id) must not leak into the
        # run's logs and audit records, which outlive it.
        active.task = asyncio.create_task(
            self._execute(run.id, active.control, run), name=f"run-{run.id}", context=contextvars.Context()
        )

    async def _execute(self, run_id: uuid.UUID, control: RunControl, run: Run) -> None:
        # This task's log lines name its run (its context is its own: ``_execute_claimed``).
        fields = {"run_id": str(run_id), "org_id": str(run.org_id)}
        request_context.bind(request_context.RequestContext(log_fields=fields))
        group = events.run_control_group(run_id)
        # Cancel requests arrive on the run's control group, joined while the run starts (not before: a Redis round
        # trip on the path to its first words). One sent before the join lands is caught by the cancel poll.
        joining = asyncio.create_task(self._join(group, run_id))
        try:
            await execute_run(run, control=control, layer=self.layer, limits=self.limits)
        except Exception as exc:  # e.g. the database went away while recording: the reaper will finish it
            logger.error("run %s: executor error %s", run_id, type(exc).__name__)
        finally:
            self._active.pop(run_id, None)
            if not self._active and self._idle is not None:
                self._idle.set()
            if self._wake is not None and self._claims:
                self._wake.set()  # capacity freed
            joined = await joining
            if joined is not None:
                with suppress(Exception):
                    await self._layer().group_discard(group, joined)

    async def _join(self, group: str, run_id: uuid.UUID) -> str | None:
        """Join ``group`` with this executor's channel; the channel, or None if not joined (logged)."""
        try:
            channel = await self._ensure_channel()
            if channel is not None:
                await self._layer().group_add(group, channel)
            return channel
        except Exception as exc:  # the cancel poll still stops the run
            logger.warning("run %s: control group not joined (%s)", run_id, type(exc).__name__)
            return None

    # --- Supervision ----------------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        assert self._wake is not None  # noqa: S101 - start() sets it
        loop = asyncio.get_running_loop()
        config = self.config
        next_heartbeat = next_reap = next_claim = loop.time()
        woken = False
        while not self._closed:
            now = loop.time()
            try:
                if self._active:
                    await self._check_stops()
                if now >= next_heartbeat:
                    next_heartbeat = now + config.heartbeat_s
                    await self._heartbeat()
                if config.reap and not self._stopping and now >= next_reap:
                    next_reap = now + config.heartbeat_s
                    await self._reap(tick_started=now)
                if self._claims and not self._stopping and (now >= next_claim or woken):
                    next_claim = now + config.poll_s
                    await self.claim_queued()
            except Exception as exc:  # the database or Redis is briefly unavailable: try again next tick
                self._database_lost = True
                logger.warning("executor %s: supervision error %s", self.worker_id, type(exc).__name__)
            deadlines = [next_heartbeat]
            if config.reap:
                deadlines.append(next_reap)
            if self._claims:
                deadlines.append(next_claim)
            timeout = min(deadlines) - loop.time()
            if self._active:
                timeout = min(timeout, config.cancel_poll_s)
            # Sleep until the next deadline or a wake-up (a nudge, freed capacity). asyncio.timeout, not wait_for:
            # wait_for can swallow a cancellation that coincides with the wake-up.
            woken = False
            with suppress(TimeoutError):
                async with asyncio.timeout(max(timeout, 0.01)):
                    await self._wake.wait()
                    woken = True
            # Consume the wake-up: a set event makes wait() return without yielding, and a loop that never yields
            # freezes the whole event loop.
            self._wake.clear()
            await asyncio.sleep(0)

    async def _check_stops(self) -> None:
        stops = await database_sync_to_async(unscoped_runs_to_stop)(
            run_ids=list(self._active), worker_id=self.worker_id
        )
        for run_id, reason in stops.items():
            active = self._active.get(run_id)
            if active is not None:
                active.control.request_stop(STOP_CANCELLED if reason == "cancelled" else STOP_LOST)

    async def _heartbeat(self) -> None:
        if self._active:
            await database_sync_to_async(run_heartbeat)(run_ids=list(self._active), worker_id=self.worker_id)
        layer = self._layer()
        if self.config.claim_queued and layer is not None and not self._stopping:
            channel = await self._ensure_channel()
            if channel is not None:
                # Group memberships expire (a day by default): renew ours as long as we are alive.
                await layer.group_add(events.WORKERS_GROUP, channel)

    async def _reap(self, *, tick_started: float | None = None) -> None:
        """Expire unwatched runs, reap lost ones, purge what retention says. ``tick_started``: when this
        supervision tick began (its cancel checks and heartbeat came first), or now."""
        loop = asyncio.get_running_loop()
        started = loop.time() if tick_started is None else tick_started
        window = timedelta(seconds=settings.RUN_ATTACH_WINDOW_SECONDS)
        expired = await database_sync_to_async(runs_expire_unwatched)(window=window)
        if expired:
            logger.info("executor %s: %d run(s) cancelled, not watched in time", self.worker_id, len(expired))
        now = loop.time()
        # A tick that waited this long got its answer only when the database came back (a restart shorter than the
        # pool's timeout fails nothing): the live executors waited as long to heartbeat. The drill's PostgreSQL
        # restart found it, its runs reaped a moment after the database returned.
        if now - started > self.config.heartbeat_s * WAITED_LOST_FRACTION:
            self._database_lost = True
        if self._database_lost:  # this tick reached the database again (the expiry above did): a grace first
            self._database_lost = False
            self._reap_not_before = now + self.config.stale_after_s
        lost: list[Run] = []
        if now >= self._reap_not_before:
            stale_after = timedelta(seconds=self.config.stale_after_s)
            lost = await database_sync_to_async(runs_reap_lost)(stale_after=stale_after)
        await database_sync_to_async(runs_cancel_for_suspended_orgs)()  # what a suspension's own sweep missed
        # Retention (README "Retention"): workspaces past their window or left by a dead run every tick (the first
        # tick after a start is the cleanup after a crash); old audit events and webhook delivery ids hourly.
        await database_sync_to_async(workspaces_purge)()
        if now >= self._next_retention:
            self._next_retention = now + RETENTION_INTERVAL_SECONDS
            await database_sync_to_async(retention_purge)()
        if lost:
            logger.warning(
                "executor %s reaped %d lost run(s): %s",
                self.worker_id,
                len(lost),
                ", ".join(str(run.id) for run in lost),
            )

    async def _listen(self) -> None:
        """Channel-layer messages for this executor: cancel requests of its runs, and queue nudges."""
        assert self._wake is not None  # noqa: S101 - start() sets it
        layer = self._layer()
        failures = 0
        while not self._closed:
            try:
                channel = await self._ensure_channel()
                if channel is None:
                    return
                message = await layer.receive(channel)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarting: the polls cover for us meanwhile
                failures += 1
                if failures == 1:
                    logger.warning("executor %s: channel layer error %s", self.worker_id, type(exc).__name__)
                await asyncio.sleep(min(5.0, 0.2 * failures))
                continue
            kind = message.get("type") if isinstance(message, dict) else None
            if kind == "run.cancel":
                run_id = _parse_uuid(message.get("run_id"))
                active = self._active.get(run_id) if run_id is not None else None
                if active is not None:
                    active.control.request_stop(STOP_CANCELLED)
            elif kind == "run.nudge":
                run_id = _parse_uuid(message.get("run_id"))
                if run_id is not None and self._free_slots() > 0:
                    self._spawn_internal(self._claim_nudged(run_id), "nudged-claim")
                else:
                    self._wake.set()

    async def _claim_nudged(self, run_id: uuid.UUID) -> None:
        """The run a nudge names, claimed directly (the path from a watcher attaching to its first words, one fair
        pass over the queue shorter); if another executor won it, or its org has no slot, the queue is looked at as
        on any nudge."""
        try:
            claimed = await self.submit_run(run_id)
        except Exception as exc:  # the database went away: the supervisor's polls take over
            logger.warning("executor %s: nudged claim failed (%s)", self.worker_id, type(exc).__name__)
            claimed = False
        if not claimed and self._wake is not None:
            self._wake.set()

    async def _ensure_channel(self) -> str | None:
        layer = self._layer()
        if layer is None or self._channel_lock is None:
            return None
        async with self._channel_lock:
            if self._channel is None:
                try:
                    self._channel = await layer.new_channel()
                except Exception as exc:
                    logger.warning("executor %s: no channel (%s)", self.worker_id, type(exc).__name__)
                    return None
                if self.config.claim_queued:
                    with suppress(Exception):
                        await layer.group_add(events.WORKERS_GROUP, self._channel)
        return self._channel

    # --- Helpers --------------------------------------------------------------------------------------------

    def _free_slots(self) -> int:
        return self.config.concurrency - len(self._active) - self._claiming

    @property
    def _claims(self) -> bool:
        """Whether this executor claims from the queue now: always, or while runs submitted to it wait."""
        return self.config.claim_queued or bool(self._submitted)

    def _layer(self) -> Any:
        return self.layer if self.layer is not None else get_channel_layer()

    def _run_tasks(self) -> list[asyncio.Task[None]]:
        return [a.task for a in self._active.values() if a.task is not None and not a.task.done()]

    def _spawn_internal(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"executor-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._internal_done)

    def _internal_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("executor %s: %s died (%s)", self.worker_id, task.get_name(), type(task.exception()).__name__)


async def _report_sandbox() -> None:
    """The command sandbox's self-test at startup, so a broken sandbox shows in the log before the first agent run
    needs it (agent commands are then refused with a clear error, never run unsandboxed)."""
    status = await asyncio.to_thread(sandbox_status)
    if not status.ok:
        logger.warning("sandbox self-test FAILED: agent runs cannot run commands (%s)", status.detail)


def _parse_uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _close_db_connections() -> None:
    from django.db import connections

    connections.close_all()
