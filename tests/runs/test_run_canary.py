"""The run canary (issue #5, security.md §7.2 and test 42): the simulator answers with a unique canary string; the
run streams it to a websocket client and an SSE client, and afterwards the canary is nowhere: not in a ``pg_dump``,
the PostgreSQL data files and WAL (when readable here), the Redis keys and values (the channel layer carried it), or
the logs (every logger at DEBUG, captured raw and as written). The answer is delivered, never stored.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient

from cesaflow.asgi import application
from runs.models import Run, RunStatus
from tests.keys import canary
from tests.runs.test_execution_support import (
    amake_run,
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
    running_executor,
)
from tests.runs.test_sse import body
from tests.signin import cookie_header, session_cookies_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]


async def _websocket(user, run_id) -> WebsocketCommunicator:
    cookies = await sync_to_async(session_cookies_for)(user)
    communicator = WebsocketCommunicator(
        application,
        f"/ws/runs/{run_id}/",
        headers=[(b"origin", b"http://testserver"), cookie_header(cookies)],
    )
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    assert (await communicator.receive_json_from(timeout=5))["type"] == "run.status"
    return communicator


async def test_streamed_answer_reaches_its_watchers_and_is_stored_nowhere(cast, simulator, settings):
    settings.RUN_EXECUTOR = "worker"  # the test executes the run itself, once its watchers are connected
    settings.DEBUG = True  # worst case: Django logs every SQL statement with its parameters
    secret_word = f"cfcanary-resp-{secrets.token_hex(16)}"
    answer = f"The secret word is {secret_word}, and that is all."
    simulator.enqueue(
        "openai",
        {"turns": [{"text": answer}], "stream_shape": {"text_chunk_chars": 5}, "timing": {"per_event_ms": 2}},
    )

    with canary.debug_logging() as logs:
        key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
        run = await amake_run(cast.dev_a, key, objective="Tell me the secret word.")
        websocket = await _websocket(cast.dev_a.user, run.id)
        response = await AsyncClient().get(
            f"/api/v1/runs/{run.id}/events", headers={"x-api-key": cast.admin_a.api_secret}
        )
        frames = body(response)
        assert (await frames.next())[0] == "run.status"

        async with running_executor() as executor:
            assert await executor.submit_run(run.id)
            received: list[dict[str, Any]] = []
            while not received or received[-1]["type"] != "run.finished":
                received.append(await websocket.receive_json_from(timeout=5))
            streamed: list[dict[str, Any]] = []
            while not streamed or streamed[-1]["type"] != "run.finished":
                streamed.append((await frames.next())[2])
        await websocket.disconnect()

    # Both watchers got the whole answer, live.
    assert "".join(e["text"] for e in received if e["type"] == "text.delta") == answer
    assert "".join(e["text"] for e in streamed if e["type"] == "text.delta") == answer
    finished = await Run.objects.aget(id=run.id)
    assert finished.status == RunStatus.SUCCEEDED

    collected = canary.Collected()
    await sync_to_async(canary.collect_pg_dump)(collected)
    await sync_to_async(canary.collect_pg_files)(collected)
    await sync_to_async(canary.collect_redis)(collected)
    collected.add("logs", logs.text())

    # The collection is real: the run's metadata is in the dump, the logs recorded the run, Redis holds the session.
    assert str(run.id).encode() in collected.blobs["pg_dump"]
    assert b"Tell me the secret word." in collected.blobs["pg_dump"]
    assert f"run {run.id} finished status=succeeded".encode() in collected.blobs["logs"]
    assert collected.blobs.get("redis:keys")
    hits = canary.scan(collected, [secret_word])
    assert hits == [], f"the streamed answer was stored: {hits}"
