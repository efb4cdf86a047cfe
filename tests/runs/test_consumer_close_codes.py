"""Websocket refusals reach the client through the real server (daphne and its websocket library, autobahn), which
sends only close codes 1000 and 3000-4999: a refusal with another code (1013) was accepted and then closed with a
bare 1011, or left open without a frame. The deployment drill (``deploy/drill.py``) found it: websockets opened
while Redis restarted hung silently."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from bench.wsclient import WebSocket, WebSocketClosed
from runs.consumers import CLOSE_TRY_AGAIN_LATER
from tests.live_server import LiveServer, free_port, live_server
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
