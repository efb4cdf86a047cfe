"""``manage.py run_worker`` as real processes on the test database: exactly-once claiming across workers, a worker
killed mid-run reaped to ``worker_lost`` by another, and a graceful shutdown that records its runs.

Small heartbeat and reap intervals keep these fast; ``transaction=True`` so the workers see the rows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection

from runs.models import AuditEvent, Run, RunStatus, UsageRecord
from tests.runs.test_execution_support import make_run, sim_key, wait_for_status_sync

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED}


def _database_url() -> str:
    db = connection.settings_dict
    credentials = quote(db["USER"] or "", safe="")
    if db.get("PASSWORD"):
        credentials += ":" + quote(db["PASSWORD"], safe="")
    return f"postgres://{credentials}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or '5432'}/{db['NAME']}"


class Worker:
    """One ``run_worker`` process; its output is collected in the background."""

    def __init__(self, *extra: str) -> None:
        env = {
            **os.environ,
            "DATABASE_URL": _database_url(),
            "REDIS_URL": settings.REDIS_URL,
            "CESAFLOW_CHANNEL_LAYER_KEY": settings.CHANNEL_LAYER_KEY,
            "CESAFLOW_EXECUTOR": "worker",
            "PYTHONUNBUFFERED": "1",
        }
        # Runs go stale after 2 s without a heartbeat: quick to reap, with margin for a busy test machine.
        args = ["--heartbeat", "0.2", "--stale-after", "2", "--poll", "0.2", *extra]
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "run_worker", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self.worker_id = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(30):
            self.kill()
            raise AssertionError("run_worker did not start:\n" + "\n".join(self.lines[-40:]))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if line.startswith("run_worker ") and line.endswith(")") and "ready" in line:
                self.worker_id = line.split()[1]
                self._ready.set()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def workers(settings) -> Iterator[list[Worker]]:
    settings.RUN_EXECUTOR = "worker"  # this process only nudges; the workers execute
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.kill()


def test_two_workers_execute_every_run_exactly_once(cast, simulator, workers):
    workers.extend([Worker(), Worker()])
    key = sim_key(cast.org_a, cast.admin_a.user, simulator)
    runs = [make_run(cast.dev_a, key, objective=f"Run number {i}.") for i in range(8)]
    finished = [wait_for_status_sync(run.id, TERMINAL, timeout=20) for run in runs]

    assert [(run.status, run.error_kind) for run in finished] == [(RunStatus.SUCCEEDED, "")] * len(runs), (
        workers[0].output + workers[1].output
    )
    assert {run.worker_id for run in finished} <= {workers[0].worker_id, workers[1].worker_id}
    # One provider call, one key opening and one ledger row per run: nobody executed a run twice.
    prompts = sorted(request["body"]["messages"][-1]["content"] for request in simulator.requests())
    assert prompts == sorted(f"Run number {i}." for i in range(8))
    references = sorted(
        AuditEvent.objects.filter(event=AuditEvent.KEY_USED).values_list("metadata__reference", flat=True)
    )
    assert references == sorted(str(run.id) for run in runs)
    assert UsageRecord.objects.filter(run__in=runs).count() == len(runs)


def test_worker_killed_mid_run_is_reaped_to_worker_lost_by_another(cast, simulator, workers):
    doomed = Worker()
    workers.append(doomed)
    key = sim_key(cast.org_a, cast.admin_a.user, simulator)
    run = make_run(cast.dev_a, key, model="fake/slow")
    running = wait_for_status_sync(run.id, {RunStatus.RUNNING}, timeout=10)
    assert running.worker_id == doomed.worker_id
    simulator.wait_for(lambda entry: entry["events_sent"] > 0, timeout=5)

    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(10)
    assert Run.objects.get(id=run.id).status == RunStatus.RUNNING  # nobody recorded anything: it just died

    survivor = Worker()
    workers.append(survivor)
    started = time.monotonic()
    lost = wait_for_status_sync(run.id, TERMINAL, timeout=10)
    assert (lost.status, lost.error_kind) == (RunStatus.FAILED, "worker_lost")
    assert lost.usage_complete is False
    assert time.monotonic() - started < 6  # stale after 2 s, reaped on the survivor's next sweep
    assert len(simulator.requests()) == 1  # reaped, never executed a second time
    deadline = time.monotonic() + 5
    while f"reaped 1 lost run(s): {run.id}" not in survivor.output:
        assert time.monotonic() < deadline, survivor.output
        time.sleep(0.05)


def test_sigterm_stops_running_runs_and_records_them(cast, simulator, workers):
    worker = Worker("--grace", "0")
    workers.append(worker)
    key = sim_key(cast.org_a, cast.admin_a.user, simulator)
    run = make_run(cast.dev_a, key, model="fake/slow")
    wait_for_status_sync(run.id, {RunStatus.RUNNING}, timeout=10)
    simulator.wait_for(lambda entry: entry["events_sent"] > 0, timeout=5)

    worker.process.send_signal(signal.SIGTERM)
    try:
        code = worker.process.wait(15)
    except subprocess.TimeoutExpired:
        worker.kill()
        raise AssertionError(worker.output) from None
    assert code == 0, worker.output
    stopped = Run.objects.get(id=run.id)
    assert (stopped.status, stopped.error_kind) == (RunStatus.FAILED, "worker_lost")
    assert "shut down" in stopped.error_message
    simulator.wait_for(lambda entry: entry["client_closed"])
    assert "stopped" in worker.output


def test_run_worker_refuses_bad_intervals():
    result = subprocess.run(
        [sys.executable, "manage.py", "run_worker", "--heartbeat", "5", "--stale-after", "6"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": _database_url(), "REDIS_URL": settings.REDIS_URL},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert b"--stale-after must be at least twice --heartbeat" in result.stderr
