"""One authentication path (issue #11 point 3): the REST API, SSE, the OpenAI-compatible proxy and the websockets
refuse the same badly presented credentials the same way. Requests go through the real ASGI application with raw
header lists, so a header really is sent twice (Django's test clients cannot express that)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.testing import HttpCommunicator, WebsocketCommunicator

from cesaflow.asgi import application
from tests.runs.test_execution_support import (
    amake_run,
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]

HOST = (b"host", b"testserver")
ORIGIN = (b"origin", b"http://testserver")


@pytest.fixture(autouse=True)
def _runs_wait(settings):
    settings.RUN_EXECUTOR = "worker"


async def http(path: str, headers: list[tuple[bytes, bytes]], query: str = "") -> tuple[int, dict[str, Any]]:
    communicator = HttpCommunicator(application, "GET", path + (f"?{query}" if query else ""), headers=[HOST, *headers])
    try:
        response = await communicator.get_response(timeout=5)
    finally:
        await communicator.wait()
    return response["status"], json.loads(response["body"] or b"{}")


async def ws_close_code(path: str, headers: list[tuple[bytes, bytes]], query: str = "") -> int:
    communicator = WebsocketCommunicator(application, path + (f"?{query}" if query else ""), headers=[ORIGIN, *headers])
    connected, _ = await communicator.connect(timeout=3)
    assert connected
    output = await communicator.receive_output(timeout=3)
    await communicator.disconnect()
    return int(output["code"]) if output["type"] == "websocket.close" else 0


def cases(cast) -> dict[str, tuple[list[tuple[bytes, bytes]], str, str]]:
    """name -> (headers, query string, the REST error code)."""
    key = cast.dev_a.api_secret.encode()
    other = cast.admin_a.api_secret.encode()
    return {
        "x-api-key twice": ([(b"x-api-key", key), (b"x-api-key", key)], "", "ambiguous_credentials"),
        "authorization twice": (
            [(b"authorization", b"Bearer " + key), (b"authorization", b"Bearer " + key)],
            "",
            "ambiguous_credentials",
        ),
        "two different keys": (
            [(b"x-api-key", key), (b"authorization", b"Bearer " + other)],
            "",
            "ambiguous_credentials",
        ),
        "key in the query string": ([(b"x-api-key", key)], f"api_key={key.decode()}", "credentials_in_url"),
        "token parameter": ([(b"x-api-key", key)], "token=anything", "credentials_in_url"),
        "a key under another name": ([(b"x-api-key", key)], f"q={key.decode()}", "credentials_in_url"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "x-api-key twice",
        "authorization twice",
        "two different keys",
        "key in the query string",
        "token parameter",
        "a key under another name",
    ],
)
async def test_every_entry_point_refuses_badly_presented_keys_alike(cast, simulator, case):
    run = await amake_run(cast.admin_a, await asim_key(cast.org_a, cast.admin_a.user, simulator))
    headers, query, code = cases(cast)[case]
    for path in ("/api/v1/org", f"/api/v1/runs/{run.id}/events"):
        status, body = await http(path, headers, query)
        assert (status, body["error"]["code"]) == (401, code), path
    status, body = await http("/api/v1/models", headers, query)  # the proxy, in OpenAI's shape
    assert (status, body["error"]["code"]) == (401, code)
    for path in (f"/ws/runs/{run.id}/", "/ws/org/runs/"):
        assert await ws_close_code(path, headers, query) == 4401, path


async def test_the_same_key_in_both_headers_is_one_key(cast, simulator):
    key = cast.dev_a.api_secret.encode()
    headers = [(b"x-api-key", key), (b"authorization", b"Bearer " + key)]
    status, body = await http("/api/v1/org", headers)
    assert status == 200
    assert body["slug"] == "org-a"
    status, _ = await http("/api/v1/models", headers)
    assert status == 200
