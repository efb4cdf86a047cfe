"""``GET /api/v1/runs/{id}/events``: Server-Sent Events for IDEs and CLIs, through Django's async test client (the
same ASGI request path a server takes, streaming included)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from orgs.services import api_key_create
from runs.models import RunStatus
from runs.services import run_request_cancel
from tests.runs.test_execution_support import (
    EventWatcher,
    amake_run,
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
    running_executor,
)
from tests.signin import sign_in

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]


@pytest.fixture(autouse=True)
def _runs_wait_for_the_test(settings):
    settings.RUN_EXECUTOR = "worker"


def url(run_id) -> str:
    return f"/api/v1/runs/{run_id}/events"


class Frames:
    """Reads an event stream frame by frame: ``(event, id, data)`` or ``("comment", None, text)``."""

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        self._content = aiter(content)
        self._buffer = b""
        self.raw = b""

    async def next(self, timeout: float = 3.0) -> tuple[str, str | None, Any]:
        while b"\n\n" not in self._buffer:
            chunk = await asyncio.wait_for(anext(self._content), timeout)
            self.raw += chunk
            self._buffer += chunk
        frame, self._buffer = self._buffer.split(b"\n\n", 1)
        lines = frame.decode().split("\n")
        if lines[0].startswith(":"):
            return "comment", None, lines[0][1:].strip()
        fields = dict(line.split(": ", 1) for line in lines)
        return fields["event"], fields["id"], json.loads(fields["data"])

    async def ended(self, timeout: float = 3.0) -> bool:
        try:
            await asyncio.wait_for(anext(self._content), timeout)
        except StopAsyncIteration:
            return True
        return False


def body(response: Any) -> Frames:
    """The frames of a streaming response (the async test client's responses are typed as plain ones)."""
    return Frames(response.streaming_content)


async def open_stream(run_id, headers) -> tuple[Any, Frames]:
    response = await AsyncClient().get(url(run_id), headers=headers)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response["Cache-Control"] == "no-store"
    return response, body(response)


@pytest.fixture
async def queued_run(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    return await amake_run(cast.admin_a, key)


async def test_anonymous_gets_a_401_json_error_and_no_stream(queued_run):
    response = await AsyncClient().get(url(queued_run.id))
    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "unauthenticated"


async def test_other_orgs_run_and_missing_runs_are_404_before_streaming(cast, queued_run):
    for run_id in (queued_run.id, uuid.uuid4()):
        response = await AsyncClient().get(url(run_id), headers={"x-api-key": cast.admin_b.api_secret})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        assert not response.streaming


async def test_outsider_session_gets_404(cast, queued_run):
    client = AsyncClient()
    await sync_to_async(sign_in)(client, cast.outsider.user)
    response = await client.get(url(queued_run.id))
    assert response.status_code == 404


async def test_api_key_without_runs_read_gets_403_even_when_accepting_an_event_stream(cast, queued_run):
    _, secret = await sync_to_async(api_key_create)(
        org=cast.org_a, name="org only", actor=cast.admin_a.user, scopes=["org:read"]
    )
    response = await AsyncClient().get(url(queued_run.id), headers={"x-api-key": secret, "accept": "text/event-stream"})
    assert response.status_code == 403
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "permission_denied"


async def test_finished_run_gets_its_status_and_finished_then_the_stream_ends(cast, queued_run):
    await sync_to_async(run_request_cancel)(run=queued_run, actor=cast.admin_a.user)
    _, frames = await open_stream(queued_run.id, {"x-api-key": cast.dev_a.api_secret})
    kind, seq, status = await frames.next()
    assert (kind, seq, status["status"]) == ("run.status", "0", "cancelled")
    kind, seq, finished = await frames.next()
    assert (kind, seq, finished["status"]) == ("run.finished", "0", "cancelled")
    assert await frames.ended()


async def test_sse_streams_the_same_events_as_the_websocket_and_ends_after_finished(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    run = await amake_run(cast.dev_a, key, objective="Stream it.")
    client = AsyncClient()
    await sync_to_async(sign_in)(client, cast.dev_a.user)  # a session works as well as an API key
    response = await client.get(url(run.id), headers={"accept": "text/event-stream"})
    assert response.status_code == 200
    frames = body(response)
    kind, seq, snapshot = await frames.next()
    assert (kind, seq, snapshot["status"]) == ("run.status", "0", "queued")

    async with running_executor() as executor, EventWatcher(run.id) as watcher:
        assert await executor.submit_run(run.id)
        streamed: list[dict[str, Any]] = []
        while not streamed or streamed[-1]["type"] != "run.finished":
            kind, seq, event = await frames.next()
            assert kind == event["type"]
            assert seq == str(event["seq"])
            streamed.append(event)
        await watcher.until_finished()
    assert streamed == watcher.events
    assert "".join(e["text"] for e in streamed if e["type"] == "text.delta") == "You asked: Stream it."
    assert await frames.ended()


async def test_idle_streams_carry_keep_alive_comments_and_end_when_the_run_does(cast, queued_run, settings):
    settings.SSE_KEEPALIVE_SECONDS = 0.05
    _, frames = await open_stream(queued_run.id, {"authorization": f"Bearer {cast.dev_a.api_secret}"})
    assert (await frames.next())[0] == "run.status"
    assert await frames.next() == ("comment", None, "keep-alive")
    await sync_to_async(run_request_cancel)(run=queued_run, actor=cast.dev_a.user)
    kind = None
    while kind != "run.finished":
        kind, _, event = await frames.next()
    assert event["status"] == RunStatus.CANCELLED
    assert await frames.ended()
