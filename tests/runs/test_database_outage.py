"""Runs across a database outage (found by the deployment drill, ``deploy/drill.py``): what already happened is
recorded once the database is back, and an executor that lost the database does not reap the runs of executors
that are alive but could not heartbeat meanwhile."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connection
from django.utils import timezone

from runs import execution_common
from runs.execution_common import record
from runs.models import Run, RunStatus
from runs.services import run_claim
from tests.runs.test_execution_support import (
    amake_run,
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
    make_executor,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]


@pytest.fixture(autouse=True)
def _runs_wait_for_the_test(settings):
    # submit() only nudges workers: the runs here are claimed by hand.
    settings.RUN_EXECUTOR = "worker"


async def test_record_retries_a_write_until_the_database_answers_again():
    attempts: list[float] = []

    def write(*, value: int) -> int:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise OperationalError("couldn't get a connection")  # what the pool raises while PostgreSQL is away
        return value * 2

    assert await record(write, value=21) == 42
    assert len(attempts) == 3


async def test_record_gives_up_after_its_window(monkeypatch):
    monkeypatch.setattr(execution_common, "RECORD_RETRY_SECONDS", 0.3)

    def write() -> None:
        raise OperationalError("couldn't get a connection")

    with pytest.raises(OperationalError):
        await record(write)


async def test_record_does_not_retry_other_errors():
    attempts = []

    def write() -> None:
        attempts.append(1)
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        await record(write)
    assert attempts == [1]


async def _stale_run(cast, simulator) -> Run:
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key)
    await sync_to_async(run_claim)(run_id=run.id, worker_id="alive-but-cut-off")
    await Run.objects.filter(id=run.id).aupdate(heartbeat_at=timezone.now() - timedelta(seconds=5))
    return run


async def test_executor_back_from_a_database_outage_waits_stale_after_before_reaping(cast, simulator):
    run = await _stale_run(cast, simulator)
    executor = make_executor(reap=True, stale_after_s=1.0)
    executor._database_lost = True  # what a failed supervision tick records
    await executor._reap()
    assert (await Run.objects.aget(id=run.id)).status == RunStatus.RUNNING, "reaped at once after the outage"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and executor._reap_not_before > asyncio.get_running_loop().time():
        await asyncio.sleep(0.05)
    # The run's own executor got its heartbeat in during the grace: it is not lost.
    await Run.objects.filter(id=run.id).aupdate(heartbeat_at=timezone.now())
    await executor._reap()
    assert (await Run.objects.aget(id=run.id)).status == RunStatus.RUNNING


async def test_executor_back_from_a_database_outage_still_reaps_a_dead_executors_run(cast, simulator):
    run = await _stale_run(cast, simulator)
    executor = make_executor(reap=True, stale_after_s=1.0)
    executor._database_lost = True
    await executor._reap()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (await Run.objects.aget(id=run.id)).status == RunStatus.RUNNING:
        await asyncio.sleep(0.1)
        await executor._reap()
    finished = await Run.objects.aget(id=run.id)
    assert (finished.status, finished.error_kind) == (RunStatus.FAILED, "worker_lost")


async def test_executor_whose_tick_waited_for_the_database_waits_stale_after_before_reaping(cast, simulator):
    # A restart shorter than the pool's timeout fails nothing: the tick's first statement just waits for the database
    # to answer, as every live executor's heartbeat does. Here the wait is real: the runs table locked meanwhile.
    run = await _stale_run(cast, simulator)
    executor = make_executor(reap=True, heartbeat_s=0.2, stale_after_s=1.0)
    with psycopg.connect(**connection.get_connection_params()) as holder:
        holder.execute(f"LOCK TABLE {Run._meta.db_table} IN ACCESS EXCLUSIVE MODE")
        asyncio.get_running_loop().call_later(0.5, holder.commit)
        await executor._reap()
    assert (await Run.objects.aget(id=run.id)).status == RunStatus.RUNNING, "reaped the moment the database answered"
    assert executor._reap_not_before > asyncio.get_running_loop().time()


async def test_executor_whose_tick_did_not_wait_reaps_a_stale_run_at_once(cast, simulator):
    run = await _stale_run(cast, simulator)
    executor = make_executor(reap=True, heartbeat_s=0.2, stale_after_s=1.0)
    await executor._reap()
    reaped = await Run.objects.aget(id=run.id)
    assert (reaped.status, reaped.error_kind) == (RunStatus.FAILED, "worker_lost")
