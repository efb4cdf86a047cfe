"""A chat run's key opening is recorded with its claim (``runs.services.claiming.record_key_openings``, issue #13):
``key.used`` (or ``key.decrypt_failed``) is committed in the claim's transaction, whichever way the run is claimed,
and the executor then opens the key in memory with no database hop of its own. Exactly one record per call."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import sync_to_async

from cesaflow.lib import request_context
from keys.models import Provider, ProviderKey
from keys.services import provider_key_create, provider_key_revoke
from runs.models import AuditEvent, Run, RunKind, RunStatus
from runs.services import Attached, run_attach, run_claim, run_create, runs_claim_queued
from tests.runs.test_execution_support import (
    async_isolation,  # noqa: F401 - a fixture, used below
    execute,
    make_run,
    running_executor,
    sim_key,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _nothing_executes(settings):
    settings.RUN_EXECUTOR = "worker"  # a submitted run only nudges workers (none listen): it stays queued


def _key(org: Any, actor: Any) -> ProviderKey:
    return provider_key_create(
        org=org, actor=actor, provider=Provider.OPENAI, label="claims", secret="sk-test-claims-0123456789abcdef"
    )


def _run(key: ProviderKey, actor: Any, *, kind: str = RunKind.CHAT, watch: bool = False) -> Run:
    return run_create(
        org=key.org, actor=actor, provider_key_id=key.id, model="gpt-4o", objective="Go.", kind=kind, watch=watch
    )


def _records(event: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(event=event).order_by("created_at"))


def _unreadable(key: ProviderKey) -> None:
    """Alter the stored ciphertext (one character of its last part): the row is live, its value no longer opens."""
    sealed = key.sealed_secret
    last = "A" if sealed[-1] != "A" else "B"
    ProviderKey.objects.filter(pk=key.pk).update(sealed_secret=sealed[:-1] + last)


def test_every_claim_of_a_chat_run_records_its_keys_opening_once(cast):
    key = _key(cast.org_a, cast.admin_a.user)
    one, two = _run(key, cast.admin_a.user), _run(key, cast.dev_a.user)
    assert _records(AuditEvent.KEY_USED) == []  # creating a run opens nothing
    claimed_one = run_claim(run_id=one.id, worker_id="w1")
    assert claimed_one is not None
    [used] = _records(AuditEvent.KEY_USED)
    assert (used.metadata["purpose"], used.metadata["reference"], used.target_id) == ("run", str(one.id), str(key.id))
    assert (used.org_id, used.actor_user_id) == (cast.org_a.id, cast.admin_a.user.id)
    [claimed_two] = runs_claim_queued(worker_id="w2", limit=5)
    assert claimed_two.id == two.id
    assert [e.metadata["reference"] for e in _records(AuditEvent.KEY_USED)] == [str(one.id), str(two.id)]
    assert _records(AuditEvent.KEY_USED)[1].actor_user_id == cast.dev_a.user.id
    # Claimed once, recorded once: a claim that loses records nothing.
    assert run_claim(run_id=one.id, worker_id="w3") is None
    assert len(_records(AuditEvent.KEY_USED)) == 2


def test_an_agent_runs_claim_records_nothing_it_opens_its_key_per_turn(cast):
    key = _key(cast.org_a, cast.admin_a.user)
    agent = _run(key, cast.admin_a.user, kind=RunKind.AGENT)
    assert run_claim(run_id=agent.id, worker_id="w") is not None
    assert _records(AuditEvent.KEY_USED) == []


def test_a_claim_on_attach_records_the_opening_as_the_runs_not_the_watchers(cast):
    """The watcher's request claims the run, but the record is the run's: no address or agent of the watcher."""
    key = _key(cast.org_a, cast.admin_a.user)
    run = _run(key, cast.admin_a.user, watch=True)
    token = request_context.bind(
        request_context.RequestContext(ip="203.0.113.9", user_agent="watcher/1.0", request_id="req-watcher")
    )
    try:
        assert run_attach(run=run, claim_for="inline-here") is Attached.CLAIMED
    finally:
        request_context.unbind(token)
    [used] = _records(AuditEvent.KEY_USED)
    assert used.metadata["reference"] == str(run.id)
    assert (used.ip, used.user_agent) == (None, "")


def test_a_revoked_key_is_not_recorded_as_opened(cast):
    key = _key(cast.org_a, cast.admin_a.user)
    run = _run(key, cast.admin_a.user)
    provider_key_revoke(key=key, actor=cast.admin_a.user)
    assert run_claim(run_id=run.id, worker_id="w") is not None
    assert _records(AuditEvent.KEY_USED) == []


@pytest.mark.usefixtures("async_isolation")
async def test_a_key_that_no_longer_opens_is_recorded_once_and_fails_the_run(cast, simulator):
    key = await sync_to_async(sim_key)(cast.org_a, cast.admin_a.user, simulator)
    run = await sync_to_async(make_run)(cast.dev_a, key)
    await sync_to_async(_unreadable)(key)
    async with running_executor() as executor:
        finished, watcher = await execute(executor, run)
    assert (finished.status, finished.error_kind) == (RunStatus.FAILED, "key_unavailable")
    assert "could not be decrypted" in finished.error_message
    assert watcher.events[-1]["status"] == "failed"
    assert simulator.requests() == []  # the provider was never called
    failed = await sync_to_async(_records)(AuditEvent.KEY_DECRYPT_FAILED)
    assert [(e.metadata.get("purpose"), e.metadata.get("reference")) for e in failed] == [("run", str(run.id))]
    assert await sync_to_async(_records)(AuditEvent.KEY_USED) == []
