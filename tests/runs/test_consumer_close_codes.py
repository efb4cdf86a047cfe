"""Websocket refusals reach the client through the real server (daphne and its websocket library, autobahn), which
sends only close codes 1000 and 3000-4999: a refusal with another code (1013) was accepted and then closed with a
bare 1011, or left open without a frame. The deployment drill (``deploy/drill.py``) found it: websockets opened
while Redis restarted hung silently."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from bench.wsclient import OP_BINARY, WebSocket, WebSocketClosed
from runs.consumers import CLOSE_TOO_BIG, CLOSE_TRY_AGAIN_LATER, CLOSE_UNSUPPORTED_DATA
from tests.live_server import LiveServer, free_port, live_server
from tests.runs.conftest import simulator, simulator_server  # noqa: F401 - fixtures, used below
from tests.runs.test_execution_support import make_run, sim_key
from tests.signin import session_cookies_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def server_without_redis(tmp_path) -> Iterator[LiveServer]:
    # Nothing listens on this port: the session store (and the channel layer) cannot be reached.
    with live_server(tmp_path, {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}) as running:
        yield running


async def _close_code(server: LiveServer, cookies: dict[str, str]) -> int:
    headers = {
        "cookie": "; ".join(f"{name}={value}" for name, value in cookies.items()),
        "origin": server.url,
    }
    socket = await WebSocket.connect("127.0.0.1", server.port, f"/ws/runs/{uuid.uuid4()}/", headers=headers)
    try:
        async with asyncio.timeout(15):
            while True:
                await socket.receive_text()
    except WebSocketClosed as closed:
        return closed.code
    finally:
        socket.writer.close()


def test_websocket_refused_while_sessions_cannot_be_checked_gets_its_close_code(cast, server_without_redis):
    cookies = session_cookies_for(cast.dev_a.user)  # a real session, signed with the server's keys
    code = asyncio.run(_close_code(server_without_redis, cookies))
    assert code == CLOSE_TRY_AGAIN_LATER == 4503


@pytest.fixture
def server(tmp_path) -> Iterator[LiveServer]:
    with live_server(tmp_path, {"CESAFLOW_EXECUTOR": "worker"}) as running:  # runs stay queued
        yield running


async def _close_after_sending(server: LiveServer, path: str, api_secret: str, opcode: int, payload: bytes) -> int:
    headers = {"origin": server.url, "x-api-key": api_secret}
    socket = await WebSocket.connect("127.0.0.1", server.port, path, headers=headers)
    try:
        async with asyncio.timeout(15):
            await socket.receive_text()  # the snapshot: the socket is open
            socket._send(opcode, payload)
            while True:
                await socket.receive_text()
    except WebSocketClosed as closed:
        return closed.code
    finally:
        socket.writer.close()


@pytest.mark.parametrize(
    ("opcode", "payload", "expected"),
    [(OP_BINARY, b"\x00\x01", CLOSE_UNSUPPORTED_DATA), (0x1, b'{"pad": "' + b"x" * 5000 + b'"}', CLOSE_TOO_BIG)],
    ids=["binary", "too-big"],
)
def test_frames_the_socket_refuses_get_their_close_code_through_the_server(
    cast,
    server,
    simulator,  # noqa: F811
    settings,
    opcode,
    payload,
    expected,
):
    settings.RUN_EXECUTOR = "worker"
    run = make_run(cast.admin_a, sim_key(cast.org_a, cast.admin_a.user, simulator))
    code = asyncio.run(_close_after_sending(server, f"/ws/runs/{run.id}/", cast.admin_a.api_secret, opcode, payload))
    assert code == expected
