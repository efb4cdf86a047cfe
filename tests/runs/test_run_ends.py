"""Ending many runs at once: ``runs.services.runs_finish`` (one transaction, a fixed number of statements, the same
outcome as ending each alone) and the gateway's writer that batches a process's ends (``runs.api.run_ends``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from keys.models import Provider, ProviderKey
from keys.services import provider_key_create
from orgs.models import Organization
from runs.api import run_ends
from runs.api.run_ends import record_end
from runs.models import Run, RunKind, RunStatus, TokenBudget, UsageRecord
from runs.selectors import tokens_used_this_month
from runs.services import RunEnd, UsageEntry, run_create, run_finish, runs_finish
from tests.live_server import ROOT, fresh_clone_env
from tests.runs.test_execution_support import async_isolation  # noqa: F401 - a fixture, used below

pytestmark = pytest.mark.django_db(transaction=True)  # the writer's thread hop needs committed rows

ESTIMATE = 1000


def _key(org: Organization, actor: Any) -> ProviderKey:
    return provider_key_create(
        org=org, actor=actor, provider=Provider.OPENAI, label="ends", secret="sk-test-ends-012345678"
    )


def _completions(org: Organization, actor: Any, count: int, *, cap: int | None = 1_000_000) -> list[Run]:
    org.monthly_token_cap = cap
    org.save(update_fields=["monthly_token_cap"])
    key = _key(org, actor)
    return [
        run_create(
            org=org,
            actor=actor,
            provider_key_id=key.id,
            model="gpt-4o",
            kind=RunKind.COMPLETION,
            token_estimate=ESTIMATE,
        )
        for _ in range(count)
    ]


def _used(tokens: int) -> list[UsageEntry]:
    return [UsageEntry("openai", "gpt-4o", input_tokens=tokens // 2, output_tokens=tokens - tokens // 2, complete=True)]


def _budget(org: Organization) -> tuple[int, int]:
    row = TokenBudget.objects.get(org=org)
    return row.used, row.reserved


def test_runs_of_two_orgs_end_in_one_transaction_as_they_would_one_by_one(cast, django_assert_num_queries):
    a_runs = _completions(cast.org_a, cast.admin_a.user, 3)
    b_runs = _completions(cast.org_b, cast.admin_b.user, 2)
    assert _budget(cast.org_a) == (0, 3 * ESTIMATE)
    # Reaped before its end arrives: it keeps that outcome, but what its call used is still billed.
    run_finish(run_id=a_runs[2].id, status=RunStatus.FAILED, usage=[], error_kind="worker_lost")
    assert _budget(cast.org_a) == (0, 2 * ESTIMATE)

    ends = [
        RunEnd(a_runs[0].id, RunStatus.SUCCEEDED, _used(120), held_run=a_runs[0]),
        RunEnd(a_runs[1].id, RunStatus.CANCELLED, _used(30), None, "cancelled", "The client disconnected."),
        RunEnd(a_runs[2].id, RunStatus.SUCCEEDED, _used(7)),
        RunEnd(b_runs[0].id, RunStatus.FAILED, [], error_kind="provider_error"),
        RunEnd(b_runs[1].id, RunStatus.SUCCEEDED, _used(400) + _used(100)),
    ]
    # BEGIN, the rows locked in one read, one UPDATE per org's budget row, one INSERT of the ledger rows, one UPDATE
    # of the runs, COMMIT.
    with django_assert_num_queries(7):
        ended = runs_finish(ends)

    assert ended[a_runs[0].id] is a_runs[0]  # the instance the caller held, brought up to date
    outcome = {run.id: (run.status, run.total_tokens, run.tokens_reserved) for run in ended.values()}
    assert outcome == {run.id: (run.status, run.total_tokens, run.tokens_reserved) for run in Run.objects.all()}
    assert outcome == {
        a_runs[0].id: (RunStatus.SUCCEEDED, 120, 0),
        a_runs[1].id: (RunStatus.CANCELLED, 30, 0),
        a_runs[2].id: (RunStatus.FAILED, 7, 0),
        b_runs[0].id: (RunStatus.FAILED, 0, 0),
        b_runs[1].id: (RunStatus.SUCCEEDED, 500, 0),
    }
    assert Run.objects.get(id=a_runs[2].id).error_kind == "worker_lost"
    assert Run.objects.get(id=b_runs[0].id).usage_complete is False  # no usage reported: not complete
    assert _budget(cast.org_a) == (157, 0)
    assert tokens_used_this_month(org=cast.org_a) == 157
    assert _budget(cast.org_b) == (500, 0)
    assert tokens_used_this_month(org=cast.org_b) == 500
    assert UsageRecord.objects.filter(run_id=b_runs[1].id).count() == 2


def test_an_end_whose_run_is_gone_is_left_out_and_ending_it_alone_says_so(cast):
    (run,) = _completions(cast.org_a, cast.admin_a.user, 1)
    missing = uuid.uuid4()
    ended = runs_finish([RunEnd(missing, RunStatus.SUCCEEDED, _used(5)), RunEnd(run.id, RunStatus.SUCCEEDED, [])])
    assert list(ended) == [run.id]
    assert not UsageRecord.objects.filter(run_id=missing).exists()
    with pytest.raises(Run.DoesNotExist):
        run_finish(run_id=missing, status=RunStatus.SUCCEEDED, usage=[])
    with pytest.raises(ValueError, match="one end per run"):
        runs_finish([RunEnd(run.id, RunStatus.SUCCEEDED, []), RunEnd(run.id, RunStatus.FAILED, [])])
    with pytest.raises(ValueError, match="terminal"):
        RunEnd(run.id, RunStatus.RUNNING, [])


def test_the_month_first_usage_of_an_org_without_a_cap_starts_its_budget_row_from_the_ledger(cast):
    runs = _completions(cast.org_b, cast.admin_b.user, 2, cap=None)
    runs_finish([RunEnd(runs[0].id, RunStatus.SUCCEEDED, _used(40))])
    assert _budget(cast.org_b) == (40, 0)
    runs_finish([RunEnd(runs[1].id, RunStatus.SUCCEEDED, _used(2))])
    assert _budget(cast.org_b) == (42, 0)
    assert tokens_used_this_month(org=cast.org_b) == 42


# --- The gateway's writer -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("async_isolation")
async def test_ends_that_come_together_are_written_together(cast):
    runs = await sync_to_async(_completions)(cast.org_a, cast.admin_a.user, 5)
    ends = [RunEnd(run.id, RunStatus.SUCCEEDED, _used(10), held_run=run) for run in runs]

    written = await asyncio.gather(*(record_end(end) for end in ends))

    assert [run.status for run in written] == [RunStatus.SUCCEEDED] * 5
    # One transaction wrote them: every run's end carries that transaction's one timestamp.
    assert len({run.finished_at for run in written}) == 1
    assert await UsageRecord.objects.filter(org=cast.org_a).acount() == 5
    assert await sync_to_async(_budget)(cast.org_a) == (50, 0)


@pytest.mark.usefixtures("async_isolation")
async def test_an_end_the_database_refuses_fails_alone(cast):
    runs = await sync_to_async(_completions)(cast.org_a, cast.admin_a.user, 4)
    poisoned = RunEnd(runs[3].id, RunStatus.SUCCEEDED, [UsageEntry("openai", "gpt-4o", 2**63, 0, True)])
    missing = RunEnd(uuid.uuid4(), RunStatus.SUCCEEDED, [])
    good = [RunEnd(run.id, RunStatus.SUCCEEDED, _used(10), held_run=run) for run in runs[:3]]

    outcomes = await asyncio.gather(*(record_end(end) for end in [*good, poisoned, missing]), return_exceptions=True)

    assert [getattr(run, "status", run) for run in outcomes[:3]] == [RunStatus.SUCCEEDED] * 3
    assert type(outcomes[3]).__name__ == "DataError"  # out of bigint's range: refused by PostgreSQL
    assert isinstance(outcomes[4], Run.DoesNotExist)
    refused = await Run.objects.aget(id=runs[3].id)
    assert (refused.status, refused.total_tokens) == (RunStatus.RUNNING, 0)  # nothing half-written
    assert await UsageRecord.objects.filter(org=cast.org_a).acount() == 3
    assert await sync_to_async(_budget)(cast.org_a) == (30, ESTIMATE)  # only the refused run still holds its estimate


@pytest.mark.usefixtures("async_isolation")
async def test_a_cancelled_caller_does_not_cancel_its_runs_end(cast):
    (run,) = await sync_to_async(_completions)(cast.org_a, cast.admin_a.user, 1)
    caller = asyncio.ensure_future(record_end(RunEnd(run.id, RunStatus.SUCCEEDED, _used(8), held_run=run)))
    await asyncio.sleep(0)
    caller.cancel()
    deadline = asyncio.get_running_loop().time() + 5
    while (await Run.objects.aget(id=run.id)).status != RunStatus.SUCCEEDED:
        assert asyncio.get_running_loop().time() < deadline, "the end was never written"
        await asyncio.sleep(run_ends.LINGER_S)
    assert caller.cancelled()
    assert await UsageRecord.objects.filter(run_id=run.id).acount() == 1


@pytest.mark.usefixtures("async_isolation")
async def test_an_end_a_response_waits_for_goes_at_once_with_those_lingering(cast, monkeypatch):
    monkeypatch.setattr(run_ends, "LINGER_S", 60.0)
    lingering, failed = await sync_to_async(_completions)(cast.org_a, cast.admin_a.user, 2)
    later = asyncio.ensure_future(record_end(RunEnd(lingering.id, RunStatus.SUCCEEDED, _used(4), held_run=lingering)))
    await asyncio.sleep(0.05)
    assert not later.done()  # waiting for others to join it
    now = await asyncio.wait_for(
        record_end(RunEnd(failed.id, RunStatus.FAILED, [], None, "provider_error"), at_once=True), timeout=10
    )
    assert now.status == RunStatus.FAILED
    assert (await asyncio.wait_for(later, timeout=10)).finished_at == now.finished_at  # in the same transaction


SQLITE_SETUP = """
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from keys.models import Provider
from keys.services import provider_key_create
from orgs.models import User
from orgs.services import organization_create
from runs.models import Run, RunKind, RunStatus, UsageRecord
from runs.services import RunEnd, UsageEntry, run_create, runs_finish
user = User.objects.create_user(email="dev@example.com", password="a-long-dev-password-1")
org = organization_create(name="Dev", admin=user, slug="dev")
key = provider_key_create(org=org, actor=user, provider=Provider.OPENAI, label="k", secret="sk-test-dev-0123456789")
runs = [
    run_create(org=org, actor=user, provider_key_id=key.id, model="m", kind=RunKind.COMPLETION, token_estimate=9)
    for _ in range(RUNS)
]
used = [UsageEntry("openai", "m", 2, 3, True)]
"""


def _sqlite_script(tmp_path: Path, script: str, *, runs: int) -> str:
    """``script`` after ``SQLITE_SETUP`` (``runs`` completions, running) in a process of its own on a SQLite file, as
    ``make run`` (or a ``sqlite://`` ``DATABASE_URL``) configures it; what the script printed last."""
    env = fresh_clone_env(CESAFLOW_DEBUG="true", DATABASE_URL=f"sqlite:///{tmp_path / 'dev.sqlite3'}")
    code = SQLITE_SETUP.replace("RUNS", str(runs)) + script
    argv = [sys.executable, "-c", code]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split("\n")[-2]


def test_make_runs_sqlite_database_ends_runs_in_batches_too(tmp_path):
    # `make run` serves from SQLite, which has no UNNEST: the batch's update takes the per-run path there.
    script = """
runs_finish([RunEnd(run.id, RunStatus.SUCCEEDED, used, held_run=run) for run in runs])
print(sorted({(run.status, run.total_tokens) for run in Run.objects.all()}), UsageRecord.objects.count())
"""
    assert _sqlite_script(tmp_path, script, runs=3) == "[('succeeded', 5)] 3"


def test_sqlite_writers_in_several_threads_wait_for_each_other_instead_of_failing(tmp_path):
    # A server's threads end runs (and write whatever else) side by side. Each end reads its run, then writes: with
    # SQLite's default deferred transactions two such writers meet as "database is locked" at once, and the gateway
    # lost the end (found by the fresh-clone walkthrough in CI).
    script = """
import threading
from django.db import connection
failures = []
def end(share):
    try:
        for run in share:
            runs_finish([RunEnd(run.id, RunStatus.SUCCEEDED, used)])
    except Exception as exc:
        failures.append(type(exc).__name__)
    finally:
        connection.close()
threads = [threading.Thread(target=end, args=(runs[n::4],)) for n in range(4)]
[thread.start() for thread in threads]
[thread.join() for thread in threads]
print(failures, Run.objects.filter(status=RunStatus.SUCCEEDED).count(), UsageRecord.objects.count())
"""
    assert _sqlite_script(tmp_path, script, runs=80) == "[] 80 80"


def test_the_gateways_writer_writes_an_end_again_once_the_database_answers(tmp_path):
    # The database busy for a moment (here: another connection holds SQLite's write lock longer than a writer waits;
    # on PostgreSQL, a restart) must not lose a run's end and the usage its provider bills.
    script = """
import asyncio, sqlite3, threading, time
from django.conf import settings
from django.db import connection
from runs.api.run_ends import record_end
connection.close()
settings.DATABASES["default"]["OPTIONS"]["timeout"] = 0.1  # a writer gives up on the lock after 0.1 s
holder = sqlite3.connect(settings.DATABASES["default"]["NAME"], check_same_thread=False)
holder.execute("BEGIN EXCLUSIVE")
threading.Timer(1.0, holder.commit).start()
run = runs[0]
written = asyncio.run(record_end(RunEnd(run.id, RunStatus.SUCCEEDED, used, held_run=run)))
print(written.status, Run.objects.get(id=run.id).status, UsageRecord.objects.filter(run_id=run.id).count())
"""
    assert _sqlite_script(tmp_path, script, runs=1) == "succeeded succeeded 1"
