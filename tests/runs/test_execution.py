"""Executing chat runs against the provider simulator: the event stream, the recorded outcome and usage, and every
failure kind of issue #5 point 9. Runs execute in an Executor inside the test's event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import transaction
from django.utils import timezone

from keys.models import KeyStatus, ProviderKey
from keys.services import provider_key_revoke
from runs.execution import SYSTEM_PROMPT
from runs.models import AuditEvent, Run, RunKind, RunStatus, UsageRecord
from runs.services import run_claim, run_create, run_request_cancel, runs_reap_lost
from tests.runs.test_execution_support import (
    FAST_LIMITS,
    EventWatcher,
    amake_run,
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
    execute,
    running_executor,
    simulator_saw,
    wait_for_status,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]


@pytest.fixture(autouse=True)
def _runs_wait_for_the_test(settings):
    # submit() only nudges workers: each test hands its runs to its own executor.
    settings.RUN_EXECUTOR = "worker"


async def _usage_rows(run: Run) -> list[UsageRecord]:
    return [u async for u in UsageRecord.objects.filter(run_id=run.id).order_by("created_at")]


async def test_chat_run_streams_its_answer_then_records_tokens_and_usage(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key, objective="Say hello.")
    async with running_executor() as executor:
        finished, watcher = await execute(executor, run)

    kinds = [e["type"] for e in watcher.events]
    assert kinds[0] == "run.status"
    assert watcher.events[0]["status"] == "running"
    assert kinds[-1] == "run.finished"
    assert "usage" in kinds
    assert [e["seq"] for e in watcher.events] == list(range(1, len(watcher.events) + 1))
    assert all(e["run_id"] == str(run.id) for e in watcher.events)
    assert watcher.text == "You asked: Say hello."
    assert finished.status == RunStatus.SUCCEEDED
    assert finished.input_tokens > 0
    assert finished.output_tokens > 0
    assert finished.usage_complete is True
    assert watcher.events[-1]["status"] == "succeeded"
    assert watcher.events[-1]["output_tokens"] == finished.output_tokens
    [usage] = await _usage_rows(run)
    assert (usage.input_tokens, usage.output_tokens, usage.complete) == (
        finished.input_tokens,
        finished.output_tokens,
        True,
    )
    # The provider got a short system prompt and the objective; the key was opened once, for this run.
    [request] = simulator.requests()
    assert request["body"]["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Say hello."},
    ]
    used = [e async for e in AuditEvent.objects.filter(event=AuditEvent.KEY_USED)]
    assert [(e.metadata.get("purpose"), e.metadata.get("reference")) for e in used] == [("run", str(run.id))]


async def test_runs_one_after_another_reuse_the_connection_to_their_provider(cast, simulator):
    # Each run reads its answer to the end, so the next call skips a new TCP (and, to a real provider, TLS) handshake.
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    runs = [await amake_run(cast.dev_a, key, objective=f"Say {word}.") for word in ("one", "two")]
    async with running_executor() as executor:
        for run in runs:
            finished, watcher = await execute(executor, run)
            assert (finished.status, watcher.text) == (RunStatus.SUCCEEDED, f"You asked: {run.objective}")
    first, second = simulator.requests()
    assert first["connection"]
    assert second["connection"] == first["connection"]


@pytest.mark.parametrize("flavour", ["anthropic", "groq"])
async def test_runs_stream_through_every_provider_dialect(cast, simulator, flavour):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator, flavour=flavour)
    run = await amake_run(cast.dev_a, key, model="fake/normal", objective="Hi there.")
    async with running_executor() as executor:
        finished, watcher = await execute(executor, run)
    assert finished.status == RunStatus.SUCCEEDED
    assert watcher.text == "You asked: Hi there."
    assert finished.usage_complete is True


async def test_provider_401_fails_the_run_as_auth_and_marks_the_key_invalid(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator, secret="fake-401-rejected-key-0123")
    run = await amake_run(cast.dev_a, key)
    async with running_executor() as executor:
        finished, watcher = await execute(executor, run)

    assert finished.status == RunStatus.FAILED
    assert finished.error_kind == "auth"
    assert "rejected the key" in finished.error_message
    [error] = watcher.of_type("error")
    assert (error["kind"], error["retryable"]) == ("auth", False)
    assert watcher.events[-1]["error_kind"] == "auth"
    assert (await ProviderKey.objects.aget(id=key.id)).status == KeyStatus.INVALID
    assert await AuditEvent.objects.filter(event=AuditEvent.KEY_CHECKED, target_id=str(key.id)).aexists()
    assert len(simulator.requests()) == 1  # a rejected key is not retried
    assert await _usage_rows(run) == []  # nothing was billed


async def test_rate_limited_call_is_retried_after_retry_after_then_succeeds(cast, simulator):
    simulator.enqueue("openai", {"base": "429", "fault": {"retry_after_s": 0.2}})
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key)
    async with running_executor() as executor:
        started = time.monotonic()
        finished, watcher = await execute(executor, run)
        elapsed = time.monotonic() - started

    assert finished.status == RunStatus.SUCCEEDED
    assert elapsed >= 0.2  # the retry-after was honoured
    [retrying] = [e for e in watcher.of_type("run.status") if "retrying_in_s" in e]
    assert retrying["retrying_in_s"] == pytest.approx(0.2)
    assert retrying["retry_reason"] == "rate limited, retrying in 0.2 s"
    assert [r["status"] for r in simulator.requests()] == [429, 200]


async def test_rate_limit_that_outlasts_the_retries_fails_the_run_as_rate_limit(cast, simulator):
    simulator.enqueue("openai", *[{"base": "429", "fault": {"retry_after_s": 0.01}}] * 3)
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key)
    async with running_executor() as executor:
        finished, watcher = await execute(executor, run)

    assert finished.status == RunStatus.FAILED
    assert finished.error_kind == "rate_limit"
    assert finished.error_message.endswith("(HTTP 429)")
    assert len([e for e in watcher.of_type("run.status") if "retrying_in_s" in e]) == FAST_LIMITS.max_retries
    assert len(simulator.requests()) == FAST_LIMITS.max_retries + 1
    assert (await ProviderKey.objects.aget(id=key.id)).status != KeyStatus.INVALID


@pytest.mark.parametrize(("scenario", "kind"), [("500", "server"), ("529", "overloaded")])
async def test_provider_errors_are_retried_with_backoff_then_fail(cast, simulator, scenario, kind):
    simulator.enqueue("openai", *[scenario] * 3)
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key)
    async with running_executor() as executor:
        finished, watcher = await execute(executor, run)

    assert finished.status == RunStatus.FAILED
    assert finished.error_kind == kind
    retries = [e for e in watcher.of_type("run.status") if "retrying_in_s" in e]
    assert len(retries) == 2
    assert all(0 < e["retrying_in_s"] <= FAST_LIMITS.backoff_max_s * 2 for e in retries)
    assert len(simulator.requests()) == 3


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("fake/midstream_error", "server"),
        ("fake/disconnect", "network"),
        ("fake/truncate", "incomplete"),
        ("fake/stall", "timeout"),
    ],
)
async def test_broken_streams_fail_with_their_kind_and_usage_flagged_incomplete(cast, simulator, model, kind):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key, model=model)
    # A short read timeout so the stall is detected quickly.
    limits = dataclasses.replace(FAST_LIMITS, read_timeout_s=0.3)
    async with running_executor(limits=limits) as executor:
        finished, watcher = await execute(executor, run)

    assert finished.status == RunStatus.FAILED
    assert finished.error_kind == kind
    assert finished.usage_complete is False
    assert watcher.text, "some text streamed before the failure"
    [error] = watcher.of_type("error")
    assert error["kind"] == kind
    # The text is broken off, so the call is not retried; its usage is in the ledger, flagged incomplete.
    assert len(simulator.requests()) == 1
    rows = await _usage_rows(run)
    assert rows
    assert not any(row.complete for row in rows)
    assert watcher.events[-1]["usage_complete"] is False


async def test_cancel_stops_the_provider_call_within_a_second_and_closes_the_upstream(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key, model="fake/slow")
    async with running_executor() as executor, EventWatcher(run.id) as watcher:
        assert await executor.submit_run(run.id)
        await watcher.until(lambda e: e["type"] == "text.delta")
        asked = time.monotonic()
        await sync_to_async(run_request_cancel)(run=run, actor=cast.dev_a.user)
        await watcher.until(lambda e: e["type"] == "run.finished", timeout=2)
        stopped_after = time.monotonic() - asked

    assert stopped_after < 1.0
    finished = await Run.objects.aget(id=run.id)
    assert finished.status == RunStatus.CANCELLED
    assert finished.error_kind == "cancelled"
    assert finished.usage_complete is False
    assert not watcher.of_type("error")
    await simulator_saw(simulator, lambda entry: entry["client_closed"])
    [row] = await _usage_rows(run)
    assert row.complete is False


async def test_a_cancel_while_the_answers_last_bytes_are_read_keeps_the_run_succeeded_and_billed_once(cast, simulator):
    """The provider sent its whole answer but holds its body open; a cancel that comes while the run reads the last
    bytes (``read_to_end``, here given all the time it wants) stops that read and drops the connection, but the
    answer was whole: the run succeeded, and its usage is recorded once, complete."""
    simulator.enqueue("openai", {"base": "echo", "timing": {"body_end_ms": 30_000}})
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key)
    patient = dataclasses.replace(FAST_LIMITS, drain_timeout_s=60.0, read_timeout_s=60.0)
    async with running_executor(limits=patient) as executor, EventWatcher(run.id) as watcher:
        assert await executor.submit_run(run.id)
        await watcher.until(lambda e: e["type"] == "usage")  # sent as the answer ends, before its last bytes
        await sync_to_async(run_request_cancel)(run=run, actor=cast.dev_a.user)
        await watcher.until(lambda e: e["type"] == "run.finished", timeout=5)

    finished = await Run.objects.aget(id=run.id)
    assert (finished.status, finished.usage_complete) == (RunStatus.SUCCEEDED, True)
    assert watcher.text == "You asked: Say hello."
    [row] = await _usage_rows(run)
    assert (row.input_tokens, row.output_tokens, row.complete) == (
        finished.input_tokens,
        finished.output_tokens,
        True,
    )
    await simulator_saw(simulator, lambda entry: entry["client_closed"])


async def test_a_cancelled_anthropic_run_keeps_the_input_tokens_the_provider_already_counted(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator, flavour="anthropic")
    run = await amake_run(cast.dev_a, key, model="fake/slow")
    async with running_executor() as executor, EventWatcher(run.id) as watcher:
        assert await executor.submit_run(run.id)
        await watcher.until(lambda e: e["type"] == "text.delta")
        await sync_to_async(run_request_cancel)(run=run, actor=cast.dev_a.user)
        await watcher.until(lambda e: e["type"] == "run.finished", timeout=2)

    finished = await Run.objects.aget(id=run.id)
    assert finished.status == RunStatus.CANCELLED
    # message_start reported the input tokens before the first delta: billed by the provider, so recorded.
    assert finished.input_tokens > 0
    assert finished.usage_complete is False
    [row] = await _usage_rows(run)
    assert (row.input_tokens, row.complete) == (finished.input_tokens, False)


async def test_cancel_flag_alone_stops_the_run_when_the_message_is_lost(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key, model="fake/slow")
    async with running_executor() as executor, EventWatcher(run.id) as watcher:
        assert await executor.submit_run(run.id)
        await watcher.until(lambda e: e["type"] == "text.delta")
        # Only the database flag: as if the channel-layer message had been lost.
        await Run.objects.filter(id=run.id).aupdate(cancel_requested_at=timezone.now())
        asked = time.monotonic()
        await watcher.until(lambda e: e["type"] == "run.finished", timeout=2)
        assert time.monotonic() - asked < 1.0
    assert (await Run.objects.aget(id=run.id)).status == RunStatus.CANCELLED
    await simulator_saw(simulator, lambda entry: entry["client_closed"])


async def test_fast_streams_are_coalesced_but_the_text_is_exact_and_the_first_delta_goes_alone(
    cast, simulator, settings
):
    settings.RUN_STREAM_COALESCE_SECONDS = 0.04
    text = "".join(f"word{i:03d} " for i in range(100))
    simulator.enqueue(
        "openai",
        {"turns": [{"text": text}], "stream_shape": {"text_chunk_chars": 2}, "timing": {"per_event_ms": 1}},
    )
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key)
    async with running_executor() as executor:
        finished, watcher = await execute(executor, run)

    provider_deltas = len(text) // 2
    deltas = watcher.of_type("text.delta")
    assert finished.status == RunStatus.SUCCEEDED
    assert watcher.text == text
    assert len(deltas) < provider_deltas / 4
    # The first provider delta is published on its own, before anything is batched.
    assert deltas[0]["text"] == text[:2]
    seqs = [e["seq"] for e in watcher.events]
    assert seqs == sorted(seqs)


async def test_slow_streams_deliver_at_least_three_separate_deltas(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key, model="fake/slow")
    async with running_executor() as executor, EventWatcher(run.id) as watcher:
        assert await executor.submit_run(run.id)
        for _ in range(3):
            await watcher.until(lambda e: e["type"] == "text.delta")
        await sync_to_async(run_request_cancel)(run=run, actor=cast.dev_a.user)
        await watcher.until_finished()
    arrivals = [t for t, e in zip(watcher.arrivals, watcher.events, strict=True) if e["type"] == "text.delta"]
    assert len(arrivals) >= 3
    assert arrivals[2] - arrivals[0] > 0.05  # they arrived over time, not in one burst


async def test_revoked_key_fails_the_run_without_calling_the_provider(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key)
    await sync_to_async(provider_key_revoke)(key=key, actor=cast.admin_a.user)
    async with running_executor() as executor:
        finished, watcher = await execute(executor, run)
    assert finished.status == RunStatus.FAILED
    assert finished.error_kind == "key_unavailable"
    assert watcher.of_type("error")[0]["kind"] == "key_unavailable"
    assert simulator.requests() == []


async def test_a_run_is_claimed_once_even_when_two_executors_race_for_it(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key)
    async with running_executor() as first, running_executor() as second:
        claimed = await asyncio.gather(first.submit_run(run.id), second.submit_run(run.id))
        assert sorted(claimed) == [False, True]
        await wait_for_status(run.id, {RunStatus.SUCCEEDED})
    assert len(simulator.requests()) == 1
    assert await sync_to_async(run_claim)(run_id=run.id, worker_id="late") is None


def _reap_as_if_stalled(run_id: Any) -> list[Run]:
    with transaction.atomic():
        Run.objects.select_for_update().filter(id=run_id).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
        return runs_reap_lost(stale_after=timedelta(minutes=1))


async def test_executor_heartbeats_its_runs_and_stops_a_run_reaped_elsewhere(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key, model="fake/slow")
    async with running_executor(heartbeat_s=0.05) as executor, EventWatcher(run.id) as watcher:
        assert await executor.submit_run(run.id)
        await watcher.until(lambda e: e["type"] == "text.delta")
        first_beat = (await Run.objects.aget(id=run.id)).heartbeat_at
        await asyncio.sleep(0.2)
        later_beat = (await Run.objects.aget(id=run.id)).heartbeat_at
        assert first_beat is not None
        assert later_beat is not None
        assert later_beat > first_beat
        # Another executor decides this one is lost (as if its heartbeats had stalled): the stale heartbeat and the
        # reap in one transaction, so this executor's next beat (every 50 ms) cannot land in between.
        [reaped] = await sync_to_async(_reap_as_if_stalled)(run.id)
        assert reaped.id == run.id
        await wait_for_status(run.id, {RunStatus.FAILED})
        assert await executor.wait_idle(2.0)
    finished = await Run.objects.aget(id=run.id)
    assert finished.error_kind == "worker_lost"
    await simulator_saw(simulator, lambda entry: entry["client_closed"])  # the provider call stopped too
    # The provider billed what it streamed: the usage still lands in the ledger, flagged incomplete.
    rows = await _usage_rows(run)
    assert rows
    assert not any(row.complete for row in rows)


async def test_executor_shutdown_records_its_running_runs_as_failed(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key, model="fake/slow")
    async with running_executor() as executor, EventWatcher(run.id) as watcher:
        assert await executor.submit_run(run.id)
        await watcher.until(lambda e: e["type"] == "text.delta")
        await executor.stop(grace_s=0)
        await watcher.until_finished(timeout=2)
    finished = await Run.objects.aget(id=run.id)
    assert finished.status == RunStatus.FAILED
    assert finished.error_kind == "worker_lost"
    assert "shut down" in finished.error_message


async def test_reaper_marks_runs_without_heartbeat_as_worker_lost(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key)
    await sync_to_async(run_claim)(run_id=run.id, worker_id="crashed-worker")
    await Run.objects.filter(id=run.id).aupdate(heartbeat_at=timezone.now() - timedelta(seconds=5))
    async with EventWatcher(run.id) as watcher, running_executor(reap=True, stale_after_s=1.0):
        finished_event = await watcher.until(lambda e: e["type"] == "run.finished", timeout=3)
    assert finished_event["error_kind"] == "worker_lost"
    finished = await Run.objects.aget(id=run.id)
    assert (finished.status, finished.error_kind) == (RunStatus.FAILED, "worker_lost")


async def test_queued_runs_are_picked_up_by_an_executor_that_polls_the_queue(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    runs = [await amake_run(cast.dev_a, key) for _ in range(3)]
    async with running_executor(claim_queued=True, poll_s=0.05) as executor:
        for run in runs:
            await wait_for_status(run.id, {RunStatus.SUCCEEDED})
        assert await executor.wait_idle(2.0)
    owners = {r.worker_id async for r in Run.objects.filter(id__in=[r.id for r in runs])}
    assert owners == {executor.worker_id}


async def test_reaper_also_ends_request_bound_runs_that_outlived_any_deadline(cast, simulator):
    """Proxy completions run inside their request, without heartbeats: if that process died, they are reaped
    once they are older than any call could last."""
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    old = await sync_to_async(run_create)(
        org=cast.org_a, actor=cast.dev_a.user, provider_key_id=key.id, model="m", kind=RunKind.COMPLETION
    )
    recent = await sync_to_async(run_create)(
        org=cast.org_a, actor=cast.dev_a.user, provider_key_id=key.id, model="m", kind=RunKind.COMPLETION
    )
    await Run.objects.filter(id=old.id).aupdate(started_at=timezone.now() - timedelta(minutes=20))
    reaped = await sync_to_async(runs_reap_lost)(stale_after=timedelta(seconds=30))
    assert [run.id for run in reaped] == [old.id]
    assert (await Run.objects.aget(id=old.id)).error_kind == "worker_lost"
    assert (await Run.objects.aget(id=recent.id)).status == RunStatus.RUNNING
