"""The run websockets (``/ws/runs/<id>/``, ``/ws/org/runs/``) through the real ASGI application: Origin check,
session and API-key authentication, org isolation with the fixed cast, live events, cancelling, and hostile input.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from cesaflow.asgi import application
from orgs.services import api_key_create
from runs import events
from runs.events import TextDeltaEvent
from runs.models import Run, RunStatus
from tests.runs.test_execution_support import (
    amake_run,
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
    running_executor,
    simulator_saw,
    wait_for_status,
)
from tests.signin import cookie_header, session_cookies_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]

ORIGIN = (b"origin", b"http://testserver")


@pytest.fixture(autouse=True)
def _runs_wait_for_the_test(settings):
    settings.RUN_EXECUTOR = "worker"  # runs stay queued unless a test executes them


async def session_headers(user) -> list[tuple[bytes, bytes]]:
    cookies = await sync_to_async(session_cookies_for)(user)
    return [ORIGIN, cookie_header(cookies)]


def key_headers(secret: str, *, bearer: bool = False) -> list[tuple[bytes, bytes]]:
    if bearer:
        return [ORIGIN, (b"authorization", f"Bearer {secret}".encode())]
    return [ORIGIN, (b"x-api-key", secret.encode())]


def socket(path: str, headers: list[tuple[bytes, bytes]]) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, path, headers=headers)


async def close_code(communicator: WebsocketCommunicator) -> int:
    """Refusals accept, then close with an application code (so browsers see the code, not a bare 1006)."""
    connected, _ = await communicator.connect(timeout=3)
    assert connected
    output = await communicator.receive_output(timeout=3)
    assert output["type"] == "websocket.close", output
    await communicator.disconnect()
    return int(output["code"])


async def open_run_socket(path: str, headers) -> tuple[WebsocketCommunicator, dict[str, Any]]:
    communicator = socket(path, headers)
    connected, _ = await communicator.connect(timeout=3)
    assert connected
    snapshot = await communicator.receive_json_from(timeout=3)
    return communicator, snapshot


@pytest.fixture
async def queued_run(cast, simulator) -> Run:
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    return await amake_run(cast.admin_a, key, objective="Watch me.")


# --- Authentication and isolation -----------------------------------------------------------------------------


async def test_no_credentials_closes_4401(queued_run):
    assert await close_code(socket(f"/ws/runs/{queued_run.id}/", [ORIGIN])) == 4401
    assert await close_code(socket("/ws/org/runs/", [ORIGIN])) == 4401


async def test_an_invalid_api_key_closes_4401_even_with_a_valid_session(cast, queued_run):
    headers = [*await session_headers(cast.dev_a.user), (b"x-api-key", b"cf_live_not-a-real-key")]
    assert await close_code(socket(f"/ws/runs/{queued_run.id}/", headers)) == 4401


async def test_other_orgs_run_closes_4404_like_a_missing_one(cast, queued_run):
    for headers in (await session_headers(cast.admin_b.user), key_headers(cast.dev_b.api_secret)):
        assert await close_code(socket(f"/ws/runs/{queued_run.id}/", headers)) == 4404
    missing = uuid.uuid4()
    assert await close_code(socket(f"/ws/runs/{missing}/", await session_headers(cast.dev_a.user))) == 4404


async def test_a_refused_run_socket_leaves_the_runs_group_and_never_attaches(cast, queued_run):
    """The run's group is joined before the run is looked up (one hop less to its first words): a socket refused
    for another org's run leaves it again, and the run still waits for its own org's watcher."""
    assert await close_code(socket(f"/ws/runs/{queued_run.id}/", key_headers(cast.dev_b.api_secret))) == 4404
    layer = get_channel_layer()
    group_key = layer._group_key(events.run_group(queued_run.id))
    assert await layer.connection(layer.consistent_hash(events.run_group(queued_run.id))).zcard(group_key) == 0
    run = await Run.objects.aget(id=queued_run.id)
    assert run.status == RunStatus.QUEUED
    assert run.attached_at is None


async def test_outsider_closes_4404(cast, queued_run):
    headers = await session_headers(cast.outsider.user)
    assert await close_code(socket(f"/ws/runs/{queued_run.id}/", headers)) == 4404
    assert await close_code(socket("/ws/org/runs/", headers)) == 4404


async def test_api_key_without_runs_read_closes_4403(cast, queued_run):
    _, secret = await sync_to_async(api_key_create)(
        org=cast.org_a, name="org only", actor=cast.admin_a.user, scopes=["org:read"]
    )
    assert await close_code(socket(f"/ws/runs/{queued_run.id}/", key_headers(secret))) == 4403
    assert await close_code(socket("/ws/org/runs/", key_headers(secret))) == 4403


async def test_foreign_origin_is_refused_before_anything_else(cast, queued_run):
    headers = [(b"origin", b"https://evil.example"), *(await session_headers(cast.dev_a.user))[1:]]
    communicator = socket(f"/ws/runs/{queued_run.id}/", headers)
    connected, _ = await communicator.connect(timeout=3)
    assert not connected
    await communicator.disconnect()


@pytest.mark.parametrize("bearer", [False, True])
async def test_org_api_key_in_a_handshake_header_authenticates(cast, queued_run, bearer):
    communicator, snapshot = await open_run_socket(
        f"/ws/runs/{queued_run.id}/", key_headers(cast.dev_a.api_secret, bearer=bearer)
    )
    assert snapshot["type"] == "run.status"
    assert snapshot["run_id"] == str(queued_run.id)
    await communicator.disconnect()


async def test_api_key_in_the_query_string_is_not_accepted(cast, queued_run):
    path = f"/ws/runs/{queued_run.id}/?api_key={cast.dev_a.api_secret}"
    assert await close_code(WebsocketCommunicator(application, path, headers=[ORIGIN])) == 4401


# --- Watching -------------------------------------------------------------------------------------------------


async def test_developer_gets_the_current_status_then_live_events(cast, queued_run):
    communicator, snapshot = await open_run_socket(f"/ws/runs/{queued_run.id}/", await session_headers(cast.dev_a.user))
    assert snapshot["status"] == "queued"
    assert snapshot["seq"] == 0
    assert snapshot["objective"] == "Watch me."
    assert {"input_tokens", "output_tokens", "usage_complete"} <= set(snapshot)
    assert "text" not in snapshot
    event: TextDeltaEvent = {"type": "text.delta", "run_id": str(queued_run.id), "seq": 7, "text": "live"}
    await events.apublish(queued_run, event)
    assert await communicator.receive_json_from(timeout=3) == event
    await communicator.disconnect()


async def test_run_events_reach_the_socket_while_the_shared_sync_thread_is_busy(cast, queued_run):
    """A socket's attach and its run events do not wait for the process's one shared thread-sensitive thread, which
    the executor's claims and purges use: Channels' dispatch closed old database connections there before every
    handler, and the attach hopped there, so a socket's start and each of its events waited behind whatever that
    thread was doing. The attach is a hop of the loop's pool now (``awatch_start``), and the consumer's dispatch
    makes no hop (``dispatch``): both fail this test when put back."""
    headers = await session_headers(cast.dev_a.user)  # a hop of its own, before the thread is taken
    started, release = threading.Event(), threading.Event()

    def occupy() -> None:
        started.set()
        release.wait(10)

    busy = asyncio.ensure_future(sync_to_async(occupy)())  # thread-sensitive: the thread the hop would use
    try:
        deadline = time.monotonic() + 5
        while not started.is_set():
            assert time.monotonic() < deadline, "the shared thread never started the blocker"
            await asyncio.sleep(0.01)
        communicator, snapshot = await open_run_socket(f"/ws/runs/{queued_run.id}/", headers)
        assert snapshot["status"] == "queued"
        event: TextDeltaEvent = {"type": "text.delta", "run_id": str(queued_run.id), "seq": 7, "text": "live"}
        await events.apublish(queued_run, event)
        assert await communicator.receive_json_from(timeout=3) == event
        assert not busy.done()  # all of it while the thread was held
        await communicator.disconnect()
    finally:
        release.set()
        await busy


async def test_finished_run_gets_status_and_finished_but_no_content(cast, queued_run):
    from runs.services import run_request_cancel

    await sync_to_async(run_request_cancel)(run=queued_run, actor=cast.admin_a.user)
    communicator, snapshot = await open_run_socket(f"/ws/runs/{queued_run.id}/", await session_headers(cast.dev_a.user))
    assert snapshot["status"] == "cancelled"
    finished = await communicator.receive_json_from(timeout=3)
    assert (finished["type"], finished["seq"], finished["status"]) == ("run.finished", 0, "cancelled")
    assert await communicator.receive_nothing(timeout=0.1)
    await communicator.disconnect()


async def test_developer_watches_a_live_run_and_cancels_it_over_the_socket(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.admin_a, key, model="fake/slow")  # started by the admin, watched by the developer
    async with running_executor() as executor:
        communicator, snapshot = await open_run_socket(f"/ws/runs/{run.id}/", await session_headers(cast.dev_a.user))
        assert snapshot["status"] == "queued"
        assert await executor.submit_run(run.id)
        seen: list[dict[str, Any]] = []
        while len([e for e in seen if e["type"] == "text.delta"]) < 2:
            seen.append(await communicator.receive_json_from(timeout=3))
        assert seen[0]["type"] == "run.status"
        assert seen[0]["status"] == "running"
        asked = time.monotonic()
        await communicator.send_json_to({"type": "cancel"})
        while seen[-1]["type"] != "run.finished":
            seen.append(await communicator.receive_json_from(timeout=2))
        assert time.monotonic() - asked < 1.0
        assert seen[-1]["status"] == "cancelled"
        await communicator.disconnect()
    assert (await Run.objects.aget(id=run.id)).status == RunStatus.CANCELLED
    await simulator_saw(simulator, lambda entry: entry["client_closed"])


async def test_closing_the_socket_does_not_stop_the_run(cast, simulator):
    simulator.enqueue(
        "openai",
        {
            "turns": [{"text": "x" * 80}],
            "stream_shape": {"text_chunk_chars": 4},
            "timing": {"first_token_ms": 20, "per_event_ms": 10},
        },
    )
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key)
    async with running_executor() as executor:
        communicator, _ = await open_run_socket(f"/ws/runs/{run.id}/", await session_headers(cast.dev_a.user))
        assert await executor.submit_run(run.id)
        while (await communicator.receive_json_from(timeout=3))["type"] != "text.delta":
            pass
        await communicator.disconnect()
        finished = await wait_for_status(run.id, {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
    assert finished.status == RunStatus.SUCCEEDED
    assert finished.usage_complete


async def test_cancel_over_the_socket_needs_runs_write(cast, queued_run):
    _, secret = await sync_to_async(api_key_create)(
        org=cast.org_a, name="read only", actor=cast.admin_a.user, scopes=["runs:read"]
    )
    communicator, _ = await open_run_socket(f"/ws/runs/{queued_run.id}/", key_headers(secret))
    await communicator.send_json_to({"type": "cancel"})
    assert await communicator.receive_nothing(timeout=0.3)
    await communicator.disconnect()
    assert (await Run.objects.aget(id=queued_run.id)).status == RunStatus.QUEUED


async def test_developer_cancels_a_queued_run_over_the_socket(cast, queued_run):
    communicator, _ = await open_run_socket(f"/ws/runs/{queued_run.id}/", await session_headers(cast.dev_a.user))
    await communicator.send_json_to({"type": "cancel"})
    finished = await communicator.receive_json_from(timeout=3)
    assert (finished["type"], finished["status"]) == ("run.finished", "cancelled")
    await communicator.disconnect()
    assert (await Run.objects.aget(id=queued_run.id)).status == RunStatus.CANCELLED


# --- Hostile input --------------------------------------------------------------------------------------------


async def test_malformed_messages_are_ignored(cast, queued_run):
    communicator, _ = await open_run_socket(f"/ws/runs/{queued_run.id}/", await session_headers(cast.dev_a.user))
    for text in ("not json", "[1, 2]", '{"type": "explode"}', '{"type": 5}', "null", '{"cancel": true}'):
        await communicator.send_to(text_data=text)
    assert await communicator.receive_nothing(timeout=0.2)
    # Still alive and listening.
    event: TextDeltaEvent = {"type": "text.delta", "run_id": str(queued_run.id), "seq": 1, "text": "still here"}
    await events.apublish(queued_run, event)
    assert await communicator.receive_json_from(timeout=3) == event
    await communicator.disconnect()
    assert (await Run.objects.aget(id=queued_run.id)).status == RunStatus.QUEUED


@pytest.mark.parametrize(
    ("frame", "code"),
    [({"bytes_data": b"\x00\x01"}, 4415), ({"text_data": '{"type": "cancel", "pad": "' + "x" * 5000 + '"}'}, 4413)],
)
async def test_binary_or_oversized_frames_close_the_socket(cast, queued_run, frame, code):
    communicator, _ = await open_run_socket(f"/ws/runs/{queued_run.id}/", await session_headers(cast.dev_a.user))
    await communicator.send_to(**frame)
    output = await communicator.receive_output(timeout=3)
    assert output == {"type": "websocket.close", "code": code}
    assert (await Run.objects.aget(id=queued_run.id)).status == RunStatus.QUEUED


# --- The org socket -------------------------------------------------------------------------------------------


async def test_org_socket_streams_status_changes_of_the_orgs_runs_only(cast, simulator):
    key_a = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    key_b = await asim_key(cast.org_b, cast.admin_b.user, simulator)
    communicator = socket("/ws/org/runs/", await session_headers(cast.dev_a.user))
    connected, _ = await communicator.connect(timeout=3)
    assert connected
    other = await amake_run(cast.admin_b, key_b, objective="Org B's business.")
    ours = await amake_run(cast.dev_a, key_a, objective="Org A's run.")
    event = await communicator.receive_json_from(timeout=3)
    assert (event["type"], event["run_id"], event["status"]) == ("run.status", str(ours.id), "queued")
    assert await communicator.receive_nothing(timeout=0.3)
    # Org B's own socket does see its run.
    communicator_b = socket("/ws/org/runs/", key_headers(cast.dev_b.api_secret))
    assert (await communicator_b.connect(timeout=3))[0]
    await events.apublish(other, events.status_event(other, seq=1))
    assert (await communicator_b.receive_json_from(timeout=3))["run_id"] == str(other.id)
    assert await communicator.receive_nothing(timeout=0.2)
    await communicator.disconnect()
    await communicator_b.disconnect()
