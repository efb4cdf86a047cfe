"""A run never loses its answer: watched runs call the provider only once their stream is attached, and API clients
can create and stream a run in one request.

Everything goes through the real ASGI application (``cesaflow.asgi``: middleware, DRF, the SSE body on the server's
event loop), the real channel layer (Redis) and the provider simulator, for both executors: ``inline`` (the
application binds the executor to this test's loop, as a server's) and ``worker`` (an executor polling the queue
and listening for nudges, as ``run_worker`` does).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from channels.testing import HttpCommunicator

from cesaflow.asgi import application
from runs import executor as executor_module
from runs.models import Run, RunStatus
from runs.simulator.scenarios import _UTF8_TEXT
from tests.runs.test_execution_support import (
    EventWatcher,
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
    running_executor,
    wait_for_status,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]

OBJECTIVE = "Tell me everything."
ECHO_TEXT = f"You asked: {OBJECTIVE}"
# About 2,000 tokens, sent as fast as the simulator can write them: the case that used to lose its answer.
LONG_TEXT = "".join(f"w{i:04d} " for i in range(1600))
LONG = {"turns": [{"text": LONG_TEXT}], "stream_shape": {"text_chunk_chars": 4}}


@pytest.fixture(params=["inline", "worker"])
async def executor_mode(request, settings) -> AsyncIterator[str]:
    """Both executors, with supervision fast enough that the attach window's expiry shows within a second."""
    settings.RUN_EXECUTOR = request.param
    settings.RUN_HEARTBEAT_SECONDS = 0.1
    if request.param == "worker":
        async with running_executor(claim_queued=True, reap=True, heartbeat_s=0.1, poll_s=0.2):
            yield request.param
        return
    try:
        yield request.param
    finally:
        await executor_module.unbind_server_loop()


class AsgiStream:
    """One HTTP request to the ASGI application, read as a client reads an event stream (``curl -N``)."""

    def __init__(self, method: str, path: str, *, secret: str, body: dict[str, Any] | None = None, **headers: str):
        payload = json.dumps(body).encode() if body is not None else b""
        raw_headers = [(b"host", b"testserver"), (b"x-api-key", secret.encode())]
        if body is not None:
            raw_headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        raw_headers += [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
        self.communicator = HttpCommunicator(application, method, path, body=payload, headers=raw_headers)
        self.payload = payload
        self.status = 0
        self.headers: dict[str, str] = {}
        self._buffer = b""
        self.more = True

    async def open(self) -> AsgiStream:
        await self.communicator.send_input({"type": "http.request", "body": self.payload})
        start = await self.communicator.receive_output(timeout=10)
        assert start["type"] == "http.response.start"
        self.status = start["status"]
        self.headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
        return self

    async def next(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next event's JSON (comments skipped)."""
        while True:
            while b"\n\n" not in self._buffer:
                assert self.more, "the stream ended"
                message = await self.communicator.receive_output(timeout=timeout)
                self._buffer += message.get("body", b"")
                self.more = message.get("more_body", False)
            frame, self._buffer = self._buffer.split(b"\n\n", 1)
            lines = frame.decode().split("\n")
            if lines[0].startswith(":"):
                continue
            fields = dict(line.split(": ", 1) for line in lines)
            event: dict[str, Any] = json.loads(fields["data"])
            assert fields["event"] == event["type"]
            return event

    async def until_finished(self, timeout: float = 20.0) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not seen or seen[-1]["type"] != "run.finished":
            seen.append(await self.next(max(0.1, deadline - time.monotonic())))
        assert await self.body() == b"", "nothing follows run.finished: the stream ends"
        return seen

    async def body(self) -> bytes:
        """The rest of the body, once the response has ended."""
        while self.more:
            message = await self.communicator.receive_output(timeout=10)
            self._buffer += message.get("body", b"")
            self.more = message.get("more_body", False)
        # Let the application finish (it returns its database connection to the pool as it does).
        await self.communicator.wait(timeout=10)
        return self._buffer

    async def hang_up(self) -> None:
        await self.communicator.send_input({"type": "http.disconnect"})
        await self.communicator.wait(timeout=10)


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "text.delta")


def chat_requests(simulator: Any) -> list[dict[str, Any]]:
    return [r for r in simulator.requests() if r["path"].endswith(("/chat/completions", "/messages"))]


async def create(secret: str, key_id: Any, **fields: Any) -> dict[str, Any]:
    body = {"objective": OBJECTIVE, "provider_key": str(key_id), "model": "fake/echo", **fields}
    stream = await AsgiStream("POST", "/api/v1/runs", secret=secret, body=body).open()
    assert stream.status == 201, await stream.body()
    created: dict[str, Any] = json.loads(await stream.body())
    return created


CASES = [
    pytest.param("openai", "fake/echo", None, ECHO_TEXT, id="echo"),
    pytest.param("anthropic", "fake/split_utf8", None, _UTF8_TEXT, id="split_utf8"),
    pytest.param("groq", "fake/unpaced", LONG, LONG_TEXT, id="2000_tokens_unpaced"),
]


@pytest.mark.parametrize(("flavour", "model", "scenario", "expected"), CASES)
async def test_post_then_sse_receives_every_delta(cast, simulator, executor_mode, flavour, model, scenario, expected):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator, flavour=flavour)
    if scenario is not None:
        simulator.enqueue(flavour, scenario)
    created = await create(cast.dev_a.api_secret, key.id, model=model)
    assert (created["status"], created["watch"], created["waiting_for_watcher"]) == ("queued", True, True)

    # Nobody is watching yet: the provider is not called, however long we look away.
    await asyncio.sleep(0.5)
    assert chat_requests(simulator) == []
    assert (await Run.objects.aget(id=created["id"])).status == RunStatus.QUEUED

    stream = await AsgiStream("GET", f"/api/v1/runs/{created['id']}/events", secret=cast.dev_a.api_secret).open()
    assert stream.status == 200
    events = await stream.until_finished()
    assert (events[0]["type"], events[0]["seq"]) == ("run.status", 0)
    assert text_of(events) == expected
    assert events[-1]["status"] == RunStatus.SUCCEEDED
    assert len(chat_requests(simulator)) == 1


@pytest.mark.parametrize(("flavour", "model", "scenario", "expected"), CASES)
async def test_streaming_create_receives_every_delta(
    cast, simulator, executor_mode, flavour, model, scenario, expected
):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator, flavour=flavour)
    if scenario is not None:
        simulator.enqueue(flavour, scenario)
    body = {"objective": OBJECTIVE, "provider_key": str(key.id), "model": model, "stream": True}
    stream = await AsgiStream("POST", "/api/v1/runs", secret=cast.dev_a.api_secret, body=body).open()
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = await stream.until_finished()
    first = events[0]
    # The first event names the run, before anything of its answer. The inline executor claimed it as the stream
    # attached (in the same transaction): already running.
    status = "running" if executor_mode == "inline" else "queued"
    assert (first["type"], first["status"], first["seq"]) == ("run.status", status, 0)
    assert stream.headers["location"] == f"/api/v1/runs/{first['run_id']}"
    assert text_of(events) == expected
    assert all(e["run_id"] == first["run_id"] for e in events)
    assert events[-1]["status"] == RunStatus.SUCCEEDED


async def test_accept_event_stream_alone_asks_for_the_stream(cast, simulator, executor_mode):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    body = {"objective": OBJECTIVE, "provider_key": str(key.id), "model": "fake/echo"}
    stream = await AsgiStream(
        "POST", "/api/v1/runs", secret=cast.dev_a.api_secret, body=body, accept="text/event-stream"
    ).open()
    assert stream.status == 200
    assert text_of(await stream.until_finished()) == ECHO_TEXT


async def test_a_run_nobody_attaches_to_is_cancelled_within_the_window_without_calling_the_provider(
    cast, simulator, executor_mode, settings
):
    settings.RUN_ATTACH_WINDOW_SECONDS = 0.5
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    created = await create(cast.dev_a.api_secret, key.id)
    run = await wait_for_status(created["id"], {RunStatus.CANCELLED}, timeout=10)
    assert run.error_kind == "not_watched"
    assert (run.input_tokens, run.output_tokens, run.started_at) == (0, 0, None)
    assert chat_requests(simulator) == []
    # A late watcher learns what happened instead of waiting forever.
    stream = await AsgiStream("GET", f"/api/v1/runs/{created['id']}/events", secret=cast.dev_a.api_secret).open()
    events = await stream.until_finished()
    assert events[-1]["error_kind"] == "not_watched"


async def test_an_unwatched_run_starts_without_anyone_attached(cast, simulator, executor_mode, settings):
    settings.RUN_ATTACH_WINDOW_SECONDS = 0.5
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    created = await create(cast.dev_a.api_secret, key.id, watch=False)
    assert (created["watch"], created["waiting_for_watcher"]) == (False, False)
    run = await wait_for_status(created["id"], {RunStatus.SUCCEEDED}, timeout=10)
    assert run.output_tokens > 0
    assert run.attached_at is None  # nobody saw it: the run page says so
    assert len(chat_requests(simulator)) == 1


async def test_a_second_subscriber_joining_mid_stream_gets_the_rest(cast, simulator, executor_mode):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    simulator.enqueue(
        "openai",
        {"turns": [{"text": "one two three four five six seven eight"}], "timing": {"per_event_ms": 60}},
    )
    body = {"objective": OBJECTIVE, "provider_key": str(key.id), "model": "fake/x", "stream": True}
    first = await AsgiStream("POST", "/api/v1/runs", secret=cast.dev_a.api_secret, body=body).open()
    status = await first.next()
    seen = [status, await first.next()]
    while seen[-1]["type"] != "text.delta":
        seen.append(await first.next())
    # Joins after the first words went out: it sees the run as it is now, then the rest live.
    async with EventWatcher(status["run_id"]) as late:
        second = AsgiStream("GET", f"/api/v1/runs/{status['run_id']}/events", secret=cast.admin_a.api_secret)
        await second.open()
        rest = await second.until_finished()
        seen += await first.until_finished()
        await late.until_finished()
    whole = text_of(seen)
    assert whole == "one two three four five six seven eight"
    assert rest[0]["status"] == RunStatus.RUNNING
    assert text_of(rest)
    assert whole.endswith(text_of(rest))
    assert text_of(rest) != whole
    assert len(chat_requests(simulator)) == 1  # the second watcher did not start anything new


async def test_hanging_up_a_streaming_create_does_not_stop_the_run_by_default(cast, simulator, executor_mode):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    body = {"objective": OBJECTIVE, "provider_key": str(key.id), "model": "fake/slow", "stream": True}
    stream = await AsgiStream("POST", "/api/v1/runs", secret=cast.dev_a.api_secret, body=body).open()
    run_id = (await stream.next())["run_id"]
    while (await stream.next())["type"] != "text.delta":
        pass
    await stream.hang_up()
    run = await wait_for_status(run_id, {RunStatus.SUCCEEDED}, timeout=20)
    assert run.cancel_requested_at is None


async def test_cancel_on_disconnect_cancels_the_run_when_the_client_hangs_up(cast, simulator, executor_mode):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    body = {
        "objective": OBJECTIVE,
        "provider_key": str(key.id),
        "model": "fake/slow",
        "stream": True,
        "cancel_on_disconnect": True,
    }
    stream = await AsgiStream("POST", "/api/v1/runs", secret=cast.dev_a.api_secret, body=body).open()
    run_id = (await stream.next())["run_id"]
    while (await stream.next())["type"] != "text.delta":
        pass
    await stream.hang_up()
    run = await wait_for_status(run_id, {RunStatus.CANCELLED}, timeout=10)
    assert run.error_kind == "cancelled"
    assert run.input_tokens > 0 or not run.usage_complete  # what the provider had counted is kept


async def test_cancel_on_disconnect_without_stream_is_a_field_error(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    body = {"objective": OBJECTIVE, "provider_key": str(key.id), "model": "fake/echo", "cancel_on_disconnect": True}
    stream = await AsgiStream("POST", "/api/v1/runs", secret=cast.dev_a.api_secret, body=body).open()
    assert stream.status == 400
    error = json.loads(await stream.body())["error"]
    assert error["code"] == "validation_error"
    assert "cancel_on_disconnect" in error["details"]["fields"]
    assert not await Run.objects.filter(org=cast.org_a).aexists()


async def test_streaming_create_refusals_are_json_errors_before_any_stream(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    body = {"objective": OBJECTIVE, "provider_key": str(key.id), "model": "fake/echo", "stream": True}
    # Another org's key is "not found", before anything streams.
    stream = await AsgiStream("POST", "/api/v1/runs", secret=cast.admin_b.api_secret, body=body).open()
    assert stream.status == 400
    assert stream.headers["content-type"] == "application/json"
    assert "provider_key" in json.loads(await stream.body())["error"]["details"]["fields"]
    assert not await Run.objects.aexists()
