"""The monthly token cap reserves before a call (``runs.services.tokens``): parallel calls hitting the reservation at
once against real PostgreSQL can never together pass the cap, and a reservation is settled to the real usage or
released in every ending — succeeded, failed, cancelled (queued or running), not watched, worker lost."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ValidationError
from django.utils import timezone

from keys.models import Provider, ProviderKey
from keys.services import provider_key_create
from orgs.models import Organization
from runs.models import Run, RunKind, RunStatus, TokenBudget, UsageRecord
from runs.selectors import tokens_used_this_month
from runs.services import (
    UsageEntry,
    run_claim,
    run_create,
    run_finish,
    run_request_cancel,
    runs_expire_unwatched,
    runs_reap_lost,
)
from runs.services.tokens import run_first_call_estimate
from tests.runs.parallel_support import fresh_pool, in_parallel  # noqa: F401 - fresh_pool: a fixture, used below
from tests.runs.test_execution_support import (
    FAST_LIMITS,
    amake_run,
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
    execute,
    running_executor,
    simulator_saw,
    wait_for_status,
)

pytestmark = pytest.mark.django_db(transaction=True)  # threads and executors need committed rows

OBJECTIVE = "Count to three."


@pytest.fixture(autouse=True)
def _runs_wait_for_the_test(settings):
    settings.RUN_EXECUTOR = "worker"  # submit() only nudges: tests claim and execute runs themselves


def _key(org: Organization, actor: Any) -> ProviderKey:
    return provider_key_create(
        org=org, actor=actor, provider=Provider.OPENAI, label="cap", secret="sk-test-cap-012345678"
    )


def _cap(org: Organization, cap: int | None) -> None:
    org.monthly_token_cap = cap
    org.save(update_fields=["monthly_token_cap"])


def _budget(org: Organization) -> tuple[int, int]:
    row = TokenBudget.objects.get(org=org)
    return row.used, row.reserved


def _create(key: ProviderKey, actor: Any, *, kind: str) -> Run:
    if kind == RunKind.COMPLETION:
        return run_create(
            org=key.org, actor=actor, provider_key_id=key.id, model="gpt-4o", kind=kind, token_estimate=1000
        )
    return run_create(
        org=key.org, actor=actor, provider_key_id=key.id, model="gpt-4o", objective=OBJECTIVE, kind=kind, watch=False
    )


@pytest.mark.usefixtures("fresh_pool")
@pytest.mark.parametrize("kind", [RunKind.COMPLETION, RunKind.CHAT])
def test_parallel_calls_cannot_together_pass_the_cap(cast, settings, kind):
    settings.RUN_ORG_MAX_QUEUED = 50
    estimate = 1000 if kind == RunKind.COMPLETION else run_first_call_estimate(kind=kind, objective=OBJECTIVE)
    key = _key(cast.org_a, cast.admin_a.user)
    _cap(cast.org_a, 5 * estimate + estimate // 2)  # room for five calls' estimates, not six

    outcomes = in_parallel(*[lambda: _create(key, cast.admin_a.user, kind=kind)] * 20)

    assert sorted(outcomes) == ["ok"] * 5 + ["token_cap_reached"] * 15
    assert _budget(cast.org_a) == (0, 5 * estimate)
    # Each call uses its whole estimate: the month ends at, not past, what the cap allowed.
    for run in Run.objects.filter(org=cast.org_a):
        run_finish(
            run_id=run.id,
            status=RunStatus.SUCCEEDED,
            usage=[
                UsageEntry(
                    "openai",
                    "gpt-4o",
                    input_tokens=estimate // 2,
                    output_tokens=estimate - estimate // 2,
                    complete=True,
                )
            ],
        )
    assert _budget(cast.org_a) == (5 * estimate, 0)
    assert tokens_used_this_month(org=cast.org_a) == 5 * estimate <= cast.org_a.monthly_token_cap
    with pytest.raises(ValidationError) as refused:
        _create(key, cast.admin_a.user, kind=kind)
    assert refused.value.code == "token_cap_reached"


def test_a_refusal_says_how_much_is_used_and_held_by_runs_in_progress(cast):
    key = _key(cast.org_a, cast.admin_a.user)
    estimate = run_first_call_estimate(kind=RunKind.CHAT, objective=OBJECTIVE)
    _cap(cast.org_a, estimate + 10)
    _create(key, cast.admin_a.user, kind=RunKind.CHAT)
    with pytest.raises(ValidationError) as refused:
        _create(key, cast.admin_a.user, kind=RunKind.CHAT)
    message = refused.value.messages[0]
    assert f"has used 0 of its {estimate + 10:,} monthly tokens" in message
    assert f"Runs in progress may still use {estimate:,} more" in message


def test_the_counter_starts_from_the_months_ledger_and_other_orgs_do_not_count(cast):
    key_a, key_b = _key(cast.org_a, cast.admin_a.user), _key(cast.org_b, cast.admin_b.user)
    earlier = _create(key_a, cast.admin_a.user, kind=RunKind.CHAT)  # no cap yet: nothing reserved, no counter row
    assert not TokenBudget.objects.exists()
    UsageRecord.objects.create(org=cast.org_a, run=earlier, provider="openai", model="m", input_tokens=700)
    last_month = timezone.now() - timedelta(days=40)
    UsageRecord.objects.create(
        org=cast.org_a, run=earlier, provider="openai", model="m", input_tokens=10**6, created_at=last_month
    )
    other = _create(key_b, cast.admin_b.user, kind=RunKind.CHAT)
    UsageRecord.objects.create(org=cast.org_b, run=other, provider="openai", model="m", input_tokens=10**6)
    estimate = run_first_call_estimate(kind=RunKind.CHAT, objective=OBJECTIVE)
    _cap(cast.org_a, 700 + estimate)
    run = _create(key_a, cast.admin_a.user, kind=RunKind.CHAT)
    assert (run.tokens_reserved, _budget(cast.org_a)) == (estimate, (700, estimate))


# --- Every ending settles or releases the reservation -----------------------------------------------------------


def _reserved_run(cast: Any, *, cap: int = 1_000_000, **fields: Any) -> Run:
    key = _key(cast.org_a, cast.admin_a.user)
    _cap(cast.org_a, cap)
    run = run_create(
        org=cast.org_a, actor=cast.admin_a.user, provider_key_id=key.id, model="gpt-4o", objective=OBJECTIVE, **fields
    )
    assert run.tokens_reserved == run_first_call_estimate(kind=RunKind.CHAT, objective=OBJECTIVE)
    assert _budget(cast.org_a) == (0, run.tokens_reserved)
    return run


def _assert_settled(run: Run, used: int) -> None:
    run.refresh_from_db()
    assert (run.tokens_reserved, run.tokens_reserved_month) == (0, None)
    assert _budget(run.org) == (used, 0)
    assert used == tokens_used_this_month(org=run.org)


def test_a_run_cancelled_while_queued_releases_its_reservation(cast):
    run = _reserved_run(cast, watch=False)
    run_request_cancel(run=run, actor=cast.admin_a.user)
    _assert_settled(run, used=0)


def test_a_run_nobody_watched_releases_its_reservation(cast):
    run = _reserved_run(cast, watch=True)
    Run.objects.filter(id=run.id).update(created_at=timezone.now() - timedelta(minutes=5))
    assert [r.id for r in runs_expire_unwatched(window=timedelta(seconds=30))] == [run.id]
    _assert_settled(run, used=0)


def test_a_lost_run_releases_its_reservation_and_its_late_usage_still_counts(cast):
    run = _reserved_run(cast, watch=False)
    assert run_claim(run_id=run.id, worker_id="crashed") is not None
    Run.objects.filter(id=run.id).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    assert [r.id for r in runs_reap_lost(stale_after=timedelta(seconds=30))] == [run.id]
    _assert_settled(run, used=0)
    # The worker was only slow: what its call used is billed, and counted, though the run already ended lost.
    run_finish(run_id=run.id, status=RunStatus.SUCCEEDED, usage=[UsageEntry("openai", "gpt-4o", 30, 12, True)])
    _assert_settled(run, used=42)
    assert Run.objects.get(id=run.id).error_kind == "worker_lost"


def test_a_proxy_completion_is_settled_to_what_it_used(cast):
    key = _key(cast.org_a, cast.admin_a.user)
    _cap(cast.org_a, 100_000)
    run = run_create(
        org=cast.org_a,
        actor=cast.admin_a.user,
        provider_key_id=key.id,
        model="gpt-4o",
        kind=RunKind.COMPLETION,
        token_estimate=5000,
    )
    assert _budget(cast.org_a) == (0, 5000)
    run_finish(run_id=run.id, status=RunStatus.FAILED, usage=[UsageEntry("openai", "gpt-4o", 120, 0, False)])
    _assert_settled(run, used=120)


@pytest.mark.usefixtures("async_isolation")
async def test_an_executed_run_settles_to_its_real_usage_when_it_succeeds_fails_or_is_cancelled(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    await sync_to_async(_cap)(cast.org_a, 1_000_000)
    succeeded = await amake_run(cast.dev_a, key)
    failed = await amake_run(cast.dev_a, key, model="fake/midstream_error")  # fails after some text: billed
    cancelled = await amake_run(cast.dev_a, key, model="fake/slow")
    async with running_executor(limits=FAST_LIMITS) as executor:
        done, _ = await execute(executor, succeeded)
        assert (done.status, done.total_tokens > 0) == (RunStatus.SUCCEEDED, True)
        broken, _ = await execute(executor, failed)
        assert broken.status == RunStatus.FAILED
        assert await executor.submit_run(cancelled.id)
        await simulator_saw(simulator, lambda entry: entry["events_sent"] > 0)
        await sync_to_async(run_request_cancel)(run=cancelled, actor=cast.dev_a.user)
        stopped = await wait_for_status(cancelled.id, {RunStatus.CANCELLED})
    used = done.total_tokens + broken.total_tokens + stopped.total_tokens
    assert used > 0
    for run in (done, broken, stopped):
        await sync_to_async(_assert_settled)(run, used)
