"""How runs reach an executor: ``submit`` in inline mode (the ASGI server's loop, or a background thread where there
is none), ASGI lifespan startup and shutdown, and the channel-layer nudge of worker mode."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from channels.layers import get_channel_layer
from channels.testing import ApplicationCommunicator, HttpCommunicator

from cesaflow.asgi import application
from runs import events
from runs import executor as executor_module
from runs.api import proxy_call
from runs.models import Run, RunStatus
from tests.runs.test_execution_support import (
    amake_run,
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
    running_executor,
    simulator_saw,
    wait_for_status,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]


@pytest.fixture(autouse=True)
def _inline(settings):
    settings.RUN_EXECUTOR = "inline"
    yield
    # Whatever runs in the background thread must be done before the test's rows go away.
    assert executor_module.wait_for_background_runs(10)


async def _post_run(secret: str, key_id) -> dict[str, Any]:
    body = json.dumps(
        {"objective": "Inline, please.", "provider_key": str(key_id), "model": "fake/echo", "watch": False}
    ).encode()
    communicator = HttpCommunicator(
        application,
        "POST",
        "/api/v1/runs",
        body=body,
        headers=[
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-api-key", secret.encode()),
        ],
    )
    response = await communicator.get_response(timeout=10)
    assert response["status"] == 201, response["body"][:500]
    created: dict[str, Any] = json.loads(response["body"])
    return created


async def test_without_a_server_loop_runs_execute_in_a_background_thread_and_events_cross_loops(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(events.org_runs_group(cast.org_a.id), channel)

    run = await amake_run(cast.dev_a, key)  # no ASGI server here: submit() falls back to the background thread
    statuses: list[str] = []
    while not statuses or statuses[-1] not in ("succeeded", "failed", "cancelled"):
        message = await asyncio.wait_for(layer.receive(channel), 5)
        if message["event"]["run_id"] == str(run.id):
            statuses.append(message["event"]["status"])
    await layer.group_discard(events.org_runs_group(cast.org_a.id), channel)

    # Published from the background thread's own loop, received here through Redis.
    assert statuses == ["queued", "running", "succeeded"]
    finished = await Run.objects.aget(id=run.id)
    assert finished.status == RunStatus.SUCCEEDED
    assert finished.worker_id.startswith("inline:")


async def test_the_asgi_application_binds_the_inline_executor_to_the_servers_loop(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    try:
        created = await _post_run(cast.dev_a.api_secret, key.id)
        bound = executor_module._server
        assert bound is not None
        assert bound[0] is asyncio.get_running_loop()
        finished = await wait_for_status(created["id"], {RunStatus.SUCCEEDED})
        # Executed by the executor in this (the "server's") loop, not by the background thread.
        assert finished.worker_id == bound[1].worker_id
    finally:
        await executor_module.unbind_server_loop()


async def test_lifespan_shutdown_records_running_runs_instead_of_leaving_them_running(cast, simulator, settings):
    settings.RUN_SHUTDOWN_GRACE_SECONDS = 0
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    lifespan = ApplicationCommunicator(application, {"type": "lifespan"})
    await lifespan.send_input({"type": "lifespan.startup"})
    assert await lifespan.receive_output(timeout=5) == {"type": "lifespan.startup.complete"}
    try:
        run = await amake_run(cast.dev_a, key, model="fake/slow")
        await wait_for_status(run.id, {RunStatus.RUNNING})
        await simulator_saw(simulator, lambda entry: entry["events_sent"] > 0)
    finally:
        await lifespan.send_input({"type": "lifespan.shutdown"})
        assert await lifespan.receive_output(timeout=15) == {"type": "lifespan.shutdown.complete"}
    stopped = await Run.objects.aget(id=run.id)
    assert (stopped.status, stopped.error_kind) == (RunStatus.FAILED, "worker_lost")
    assert executor_module._server is None


async def test_lifespan_shutdown_waits_for_the_gateways_run_endings_still_being_written():
    written = asyncio.Event()

    async def a_run_ending() -> None:
        await asyncio.sleep(0.2)  # a run_finish in flight when the server is asked to stop
        written.set()

    lifespan = ApplicationCommunicator(application, {"type": "lifespan"})
    await lifespan.send_input({"type": "lifespan.startup"})
    assert await lifespan.receive_output(timeout=5) == {"type": "lifespan.startup.complete"}
    proxy_call.in_background(a_run_ending())
    await lifespan.send_input({"type": "lifespan.shutdown"})
    assert await lifespan.receive_output(timeout=15) == {"type": "lifespan.shutdown.complete"}
    assert written.is_set()  # shutdown completed only after the ending was written
    assert not proxy_call._background


async def test_worker_mode_submit_nudges_workers_so_they_claim_at_once(cast, simulator, settings):
    settings.RUN_EXECUTOR = "worker"
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    # A poll interval far longer than the test: only the nudge can explain a prompt claim.
    async with running_executor(claim_queued=True, poll_s=60.0) as executor:
        await asyncio.sleep(0.3)  # let its first (empty) look at the queue pass
        started = time.monotonic()
        run = await amake_run(cast.dev_a, key)
        finished = await wait_for_status(run.id, {RunStatus.SUCCEEDED}, timeout=5)
        assert time.monotonic() - started < 2
    assert finished.worker_id == executor.worker_id
