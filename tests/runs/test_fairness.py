"""Per-organization caps and fair claiming, at the services (``runs.services.claiming``): the queued cap refuses with
``org_run_queue_full`` (API 429, a form message on the dashboard), the running cap holds queued runs back, agent
runs take more slots, and claims go round-robin across orgs, least loaded first. The executors, end to end:
``test_fairness_executors``."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from keys.models import Provider, ProviderKey
from keys.services import provider_key_create
from orgs.models import Organization
from runs.models import Run, RunKind, RunStatus
from runs.services import run_claim, run_create, run_request_cancel, runs_claim_queued
from tests.runs.parallel_support import fresh_pool, in_parallel  # noqa: F401 - fresh_pool: a fixture, used below

pytestmark = pytest.mark.django_db(transaction=True)  # threads need committed rows


@pytest.fixture(autouse=True)
def _nothing_executes(settings):
    # submit() only nudges workers (none listen): runs stay queued, claims are made by the tests.
    settings.RUN_EXECUTOR = "worker"
    settings.RUN_AGENT_WEIGHT = 4


def _key(org: Organization, actor: Any) -> ProviderKey:
    return provider_key_create(
        org=org, actor=actor, provider=Provider.OPENAI, label="fair", secret="sk-test-fairness-0123456789"
    )


def _run(key: ProviderKey, actor: Any, *, kind: str = RunKind.CHAT, objective: str = "Go.") -> Run:
    return run_create(
        org=key.org, actor=actor, provider_key_id=key.id, model="gpt-4o", objective=objective, kind=kind, watch=False
    )


def _running(org: Organization) -> int:
    return Run.objects.filter(org=org, status=RunStatus.RUNNING).count()


# --- The queued cap ---------------------------------------------------------------------------------------------


def test_a_run_beyond_the_queued_cap_is_refused_with_org_run_queue_full(cast, settings):
    settings.RUN_ORG_MAX_QUEUED = 3
    key_a, key_b = _key(cast.org_a, cast.admin_a.user), _key(cast.org_b, cast.admin_b.user)
    queued = [_run(key_a, cast.admin_a.user) for _ in range(3)]
    with pytest.raises(ValidationError) as refused:
        _run(key_a, cast.admin_a.user)
    assert refused.value.code == "org_run_queue_full"
    assert "3 slots" in refused.value.messages[0]
    assert Run.objects.filter(org=cast.org_a).count() == 3
    _run(key_b, cast.admin_b.user)  # another org's queue is its own
    # The gateway's calls execute in their client's request: the executors' queue is not theirs to fill.
    run_create(
        org=cast.org_a, actor=cast.admin_a.user, provider_key_id=key_a.id, model="gpt-4o", kind=RunKind.COMPLETION
    )
    # A run that started, or was cancelled, frees its queue slot.
    run_request_cancel(run=queued[0], actor=cast.admin_a.user)
    assert run_claim(run_id=queued[1].id, worker_id="w") is not None
    _run(key_a, cast.admin_a.user)
    _run(key_a, cast.admin_a.user)
    with pytest.raises(ValidationError):
        _run(key_a, cast.admin_a.user)


def test_an_agent_run_takes_more_queue_slots_than_a_chat_run(cast, settings):
    settings.RUN_ORG_MAX_QUEUED = 8
    key = _key(cast.org_a, cast.admin_a.user)
    _run(key, cast.admin_a.user, kind=RunKind.AGENT)  # 4 slots
    for _ in range(3):
        _run(key, cast.admin_a.user)  # 7
    with pytest.raises(ValidationError) as refused:
        _run(key, cast.admin_a.user, kind=RunKind.AGENT)  # 11 > 8
    assert refused.value.code == "org_run_queue_full"
    _run(key, cast.admin_a.user)  # 8: a chat run still fits
    with pytest.raises(ValidationError):
        _run(key, cast.admin_a.user)


@pytest.mark.usefixtures("fresh_pool")
def test_concurrent_creations_never_fill_the_queue_past_its_cap(cast, settings):
    settings.RUN_ORG_MAX_QUEUED = 4
    key = _key(cast.org_a, cast.admin_a.user)
    outcomes = in_parallel(*[lambda: _run(key, cast.admin_a.user)] * 10)
    assert sorted(outcomes) == ["ok"] * 4 + ["org_run_queue_full"] * 6
    assert Run.objects.filter(org=cast.org_a, status=RunStatus.QUEUED).count() == 4


def test_the_api_answers_a_full_queue_with_429_in_the_one_error_shape(cast, settings):
    settings.RUN_ORG_MAX_QUEUED = 1
    key = _key(cast.org_a, cast.admin_a.user)
    body = {"objective": "Go.", "provider_key": str(key.id), "model": "gpt-4o", "watch": False}
    assert cast.dev_a.api().post("/api/v1/runs", body, format="json").status_code == 201
    response = cast.dev_a.api().post("/api/v1/runs", body, format="json")
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "org_run_queue_full"
    assert "waiting to start" in error["message"]
    assert Run.objects.count() == 1


def test_the_new_run_form_shows_a_full_queue_as_a_form_message(cast, settings):
    settings.RUN_ORG_MAX_QUEUED = 1
    key = _key(cast.org_a, cast.admin_a.user)
    _run(key, cast.admin_a.user)
    response = cast.dev_a.client().post(
        reverse("runs:run_new"), {"objective": "Go", "provider_key": str(key.id), "custom_model": "gpt-4o"}
    )
    assert response.status_code == 400
    assert "as many runs waiting to start as it may" in response.content.decode()
    assert Run.objects.count() == 1


# --- The running cap --------------------------------------------------------------------------------------------


def test_claims_stop_at_the_orgs_running_cap_and_resume_as_runs_end(cast, settings):
    settings.RUN_ORG_MAX_RUNNING = 2
    key = _key(cast.org_a, cast.admin_a.user)
    runs = [_run(key, cast.admin_a.user) for _ in range(5)]
    assert [r.id for r in runs_claim_queued(worker_id="w1", limit=10)] == [runs[0].id, runs[1].id]
    assert runs_claim_queued(worker_id="w2", limit=10) == []
    assert run_claim(run_id=runs[2].id, worker_id="w2") is None  # a direct claim waits its turn too
    assert Run.objects.get(id=runs[2].id).status == RunStatus.QUEUED
    Run.objects.filter(id=runs[0].id).update(status=RunStatus.SUCCEEDED, finished_at=timezone.now())
    assert run_claim(run_id=runs[2].id, worker_id="w2") is not None
    assert _running(cast.org_a) == 2


def test_an_agent_run_takes_more_running_slots_and_is_not_overtaken(cast, settings):
    settings.RUN_ORG_MAX_RUNNING = 5
    key = _key(cast.org_a, cast.admin_a.user)
    agent = _run(key, cast.admin_a.user, kind=RunKind.AGENT)
    chats = [_run(key, cast.admin_a.user) for _ in range(3)]
    # 4 + 1 slots: the second chat run waits.
    assert [r.id for r in runs_claim_queued(worker_id="w", limit=10)] == [agent.id, chats[0].id]
    Run.objects.filter(id=agent.id).update(status=RunStatus.SUCCEEDED, finished_at=timezone.now())
    later_agent = _run(key, cast.admin_a.user, kind=RunKind.AGENT)
    tail = _run(key, cast.admin_a.user)
    # 1 running + chats 1 and 2 = 3 slots; the next agent run needs 4 of the 2 left, and the chat run behind it
    # does not overtake it (or agent runs would starve behind a stream of chat runs).
    assert [r.id for r in runs_claim_queued(worker_id="w", limit=10)] == [chats[1].id, chats[2].id]
    Run.objects.filter(id__in=[chats[0].id, chats[1].id]).update(status=RunStatus.SUCCEEDED)
    assert [r.id for r in runs_claim_queued(worker_id="w", limit=10)] == [later_agent.id]
    assert Run.objects.get(id=tail.id).status == RunStatus.QUEUED


@pytest.mark.usefixtures("fresh_pool")
def test_parallel_claimers_never_take_an_org_past_its_running_cap(cast, settings):
    settings.RUN_ORG_MAX_RUNNING = 3
    key = _key(cast.org_a, cast.admin_a.user)
    runs = [_run(key, cast.admin_a.user) for _ in range(12)]
    claimed: list[Run] = []

    def claim_queued(n: int) -> None:
        claimed.extend(runs_claim_queued(worker_id=f"w{n}", limit=5))

    def claim_one(n: int) -> None:
        found = run_claim(run_id=runs[n].id, worker_id=f"w{n}")
        claimed.extend([found] if found else [])

    in_parallel(*[(lambda n=n: claim_queued(n)) if n % 2 else (lambda n=n: claim_one(n)) for n in range(8)])
    assert 1 <= len(claimed) <= 3
    assert len({run.id for run in claimed}) == len(claimed)  # exactly once each
    assert _running(cast.org_a) == len(claimed)


# --- Fair claiming ----------------------------------------------------------------------------------------------


def test_claims_go_round_robin_across_orgs_not_oldest_first(cast, settings):
    settings.RUN_ORG_MAX_RUNNING = 8
    key_a, key_b = _key(cast.org_a, cast.admin_a.user), _key(cast.org_b, cast.admin_b.user)
    flood = [_run(key_a, cast.admin_a.user) for _ in range(10)]
    later = [_run(key_b, cast.admin_b.user) for _ in range(2)]
    claimed = [r.id for r in runs_claim_queued(worker_id="w", limit=4)]
    # The oldest waiting run first, then alternating: each claim goes to the least loaded org.
    assert claimed == [flood[0].id, later[0].id, flood[1].id, later[1].id]


def test_the_org_with_fewest_runs_executing_is_served_first_however_young_its_run(cast, settings):
    settings.RUN_ORG_MAX_RUNNING = 8
    key_a, key_b = _key(cast.org_a, cast.admin_a.user), _key(cast.org_b, cast.admin_b.user)
    flood = [_run(key_a, cast.admin_a.user) for _ in range(8)]
    assert len(runs_claim_queued(worker_id="w", limit=3)) == 3  # org A: 3 executing, 5 waiting
    newcomer = _run(key_b, cast.admin_b.user)
    assert [r.id for r in runs_claim_queued(worker_id="w", limit=1)] == [newcomer.id]
    assert [r.id for r in runs_claim_queued(worker_id="w", limit=1)] == [flood[3].id]


def test_a_claim_among_given_runs_takes_only_those(cast, settings):
    key_a, key_b = _key(cast.org_a, cast.admin_a.user), _key(cast.org_b, cast.admin_b.user)
    older = _run(key_a, cast.admin_a.user)
    mine = _run(key_b, cast.admin_b.user)
    assert [r.id for r in runs_claim_queued(worker_id="w", limit=5, among=[mine.id])] == [mine.id]
    assert Run.objects.get(id=older.id).status == RunStatus.QUEUED


def test_a_look_at_a_queue_with_nothing_ready_is_one_query_and_claims_nothing(cast):
    """Every executor looks at the queue whenever one of its runs ends: with nothing ready to start (here a watched
    run nobody attached to yet), one existence check, not the fair claim's grouped read in a transaction (about
    five times its cost)."""
    key = _key(cast.org_a, cast.admin_a.user)
    waiting = run_create(
        org=cast.org_a, actor=cast.admin_a.user, provider_key_id=key.id, model="gpt-4o", objective="Go.", watch=True
    )
    with CaptureQueriesContext(connection) as queries:
        assert runs_claim_queued(worker_id="w", limit=5) == []
    assert len(queries.captured_queries) == 1, [q["sql"] for q in queries.captured_queries]
    [look] = [q["sql"] for q in queries.captured_queries]
    assert "GROUP BY" not in look
    assert "LIMIT 1" in look
    ready = _run(key, cast.admin_a.user)
    assert [run.id for run in runs_claim_queued(worker_id="w", limit=5)] == [ready.id]
    assert Run.objects.get(id=waiting.id).status == RunStatus.QUEUED
