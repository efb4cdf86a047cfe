"""Run stream: how late the first ``text.delta`` of a run reaches a client that watches it (issue #13, point 4).

A chat run started through the REST API is queued until a stream is attached to it (start on attach: the run
calls the provider only once someone receives its events). So the clock starts when the client opens the stream
and stops at its first ``text.delta`` event; that span holds everything CesaFlow adds (authentication, the
snapshot, ``run_attach``, handing the run to an executor, claiming it, opening the key, the provider call, the
channel-layer hop back) plus the simulator's own time to first token, measured directly in the same rounds and
subtracted (percentile minus percentile, as for the proxy). Transports:

* ``sse``: ``POST /api/v1/runs`` (201, not timed), then ``GET /api/v1/runs/<id>/events`` on the same kept-alive
  connection; clock = the GET written.
* ``ws``: the same create, then ``/ws/runs/<id>/`` with the org API key in the handshake; clock = the handshake
  written (after the loopback TCP connect).
* ``sse-create``: ``POST /api/v1/runs`` with ``"stream": true``, creating and streaming in one request (what an
  IDE does); clock = the POST written, so it includes creating the run.

Each stream is read to its ``run.finished`` (so runs never pile up) and must end ``succeeded``. Executors: the
inline one (runs execute in the daphne process that serves the stream) and ``run_worker`` (a separate process,
events through Redis), daphne only: it is the server that also serves websockets.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from bench import measure
from bench.client import RUN_TEXT_RE, Connection, build_request
from bench.harness import SCENARIOS
from bench.measure import Errors, Target, percentile
from bench.plan import rotated
from bench.wsclient import WebSocket, WebSocketClosed, WebSocketError
from deploy.throwaway import HOST

TRANSPORTS = ("sse", "ws", "sse-create")
EXECUTORS = ("inline", "worker")
RUNS_PATH = "/api/v1/runs"
SCENARIO = "fast"  # the sequential TTFT scenario: 10 unpaced tokens
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RunTarget:
    executor: str  # "inline" or "worker"
    port: int
    api_key: str
    provider_key_id: str

    def create(self, *, stream: bool = False) -> bytes:
        body: dict[str, Any] = {
            "provider_key": self.provider_key_id,
            "model": f"fake/{SCENARIOS[SCENARIO]['name']}",
            "objective": "Say something.",
        }
        if stream:
            body["stream"] = True
        raw = json.dumps(body, separators=(",", ":")).encode()
        # Accept decides too: `text/event-stream` alone would make the create answer with the stream.
        accept = "text/event-stream" if stream else "application/json"
        return build_request("POST", HOST, self.port, RUNS_PATH, token=self.api_key, body=raw, accept=accept)

    def events(self, run_id: str) -> bytes:
        return build_request("GET", HOST, self.port, f"{RUNS_PATH}/{run_id}/events", token=self.api_key)


@dataclass
class Samples:
    first_event: list[float] = field(default_factory=list)  # stream opened -> its first event (the snapshot)
    first_text: list[float] = field(default_factory=list)  # stream opened -> first text.delta
    # Websocket only (its events are parsed): stream opened -> the executor's run.status "running" (seq >= 1),
    # which splits the span into handing the run over and the provider call up to its first words.
    running: list[float] = field(default_factory=list)
    errors: Errors = field(default_factory=Errors)

    def add(
        self,
        opened_at: float,
        first_event_at: float | None,
        first_text_at: float | None,
        running_at: float | None = None,
    ) -> None:
        if first_event_at is None or first_text_at is None:
            self.errors.note("stream without a text.delta")
            return
        self.first_event.append(first_event_at - opened_at)
        self.first_text.append(first_text_at - opened_at)
        if running_at is not None:
            self.running.append(running_at - opened_at)


async def _create(connection: Connection, target: RunTarget, errors: Errors) -> str | None:
    response = await connection.request(target.create(), timeout=TIMEOUT_S)
    if response.status != 201 or response.error:
        errors.add(response)
        return None
    run_id: str = json.loads(response.body)["id"]
    return run_id


async def _sse(connection: Connection, target: RunTarget, samples: Samples, *, create_in_stream: bool) -> None:
    if create_in_stream:
        raw = target.create(stream=True)
    else:
        run_id = await _create(connection, target, samples.errors)
        if run_id is None:
            return
        raw = target.events(run_id)
    response = await connection.request(raw, timeout=TIMEOUT_S, content_re=RUN_TEXT_RE)
    if not response.ok:
        samples.errors.add(response)
        return
    samples.add(response.sent_at, response.first_event_at, response.first_content_at)


async def _ws(connection: Connection, target: RunTarget, samples: Samples) -> None:
    run_id = await _create(connection, target, samples.errors)
    if run_id is None:
        return
    headers = {"authorization": f"Bearer {target.api_key}", "origin": f"http://{HOST}:{target.port}"}
    first_event_at: float | None = None
    first_text_at: float | None = None
    running_at: float | None = None
    status = ""
    try:
        async with asyncio.timeout(TIMEOUT_S):
            socket = await WebSocket.connect(HOST, target.port, f"/ws/runs/{run_id}/", headers=headers)
            try:
                while True:
                    text = await socket.receive_text()
                    now = time.perf_counter()
                    first_event_at = first_event_at or now
                    event = json.loads(text)
                    kind = event.get("type")
                    if kind == "text.delta" and first_text_at is None:
                        first_text_at = now
                    # The executor's own (seq >= 1): a run claimed as the socket attached is already running in
                    # the snapshot (seq 0).
                    running = kind == "run.status" and event.get("status") == "running" and event.get("seq", 0) >= 1
                    if running and running_at is None:
                        running_at = now
                    if event.get("type") == "run.finished":
                        status = str(event.get("status"))
                        break
            finally:
                await socket.close()
    except (TimeoutError, WebSocketError, WebSocketClosed, OSError, ValueError) as exc:
        samples.errors.note(f"websocket: {type(exc).__name__}: {exc}")
        return
    if status != "succeeded":
        samples.errors.note(f"run ended {status!r}")
        return
    samples.add(socket.handshake_sent_at, first_event_at, first_text_at, running_at)


async def one_run(connection: Connection, target: RunTarget, transport: str, samples: Samples) -> None:
    if transport == "ws":
        await _ws(connection, target, samples)
    else:
        await _sse(connection, target, samples, create_in_stream=transport == "sse-create")


@dataclass
class ExecutorResult:
    samples: dict[str, Samples]  # transport -> samples
    direct_ttft: list[float]  # the simulator reached directly, same rounds
    direct_errors: Errors
    warm_up_errors: Errors


async def measure_executor(target: RunTarget, direct: Target, *, rounds: int, samples_per_round: int) -> ExecutorResult:
    """Every transport ``samples_per_round`` runs back to back, interleaved round by round with the simulator
    reached directly (the TTFT that is subtracted)."""
    connection = Connection(HOST, target.port)
    result = ExecutorResult({transport: Samples() for transport in TRANSPORTS}, [], Errors(), Errors())
    warm = Samples(errors=result.warm_up_errors)
    for transport in TRANSPORTS:  # imports, pools, the executor's first claim: not measured
        for _ in range(2):
            await one_run(connection, target, transport, warm)
    for round_no in range(rounds):
        for item in rotated(["direct", *TRANSPORTS], round_no):
            if item == "direct":
                seq = await measure.sequential(direct, samples_per_round)
                result.direct_ttft += seq.ttft
                result.direct_errors.count += seq.errors.count
                result.direct_errors.examples = (result.direct_errors.examples + seq.errors.examples)[:3]
                continue
            for _ in range(samples_per_round):
                await one_run(connection, target, item, result.samples[item])
    connection.close()
    return result


def figures(executor: str, result: ExecutorResult) -> dict[str, dict[str, float]]:
    """metric -> ``<executor>-<transport>`` (or ``direct-<executor>``) -> milliseconds."""
    out: dict[str, dict[str, float]] = {}
    results, direct_ttft = result.samples, result.direct_ttft

    def put(metric: str, name: str, value: float) -> None:
        out.setdefault(metric, {})[name] = value * 1000

    for q in (50, 95):
        if direct_ttft:
            put(f"run_direct_ttft_p{q}", f"direct-{executor}", percentile(direct_ttft, q))
        for transport, samples in results.items():
            name = f"{executor}-{transport}"
            if not samples.first_text:
                continue
            put(f"run_first_text_p{q}", name, percentile(samples.first_text, q))
            put(f"run_first_event_p{q}", name, percentile(samples.first_event, q))
            between = [t - e for t, e in zip(samples.first_text, samples.first_event, strict=True)]
            put(f"run_event_to_text_p{q}", name, percentile(between, q))
            if len(samples.running) == len(samples.first_text):
                handover = [r - e for r, e in zip(samples.running, samples.first_event, strict=True)]
                put(f"run_event_to_running_p{q}", name, percentile(handover, q))
            if direct_ttft:
                put(f"run_added_p{q}", name, percentile(samples.first_text, q) - percentile(direct_ttft, q))
    return out
