"""One org flooding the executors cannot hold up another org's run, and never has more runs executing than its cap:
with real ``run_worker`` processes and with the inline executor bound to the server's loop (and the background
executor of processes without one). The flood is 20 runs against the simulator's slow scenario.

The bound is stated in runs, not seconds: while the other org's run waits, at most one of the flood's runs starts
(with a free slot it starts at once; with every slot taken by the flood it takes the first or second slot that
frees up). Without fair claiming it waits for the whole backlog. Timings are only deadlines for polling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from runs import executor as executor_module
from runs.models import Run, RunStatus
from runs.services import runs_cancel_for_org
from tests.runs.test_execution_support import (
    amake_run,
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
    make_run,
    sim_key,
    wait_for_status_sync,
)
from tests.runs.test_worker import Worker

pytestmark = pytest.mark.django_db(transaction=True)

TERMINAL = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED}
FLOOD = 20
# (executor concurrency, org cap): the cap leaves slots free for others; or no cap in reach, every slot flooded.
SHAPES = [pytest.param(4, 2, id="org-cap"), pytest.param(2, 8, id="all-slots-flooded")]


def _overtaken_by(run: Run, flood: list[Run]) -> int:
    """How many of the flood's runs started while ``run`` waited to start. At most one: the claims go to the org
    with fewest runs executing, and only a tie (both at none, the flood's run the older) lets the flood go first."""
    return Run.objects.filter(
        id__in=[r.id for r in flood], started_at__gt=run.created_at, started_at__lt=run.started_at
    ).count()


class RunningMax:
    """The most runs of one org seen running at once, polled until told to stop."""

    def __init__(self, org: Any) -> None:
        self.org = org
        self.most = 0

    def poll(self) -> int:
        running = Run.objects.filter(org=self.org, status=RunStatus.RUNNING).count()
        self.most = max(self.most, running)
        return running


def _poll_until(predicate: Callable[[], bool], watch: RunningMax, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        watch.poll()
        assert time.monotonic() < deadline, f"not reached within {timeout} s"
        time.sleep(0.02)
    watch.poll()


@pytest.mark.parametrize(("concurrency", "org_cap"), SHAPES)
def test_a_flooding_org_cannot_hold_up_another_orgs_run_on_run_workers(
    cast, simulator, settings, monkeypatch, concurrency, org_cap
):
    settings.RUN_EXECUTOR = "worker"  # this process only nudges; the worker executes
    monkeypatch.setenv("CESAFLOW_RUN_ORG_MAX_RUNNING", str(org_cap))
    monkeypatch.setenv("CESAFLOW_RUN_AGENT_WEIGHT", "1")  # no agent runs here; the default 4 would not fit a cap of 2
    worker = Worker("--concurrency", str(concurrency))
    try:
        key_a = sim_key(cast.org_a, cast.admin_a.user, simulator)
        key_b = sim_key(cast.org_b, cast.admin_b.user, simulator)
        flood = [make_run(cast.dev_a, key_a, model="fake/slow", objective=f"Flood {i}.") for i in range(FLOOD)]
        watch = RunningMax(cast.org_a)
        busy = min(concurrency, org_cap)
        _poll_until(lambda: watch.poll() >= busy, watch, timeout=20)

        other = make_run(cast.dev_b, key_b)
        _poll_until(lambda: Run.objects.get(id=other.id).status in TERMINAL, watch, timeout=30)

        other = Run.objects.get(id=other.id)
        assert other.status == RunStatus.SUCCEEDED, worker.output
        assert _overtaken_by(other, flood) <= 1, "org B's run waited behind org A's backlog"
        assert Run.objects.filter(org=cast.org_a, status=RunStatus.QUEUED).count() >= FLOOD - busy - 2
        assert watch.most <= org_cap
        runs_cancel_for_org(org=cast.org_a, actor=cast.admin_a.user)
        for run in flood:
            wait_for_status_sync(run.id, TERMINAL, timeout=15)
    finally:
        worker.kill()


async def _apoll_until(predicate: Callable[[], Any], watch: RunningMax, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    poll = sync_to_async(watch.poll)
    while not await predicate():
        await poll()
        assert time.monotonic() < deadline, f"not reached within {timeout} s"
        await asyncio.sleep(0.02)
    await poll()


@pytest.mark.usefixtures("async_isolation")
@pytest.mark.parametrize(("concurrency", "org_cap"), SHAPES)
async def test_a_flooding_org_cannot_hold_up_another_orgs_run_on_the_inline_executor(
    cast, simulator, settings, concurrency, org_cap
):
    settings.RUN_EXECUTOR = "inline"
    settings.RUN_WORKER_CONCURRENCY = concurrency
    settings.RUN_ORG_MAX_RUNNING = org_cap
    executor = executor_module.bind_server_loop()  # as the ASGI server does at startup: runs execute in this loop
    assert executor is not None
    try:
        key_a = await asim_key(cast.org_a, cast.admin_a.user, simulator)
        key_b = await asim_key(cast.org_b, cast.admin_b.user, simulator)
        flood = [await amake_run(cast.dev_a, key_a, model="fake/slow", objective=f"Flood {i}.") for i in range(FLOOD)]
        watch = RunningMax(cast.org_a)
        busy = min(concurrency, org_cap)

        async def flood_busy() -> bool:
            running: int = await sync_to_async(watch.poll)()
            return bool(running >= busy)

        await _apoll_until(flood_busy, watch, timeout=20)
        assert len(executor.active_run_ids) == busy  # the rest of the flood waits queued, not as tasks

        other = await amake_run(cast.dev_b, key_b)

        async def other_done() -> bool:
            return (await Run.objects.aget(id=other.id)).status in TERMINAL

        await _apoll_until(other_done, watch, timeout=30)
        other = await Run.objects.aget(id=other.id)
        assert other.status == RunStatus.SUCCEEDED
        assert other.worker_id == executor.worker_id
        assert await sync_to_async(_overtaken_by)(other, flood) <= 1, "org B's run waited behind org A's backlog"
        assert watch.most <= org_cap
    finally:
        await sync_to_async(runs_cancel_for_org)(org=cast.org_a, actor=cast.admin_a.user)
        await executor_module.unbind_server_loop()


@pytest.mark.usefixtures("async_isolation")
async def test_the_background_executor_holds_runs_beyond_the_cap_and_starts_each_in_turn(cast, simulator, settings):
    """Where no server loop exists (a management command), runs execute in a background thread's executor, which
    does not look at the queue: it keeps the runs it could not start yet and starts them as slots free up."""
    settings.RUN_EXECUTOR = "inline"
    settings.RUN_ORG_MAX_RUNNING = 1
    quick_but_not_instant = {"turns": [{"text": "One moment."}], "timing": {"first_token_ms": 300, "per_event_ms": 50}}
    simulator.enqueue("openai", quick_but_not_instant, quick_but_not_instant, quick_but_not_instant)
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    runs = [await amake_run(cast.dev_a, key, objective=f"Turn {i}.") for i in range(3)]
    watch = RunningMax(cast.org_a)

    async def all_done() -> bool:
        return await Run.objects.filter(id__in=[r.id for r in runs], status=RunStatus.SUCCEEDED).acount() == 3

    await _apoll_until(all_done, watch, timeout=30)
    assert watch.most == 1
    finished = [await Run.objects.aget(id=run.id) for run in runs]
    started = [run.started_at for run in finished if run.started_at is not None]
    assert len(started) == 3
    assert started == sorted(started)  # in the order they were submitted
    assert await sync_to_async(executor_module.wait_for_background_runs)(10)
