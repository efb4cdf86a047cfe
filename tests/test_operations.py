"""Operating CesaFlow (issue #15 point 5): structured logs, /metrics, and a web process's graceful shutdown."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from prometheus_client.parser import text_string_to_metric_families

from bench.wsclient import WebSocket, WebSocketClosed
from cesaflow.lib import request_context, shutdown
from cesaflow.lib.logs import JsonFormatter
from cesaflow.lib.metrics import serve_process_metrics
from cesaflow.lib.redact import RedactingFilter
from orgs.services import invitation_create
from runs.models import Run, RunKind, RunStatus, UsageRecord
from tests.live_server import LiveServer, live_server
from tests.runs.conftest import simulator, simulator_server  # noqa: F401 - fixtures, used below
from tests.runs.test_execution_support import (
    async_isolation,  # noqa: F401 - a fixture, used below
    make_run,
    sim_key,
)

WAIT_SECONDS = 20.0  # a deadline for what must happen, never an expected duration
METRICS_TOKEN = "m" * 40


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the loggers write, formatted as production formats it (redaction, then JSON)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    access = logging.getLogger("cesaflow.access")
    level = access.level
    access.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    access.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


# --- Logs -------------------------------------------------------------------------------------------------------------


def test_a_json_line_carries_the_request_and_run_ids_and_no_secret(json_lines):
    token = request_context.bind(request_context.RequestContext(request_id="abc123"))
    try:
        request_context.note(org_id="org-1", run_id="run-9")
        logging.getLogger("cesaflow.runs").warning("provider said %s", "Bearer sk-proj-abcdefghijklmnop")
    finally:
        request_context.unbind(token)
    (line,) = _lines(json_lines)
    assert (line["level"], line["logger"]) == ("WARNING", "cesaflow.runs")
    assert (line["request_id"], line["org_id"], line["run_id"]) == ("abc123", "org-1", "run-9")
    assert "sk-proj-abcdefghijklmnop" not in json_lines.getvalue()
    assert line["time"].endswith("+00:00")


def test_only_identifiers_can_be_noted():
    token = request_context.bind(request_context.RequestContext())
    try:
        with pytest.raises(ValueError, match="not a log field"):
            request_context.note(prompt="hello")
    finally:
        request_context.unbind(token)


@pytest.mark.django_db
def test_the_access_log_names_the_route_org_and_request_id_never_a_token_in_the_path(cast, settings, json_lines):
    settings.ACCESS_LOG = True
    response = cast.admin_a.api().get("/api/v1/org")
    assert response.status_code == 200
    _invitation, invite_token = invitation_create(
        org=cast.org_a, email="new@a.example", role="developer", actor=cast.admin_a.user
    )
    cast.outsider.client().get(f"/invite/{invite_token}/")
    access = [line for line in _lines(json_lines) if line["logger"] == "cesaflow.access"]
    api_line = next(line for line in access if line["path"] == "api/v1/org")
    assert api_line["request_id"] == response["X-Request-Id"]
    assert api_line["org_id"] == str(cast.org_a.pk)
    assert (api_line["method"], api_line["status"]) == ("GET", 200)
    assert any(line["path"] == "invite/<str:token>/" for line in access)
    assert invite_token not in json_lines.getvalue()


# --- Metrics ----------------------------------------------------------------------------------------------------------


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


@pytest.mark.django_db
def test_metrics_need_the_bearer_token_and_do_not_exist_without_one(client, settings):
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics").status_code == 404
    settings.METRICS_TOKEN = METRICS_TOKEN
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer " + "x" * 40).status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Basic {METRICS_TOKEN}").status_code == 401
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {METRICS_TOKEN}")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")


@pytest.mark.django_db(transaction=True)  # the scrape reads the database from another thread
def test_metrics_count_requests_by_route_and_runs_by_state(cast, client, settings, simulator):  # noqa: F811
    settings.METRICS_TOKEN = METRICS_TOKEN
    settings.RUN_EXECUTOR = "worker"  # runs stay queued
    auth = {"HTTP_AUTHORIZATION": f"Bearer {METRICS_TOKEN}"}
    before = _samples(client.get("/metrics", **auth).content)
    key = sim_key(cast.org_a, cast.admin_a.user, simulator)
    make_run(cast.admin_a, key)
    make_run(cast.admin_a, key)
    cast.admin_a.api().get(f"/api/v1/runs/{secrets.token_hex(4)}")  # a 404: an id never becomes a label
    cast.admin_a.api().get("/api/v1/org")
    after = _samples(client.get("/metrics", **auth).content)

    queued = ("cesaflow_runs", (("kind", "chat"), ("status", "queued")))
    assert after[queued] == before[queued] + 2
    assert after[("cesaflow_run_queue_depth", ())] == before[("cesaflow_run_queue_depth", ())] + 2
    org_route = ("cesaflow_http_requests_total", (("method", "GET"), ("route", "api/v1/org"), ("status", "200")))
    assert after[org_route] == before.get(org_route, 0) + 1
    labels = {value for (_name, pairs) in after for (_label, value) in pairs}
    assert not any(len(value) == 8 and value.isalnum() and value not in ("gateway", "unmatched") for value in labels)
    assert ("cesaflow_active_streams", (("transport", "websocket"),)) in after


@pytest.mark.django_db(transaction=True)  # the gateway's hops use connections of their own
async def test_a_finished_run_and_its_provider_call_are_counted(cast, settings, simulator, async_isolation):  # noqa: F811
    # An async test: the gateway records a run's end in a task of the server's event loop after the answer, and
    # that loop must live on, as a server's does (the sync test client's loop ends with the view, its tasks
    # cancelled).
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    ok_before = value("cesaflow_provider_response_seconds_count", provider="openai", outcome="ok")
    done_before = value("cesaflow_runs_finished_total", kind="completion", status="succeeded")
    key = await sync_to_async(sim_key)(cast.org_a, cast.admin_a.user, simulator)
    response = await AsyncClient().post(
        "/api/v1/chat/completions",
        {"model": f"{key.label}/fake/echo", "messages": [{"role": "user", "content": "hi"}]},
        content_type="application/json",
        headers={"x-api-key": cast.admin_a.api_secret},
    )
    assert response.status_code == 200, response.content
    deadline = time.monotonic() + WAIT_SECONDS
    while value("cesaflow_runs_finished_total", kind="completion", status="succeeded") == done_before:
        assert time.monotonic() < deadline, "the run's end was not counted"
        await asyncio.sleep(0.05)
    assert value("cesaflow_provider_response_seconds_count", provider="openai", outcome="ok") == ok_before + 1


# --- Graceful shutdown ------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_readyz_answers_503_once_the_process_is_shutting_down(client):
    assert client.get("/readyz").status_code == 200
    shutdown.begin()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "shutting_down"


async def _next_sse_event(lines: AsyncIterator[str]) -> dict[str, Any]:
    async for line in lines:
        if line.startswith("data: "):
            event: dict[str, Any] = json.loads(line[6:])
            return event
    raise AssertionError("the stream ended without an event")


async def _closed_with(socket_: WebSocket) -> int:
    while True:
        try:
            await socket_.receive_text()
        except WebSocketClosed as closed:
            return closed.code


async def _shutdown_drill(server: LiveServer, *, run: Run, api_secret: str, model: str) -> dict[str, Any]:
    headers = {"x-api-key": api_secret}
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_SECONDS) as http:
        socket_ = await WebSocket.connect(
            "127.0.0.1", server.port, f"/ws/runs/{run.id}/", headers={"origin": server.url, **headers}
        )
        async with asyncio.timeout(WAIT_SECONDS):
            assert json.loads(await socket_.receive_text())["status"] == "queued"
        async with (
            http.stream("GET", f"/api/v1/runs/{run.id}/events", headers=headers) as sse,
            http.stream(
                "POST",
                "/api/v1/chat/completions",
                headers={"authorization": f"Bearer {api_secret}"},
                json={"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            ) as completion,
        ):
            async with asyncio.timeout(WAIT_SECONDS):
                sse_lines = sse.aiter_lines()
                assert (await _next_sse_event(sse_lines))["type"] == "run.status"
                completion_lines = completion.aiter_lines()
                first = await anext(completion_lines)
                assert first.startswith("data: ")
            server.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT_SECONDS):
                close_code = await _closed_with(socket_)
                sse_event = await _next_sse_event(sse_lines)
                rest = [line async for line in completion_lines]
    return {"close_code": close_code, "sse_event": sse_event, "completion_tail": rest}


@pytest.mark.django_db(transaction=True)
def test_a_stopping_server_closes_streams_with_a_reason_and_finishes_its_completions(
    cast,
    simulator,  # noqa: F811
    tmp_path,
    settings,
):
    settings.RUN_EXECUTOR = "worker"
    key = sim_key(cast.org_a, cast.admin_a.user, simulator)
    run = make_run(cast.admin_a, key)  # stays queued: this server executes nothing (worker mode, no worker)
    env = {"CESAFLOW_EXECUTOR": "worker", "CESAFLOW_RUN_SHUTDOWN_GRACE_SECONDS": "15"}
    with live_server(tmp_path, env) as server:
        seen = asyncio.run(
            _shutdown_drill(server, run=run, api_secret=cast.admin_a.api_secret, model=f"{key.label}/fake/slow")
        )
        server.process.wait(timeout=WAIT_SECONDS)
        assert server.process.returncode is not None

    assert seen["close_code"] == shutdown.CLOSE_TRY_AGAIN_LATER
    assert seen["sse_event"]["type"] == "error"
    assert (seen["sse_event"]["kind"], seen["sse_event"]["retryable"]) == ("server_restarting", True)
    # The completion in flight was not cut: it ran to its end, and its run and usage were recorded.
    assert seen["completion_tail"][-1] == "data: [DONE]" or "data: [DONE]" in seen["completion_tail"]
    completion = Run.objects.get(kind=RunKind.COMPLETION, org=cast.org_a)
    assert completion.status == RunStatus.SUCCEEDED
    assert UsageRecord.objects.filter(run=completion).count() == 1
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED  # closing its watchers never touches the run


def test_a_workers_metrics_listener_needs_the_token_and_serves_this_process():
    from tests.live_server import free_port

    port = free_port()
    server = serve_process_metrics(host="127.0.0.1", port=port, token=METRICS_TOKEN)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer " + "y" * 40}).status_code == 401
        answer = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert answer.status_code == 200
        names = {family.name for family in text_string_to_metric_families(answer.text)}
        assert {"cesaflow_runs_finished", "cesaflow_provider_response_seconds"} <= names
        assert "cesaflow_runs" not in names  # the shared figures are the web processes' to serve
        assert httpx.get(f"http://127.0.0.1:{port}/other").status_code == 404
    finally:
        server.shutdown()
        server.server_close()
