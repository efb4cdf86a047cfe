"""Claiming a watched run as its stream attaches (``run_attach(claim_for=…)``, issue #13): where the process that
serves the stream executes runs, the run is claimed for its executor in the attach's transaction, by the rules of
every claim (``runs.services.claiming``); otherwise it is handed over as before. End to end through the ASGI
application: ``test_start_on_attach`` (its inline executor) and ``test_awatch_start_hands_a_claimed_run_over``."""

from __future__ import annotations

import asyncio
import uuid
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
from runs.services import Attached, run_attach, run_claim, run_create, run_request_cancel
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
    watcher = asyncio.create_task(awatch_start(principal=principal, context=context, run_id=run.id, token=None))
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
async def test_a_run_attached_without_a_slot_here_nudges_the_workers_even_when_its_caller_is_gone(cast):
    """Worker mode: the stream's hop attaches the run and returns; the workers are nudged from the event loop once
    it has committed (the stream's snapshot does not wait for Redis), also when the watcher left meanwhile."""
    layer = get_channel_layer()
    worker = await layer.new_channel()
    await layer.group_add(events.WORKERS_GROUP, worker)
    key = await sync_to_async(_key)(cast.org_a, cast.admin_a.user)
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
