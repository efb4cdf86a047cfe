"""Claiming a watched run as its stream attaches (``run_attach(claim_for=…)``, issue #13): where the process that
serves the stream executes runs, the run is claimed for its executor in the attach's transaction, by the rules of
every claim (``runs.services.claiming``); where it executes nothing (worker mode), for the workers, under a token
the first worker to receive it takes it by (``run_take``); otherwise it is handed over as before. End to end through
the ASGI application: ``test_start_on_attach`` (its inline executor), ``test_awatch_start_hands_a_claimed_run_over``;
with real ``run_worker`` processes: ``test_worker``."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from cesaflow.lib import row_cache
from keys.models import KeyStatus, Provider, ProviderKey
from keys.services import provider_key_create, provider_key_revoke
from orgs.authentication import KeyPrincipal, SessionPrincipal, org_context_for
from orgs.models import Organization
from runs import events, watching
from runs import executor as executor_module
from runs.models import AuditEvent, Run, RunKind, RunStatus
from runs.projects.services import project_create, project_run_create
from runs.services import (
    Attached,
    hand_over_token,
    run_attach,
    run_claim,
    run_create,
    run_hand_back,
    run_request_cancel,
    run_take,
    runs_put_back_untaken,
    runs_reap_lost,
)
from runs.services.claiming import HANDED_PREFIX
from runs.watching import awatch_start, watch_start
from tests.runs.test_execution_support import (
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
    wait_for_status,
)
from tests.signin import record_for, session_cookies_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _nothing_executes(settings):
    settings.RUN_EXECUTOR = "worker"  # a submitted run only nudges workers (none listen): it stays queued
    settings.RUN_AGENT_WEIGHT = 4


def _key(org: Organization, actor: Any) -> ProviderKey:
    return provider_key_create(
        org=org, actor=actor, provider=Provider.OPENAI, label="attach", secret="sk-test-attach-0123456789abcdef"
    )


def _watched(key: ProviderKey, actor: Any, *, kind: str = RunKind.CHAT) -> Run:
    return run_create(
        org=key.org, actor=actor, provider_key_id=key.id, model="gpt-4o", objective="Go.", kind=kind, watch=True
    )


def _fresh(run: Run) -> Run:
    return Run.objects.get(id=run.id)


def test_a_waiting_run_is_claimed_for_the_attaching_executor_with_its_org_loaded(cast):
    run = _watched(_key(cast.org_a, cast.admin_a.user), cast.admin_a.user)
    assert run_attach(run=run, claim_for="inline-here") is Attached.CLAIMED
    stored = _fresh(run)
    assert (stored.status, stored.worker_id) == (RunStatus.RUNNING, "inline-here")
    assert stored.attached_at is not None
    assert stored.started_at is not None
    assert stored.heartbeat_at is not None
    # The caller's object is the claimed run, as execution reads it.
    assert (run.status, run.worker_id, run.org.pk) == (RunStatus.RUNNING, "inline-here", cast.org_a.pk)
    # Claimed once: a second watcher attaches to a run that is already going.
    assert run_attach(run=_fresh(run), claim_for="inline-there") is Attached.NOTHING
    assert run_claim(run_id=run.id, worker_id="elsewhere") is None
    assert _fresh(run).worker_id == "inline-here"


def test_without_an_executor_here_the_run_is_handed_over_as_before(cast):
    run = _watched(_key(cast.org_a, cast.admin_a.user), cast.admin_a.user)
    assert run_claim(run_id=run.id, worker_id="w") is None  # nobody watches it yet: no executor may start it
    assert run_attach(run=run) is Attached.SUBMITTED
    stored = _fresh(run)
    assert (stored.status, stored.attached_at is not None) == (RunStatus.QUEUED, True)
    assert run_claim(run_id=run.id, worker_id="w") is not None  # any executor may now claim it


def test_the_orgs_running_cap_holds_for_a_claim_on_attach(cast, settings):
    settings.RUN_ORG_MAX_RUNNING = 2
    key = _key(cast.org_a, cast.admin_a.user)
    first, second, third = (_watched(key, cast.admin_a.user) for _ in range(3))
    assert run_attach(run=first, claim_for="x") is Attached.CLAIMED
    assert run_attach(run=second, claim_for="x") is Attached.CLAIMED
    assert run_attach(run=third, claim_for="x") is Attached.SUBMITTED  # attached, waits for a slot
    assert _fresh(third).status == RunStatus.QUEUED
    # An agent run takes RUN_AGENT_WEIGHT slots: with one chat run going and a cap of 4 it waits too.
    settings.RUN_ORG_MAX_RUNNING = 4
    agent = _watched(key, cast.admin_a.user, kind=RunKind.AGENT)
    assert run_attach(run=agent, claim_for="x") is Attached.SUBMITTED
    assert _fresh(agent).status == RunStatus.QUEUED


def test_project_runs_and_suspended_orgs_are_left_to_the_executors_claims(cast):
    key = _key(cast.org_a, cast.admin_a.user)
    project = project_create(org=cast.org_a, actor=cast.admin_a.user, name="p")
    on_project = project_run_create(
        project=project, actor=cast.admin_a.user, objective="Go.", provider_key_id=key.id, model="gpt-4o", watch=True
    )
    assert run_attach(run=on_project, claim_for="x") is Attached.SUBMITTED  # projects serialize their runs
    assert _fresh(on_project).status == RunStatus.QUEUED
    run = _watched(key, cast.admin_a.user)
    Organization.objects.filter(id=cast.org_a.id).update(suspended_at=timezone.now())
    assert run_attach(run=run, claim_for="x") is Attached.SUBMITTED
    assert _fresh(run).status == RunStatus.QUEUED


def test_a_handed_run_is_taken_once_by_one_worker_and_is_then_its(cast):
    key = _key(cast.org_a, cast.admin_a.user)
    run = _watched(key, cast.admin_a.user)
    token = hand_over_token()
    assert run_attach(run=run, claim_for=token) is Attached.CLAIMED
    assert run_take(run_id=run.id, handed_to=hand_over_token(), worker_id="w1") is None  # another hand-over's
    taken = run_take(run_id=run.id, handed_to=token, worker_id="w1")
    assert taken is not None
    # As execution reads it: the org, the key and the creator come with it.
    assert (taken.status, taken.worker_id, taken.org.pk, taken.provider_key_id) == (
        RunStatus.RUNNING,
        "w1",
        cast.org_a.pk,
        key.id,
    )
    assert taken.created_by_user == cast.admin_a.user
    assert run_take(run_id=run.id, handed_to=token, worker_id="w2") is None  # the same message, received twice
    assert run_hand_back(run_id=run.id, handed_to=token) is False
    assert run_take(run_id=run.id, handed_to="w1", worker_id="w2") is None  # a worker's id is not a token
    assert runs_put_back_untaken(older_than=timedelta(0)) == []
    assert _fresh(run).worker_id == "w1"


def test_a_handed_run_nobody_takes_goes_back_to_the_queue_never_failed(cast):
    """The hand-over's message is lost (Redis restarted, a worker died holding it): the reapers put the run back
    in the queue, attached, where any executor claims it; the lost-worker reaping leaves it alone meanwhile."""
    key = _key(cast.org_a, cast.admin_a.user)
    run = _watched(key, cast.admin_a.user)
    token = hand_over_token()
    assert run_attach(run=run, claim_for=token) is Attached.CLAIMED
    assert runs_reap_lost(stale_after=timedelta(0)) == []
    assert runs_put_back_untaken() == []  # not yet: a take comes within milliseconds
    [put_back] = runs_put_back_untaken(older_than=timedelta(0))
    assert put_back.id == run.id
    stored = _fresh(run)
    assert (stored.status, stored.worker_id, stored.started_at, stored.heartbeat_at) == (
        RunStatus.QUEUED,
        "",
        None,
        None,
    )
    assert stored.attached_at is not None
    assert run_take(run_id=run.id, handed_to=token, worker_id="late") is None  # its message, after all
    claimed = run_claim(run_id=run.id, worker_id="w")
    assert claimed is not None
    assert claimed.worker_id == "w"


def test_a_handed_run_goes_back_at_once_when_its_worker_has_no_slot_and_ends_if_cancelled_meanwhile(cast):
    key = _key(cast.org_a, cast.admin_a.user)
    run, cancelled = _watched(key, cast.admin_a.user), _watched(key, cast.admin_a.user)
    token, other = hand_over_token(), hand_over_token()
    assert run_attach(run=run, claim_for=token) is Attached.CLAIMED
    assert run_attach(run=cancelled, claim_for=other) is Attached.CLAIMED
    assert run_hand_back(run_id=run.id, handed_to=other) is False
    assert run_hand_back(run_id=run.id, handed_to=token) is True
    assert _fresh(run).status == RunStatus.QUEUED
    # A cancel while handed flags it, as for any running run; put back, it ends as a queued run does.
    run_request_cancel(run=_fresh(cancelled), actor=cast.admin_a.user)
    assert _fresh(cancelled).status == RunStatus.RUNNING
    assert run_hand_back(run_id=cancelled.id, handed_to=other) is True
    ended = _fresh(cancelled)
    assert (ended.status, ended.error_kind) == (RunStatus.CANCELLED, "cancelled")


def _run_reads(queries: list[dict[str, Any]]) -> list[str]:
    """The reads of a run's row (its columns first; the running-slot count reads other columns)."""
    return [q["sql"] for q in queries if q["sql"].startswith('SELECT "runs_run"."id"')]


def _key_principal(cast: Any) -> tuple[KeyPrincipal, Any]:
    principal = KeyPrincipal(cast.admin_a.api_key)
    context = org_context_for(principal)
    assert context is not None
    return principal, context


def test_a_created_run_still_waiting_attaches_from_its_creators_instance_without_reading_it_again(cast):
    """A streamed ``POST /runs`` hands its stream the run it just created: the run is not read again (a watcher who
    only has its id reads it), and the outcome is the same."""
    key = _key(cast.org_a, cast.admin_a.user)
    principal, context = _key_principal(cast)
    by_id, created = _watched(key, cast.admin_a.user), _watched(key, cast.admin_a.user)
    with CaptureQueriesContext(connection) as reading:
        from_id = watch_start(principal=principal, context=context, run_id=by_id.id, claim_for="here", revalidated=True)
    with CaptureQueriesContext(connection) as holding:
        held = watch_start(
            principal=principal, context=context, run_id=created.id, claim_for="here", revalidated=True, created=created
        )
    assert len(_run_reads(reading.captured_queries)) == 1
    assert _run_reads(holding.captured_queries) == []
    assert (from_id.claimed, held.claimed) == (True, True)
    assert held.run is created
    assert created.status == RunStatus.RUNNING
    assert (_fresh(created).status, _fresh(created).worker_id) == (RunStatus.RUNNING, "here")


def test_a_created_run_cancelled_before_its_stream_attaches_is_read_again(cast):
    key = _key(cast.org_a, cast.admin_a.user)
    principal, context = _key_principal(cast)
    created = _watched(key, cast.admin_a.user)
    run_request_cancel(run=Run.objects.get(id=created.id), actor=cast.admin_a.user)  # the instance held is stale now
    start = watch_start(
        principal=principal, context=context, run_id=created.id, claim_for="here", revalidated=True, created=created
    )
    assert start.run is not None
    assert start.run is not created
    assert (start.run.status, start.claimed) == (RunStatus.CANCELLED, False)
    assert _fresh(created).status == RunStatus.CANCELLED


async def _watched_then_left(cast: Any, run: Run) -> None:
    """A signed-in member starts watching ``run`` (``awatch_start``) and leaves at once: the watcher's task is
    cancelled while the hop is in flight (a session's credentials are checked in the hop itself, which therefore
    starts before the watcher's first pause)."""
    record = await sync_to_async(lambda: record_for(session_cookies_for(cast.dev_a.user)))()
    assert record is not None
    principal = SessionPrincipal(user=cast.dev_a.user, session=record)
    context = await sync_to_async(org_context_for)(principal)
    assert context is not None
    watcher = asyncio.create_task(awatch_start(principal=principal, context=context, run_id=run.id))
    await asyncio.sleep(0)  # the hop has started
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher


@pytest.mark.usefixtures("async_isolation")
async def test_awatch_start_hands_a_claimed_run_over_even_when_its_caller_is_gone(cast, simulator, settings):
    """The watcher's task is cancelled (its client left) while the hop that claims the run is in flight: the run,
    claimed for this process's executor, still executes there, and nobody else may claim it."""
    settings.RUN_EXECUTOR = "inline"
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await sync_to_async(_watched)(key, cast.admin_a.user)
    local = executor_module.bind_server_loop()
    assert local is not None
    try:
        await _watched_then_left(cast, run)
        finished = await wait_for_status(run.id, {RunStatus.SUCCEEDED}, timeout=10)
        assert finished.worker_id == local.worker_id
    finally:
        await executor_module.unbind_server_loop()


@pytest.mark.usefixtures("async_isolation")
async def test_a_run_attached_in_worker_mode_is_handed_to_the_workers_even_when_its_caller_is_gone(cast):
    """Worker mode: the stream's hop claims the run for the workers under a token, in the attach's transaction,
    and the event loop sends it on the workers' channel once committed, also when the watcher left meanwhile."""
    layer = get_channel_layer()
    key = await sync_to_async(_key)(cast.org_a, cast.admin_a.user)
    run = await sync_to_async(_watched)(key, cast.admin_a.user)
    await _watched_then_left(cast, run)
    try:
        async with asyncio.timeout(10):
            handed = await layer.receive(events.HANDED_CHANNEL)
            while handed.get("run_id") != str(run.id):  # one left by an earlier test: nobody takes them there
                handed = await layer.receive(events.HANDED_CHANNEL)
    finally:
        await layer.close_pools()
    assert handed["type"] == "run.handed"
    assert handed["handed_to"].startswith(HANDED_PREFIX)
    fresh = await Run.objects.aget(id=run.id)
    assert (fresh.status, fresh.worker_id, fresh.attached_at is not None) == (
        RunStatus.RUNNING,
        handed["handed_to"],
        True,
    )
    # The claim recorded its key's opening, as every claim does; the worker that takes it records none.
    assert await AuditEvent.objects.filter(event=AuditEvent.KEY_USED, metadata__reference=str(run.id)).acount() == 1


@pytest.mark.usefixtures("async_isolation")
async def test_a_run_waiting_for_a_slot_nudges_the_workers_even_when_its_caller_is_gone(cast, settings):
    """Worker mode, the org at its cap: the stream's hop attaches the run and returns; the workers are nudged from
    the event loop once it has committed (the stream's snapshot does not wait for Redis), also when the watcher
    left meanwhile."""
    settings.RUN_ORG_MAX_RUNNING = 1
    layer = get_channel_layer()
    worker = await layer.new_channel()
    await layer.group_add(events.WORKERS_GROUP, worker)
    key = await sync_to_async(_key)(cast.org_a, cast.admin_a.user)
    going = await sync_to_async(_watched)(key, cast.admin_a.user)
    assert await sync_to_async(run_attach)(run=going, claim_for="elsewhere") is Attached.CLAIMED
    run = await sync_to_async(_watched)(key, cast.admin_a.user)
    await _watched_then_left(cast, run)
    try:
        async with asyncio.timeout(10):
            nudge = await layer.receive(worker)
    finally:
        await layer.close_pools()  # a receive given up on leaves its pop to end with the pools
    assert nudge == {"type": "run.nudge", "run_id": str(run.id)}
    fresh = await Run.objects.aget(id=run.id)
    assert (fresh.status, fresh.attached_at is not None) == (RunStatus.QUEUED, True)


def _created_through_the_api(cast: Any, key: ProviderKey) -> uuid.UUID:
    response = cast.admin_a.api().post(
        "/api/v1/runs", {"provider_key": str(key.id), "model": "gpt-4o", "objective": "Go."}, format="json"
    )
    assert response.status_code == 201, response.content
    return uuid.UUID(response.json()["id"])


def _attached_by_its_creator(cast: Any, run_id: uuid.UUID) -> tuple[Any, list[dict[str, Any]]]:
    """The creator's key watches the run (as ``awatch_start`` would, claiming it here), and the queries made."""
    principal, context = _key_principal(cast)
    with CaptureQueriesContext(connection) as queries:
        start = watch_start(
            principal=principal,
            context=context,
            run_id=run_id,
            claim_for="here",
            revalidated=True,
            token=row_cache.generation(),
        )
    return start, queries.captured_queries


def test_a_run_created_here_through_the_api_attaches_without_being_read_again(cast):
    """``POST /runs`` remembers the run it created (its key and creator beside it, under the authorization
    generation): the stream that follows attaches from those rows, and the outcome is the one a read would give."""
    key = _key(cast.org_a, cast.admin_a.user)
    run_id = _created_through_the_api(cast, key)
    start, queries = _attached_by_its_creator(cast, run_id)
    assert _run_reads(queries) == []
    assert start.claimed
    assert start.run is not None
    assert start.run.provider_key is not None
    assert start.run.provider_key.id == key.id
    assert start.run.created_by_api_key == cast.admin_a.api_key
    assert (_fresh(start.run).status, _fresh(start.run).worker_id) == (RunStatus.RUNNING, "here")
    # The key's opening is recorded against the run's creator, as a claim after a read records it.
    [used] = AuditEvent.objects.filter(event=AuditEvent.KEY_USED)
    assert (used.metadata["reference"], used.actor_api_key_id) == (str(run_id), cast.admin_a.api_key.id)


def test_a_remembered_run_is_read_again_once_keys_change_and_never_serves_another_org(cast):
    key = _key(cast.org_a, cast.admin_a.user)
    run_id = _created_through_the_api(cast, key)
    # Another org's watcher with the run's id: the remembered rows are the run's org's only.
    outsider = KeyPrincipal(cast.admin_b.api_key)
    outsider_context = org_context_for(outsider)
    assert outsider_context is not None
    stranger = watch_start(
        principal=outsider, context=outsider_context, run_id=run_id, revalidated=True, token=row_cache.generation()
    )
    assert stranger.run is None
    # The provider key is revoked by another process after the run was created: that replaces the generation but
    # leaves this process's caches as they are (a change made here also clears them: kept as they were). The
    # attach reads the run and its key, now revoked, from the database, so no opening of that key is recorded.
    held = dict(watching._created.entries)
    provider_key_revoke(key=key, actor=cast.admin_a.user)
    watching._created.entries.update(held)
    start, queries = _attached_by_its_creator(cast, run_id)
    assert len(_run_reads(queries)) == 1
    assert start.run is not None
    assert start.run.provider_key is not None
    assert start.run.provider_key.status == KeyStatus.REVOKED
    assert not AuditEvent.objects.filter(event=AuditEvent.KEY_USED).exists()


def test_a_run_a_signed_in_member_creates_is_not_remembered(cast):
    """Only an org API key's stream attaches from the remembered rows: a session's create keeps nothing (and reads
    no generation for it)."""
    key = _key(cast.org_a, cast.admin_a.user)
    response = cast.admin_a.session_api().post(
        "/api/v1/runs", {"provider_key": str(key.id), "model": "gpt-4o", "objective": "Go."}, format="json"
    )
    assert response.status_code == 201, response.content
    assert (cast.org_a.id, uuid.UUID(response.json()["id"])) not in watching._created.entries
    assert (cast.org_a.id, _created_through_the_api(cast, key)) in watching._created.entries


def test_the_stream_of_a_run_created_here_opens_without_a_read_and_stays_the_orgs(cast):
    """``GET /runs/<id>/events`` for a run this process just created for the caller's org: no read to tell a 404
    (the stream's own hop reads what it needs). Another org asking with that id still gets the 404."""
    key = _key(cast.org_a, cast.admin_a.user)
    run_id = _created_through_the_api(cast, key)
    with CaptureQueriesContext(connection) as queries:
        response = cast.admin_a.api().get(f"/api/v1/runs/{run_id}/events")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    assert _run_reads(queries.captured_queries) == []
    stranger = cast.admin_b.api().get(f"/api/v1/runs/{run_id}/events")
    assert stranger.status_code == 404
    assert stranger.json()["error"]["code"] == "not_found"
    # A run it did not create here (a session's create is not remembered) is read as before.
    other = cast.admin_a.session_api().post(
        "/api/v1/runs", {"provider_key": str(key.id), "model": "gpt-4o", "objective": "Go."}, format="json"
    )
    with CaptureQueriesContext(connection) as queries:
        assert cast.admin_a.api().get(f"/api/v1/runs/{other.json()['id']}/events").status_code == 200
    assert len(_run_reads(queries.captured_queries)) == 1
