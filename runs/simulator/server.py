"""The provider simulator: a raw asyncio HTTP/1.1 server speaking the OpenAI, Groq and Anthropic dialects.

Hand-written framing gives byte-level control: each SSE event is one HTTP chunk (or 2-3 chunks cut at arbitrary
byte offsets), the writer is drained after each, an *abort* closes the socket without the terminating chunk and a
*truncate* ends the body cleanly without the terminal event. Framework servers buffer or always finish the body,
which would hide exactly the faults clients must survive. Loopback only, by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from runs.simulator.dialects import (
    StreamContext,
    build_turn,
    dumps,
    error_body,
    mask_key,
    midstream_error_event,
    ping_event,
    preset_for_status,
    render_json,
    render_stream,
)
from runs.simulator.http1 import (
    LAST_CHUNK,
    MAX_HEADER_BYTES,
    STATUS_TEXT,
    BadFraming,
    ClientGone,
    Connection,
    Request,
    chunk,
    split_points,
)
from runs.simulator.scenarios import BUILTINS, FLAVOURS, Scenario, ScenarioError, parse_scenario
from runs.simulator.validation import (
    Invalid,
    api_key,
    check_anthropic_body,
    check_anthropic_version,
    check_auth,
    check_openai_body,
)

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
MAX_LOGGED_REQUESTS = 200

# path prefix -> flavour; the base URL a client configures is prefix + the provider's own base path.
_PREFIXES = (("/groq/openai/v1", "groq"), ("/openai/v1", "openai"), ("/anthropic", "anthropic"))
_CHAT_PATHS = {"openai": "/chat/completions", "groq": "/chat/completions", "anthropic": "/v1/messages"}
_MODELS_PATHS = {"openai": "/models", "groq": "/models", "anthropic": "/v1/models"}


@dataclass
class SimulatorState:
    """Queues, named scenarios and the request log. Thread-safe: the pytest fixture calls it from another thread."""

    record_requests: bool = False
    groq_reject_stream_options: bool = False
    scenarios: dict[str, Scenario] = field(default_factory=lambda: dict(BUILTINS))
    _queue: list[tuple[str, Scenario]] = field(default_factory=list)
    _log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_LOGGED_REQUESTS))
    _counter: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next_id(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def enqueue(self, flavour: str, documents: Iterable[Any]) -> int:
        if flavour not in (*FLAVOURS, "any"):
            raise ScenarioError("'flavour' must be openai, groq, anthropic or any.")
        parsed = [parse_scenario(document, registry=self.scenarios) for document in documents]
        with self._lock:
            self._queue.extend((flavour, scenario) for scenario in parsed)
        return len(parsed)

    def take(self, *, flavour: str, model: str | None, endpoint: str) -> Scenario | None:
        with self._lock:
            for position, (queued_for, scenario) in enumerate(self._queue):
                if queued_for in ("any", flavour) and scenario.matches(flavour=flavour, model=model, endpoint=endpoint):
                    del self._queue[position]
                    return scenario
        return None

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self._log.clear()

    def log(self, entry: dict[str, Any]) -> None:
        if self.record_requests:
            with self._lock:
                self._log.append(entry)

    def update(self, entry: dict[str, Any], **changes: Any) -> None:
        with self._lock:
            entry.update(changes)

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._log))


def _masked_headers(headers: dict[str, str]) -> dict[str, str]:
    masked = dict(headers)
    if "authorization" in masked:
        scheme, _, credential = masked["authorization"].partition(" ")
        masked["authorization"] = f"{scheme} {mask_key(credential.strip())}" if credential else mask_key(scheme)
    if "x-api-key" in masked:
        masked["x-api-key"] = mask_key(masked["x-api-key"])
    return masked


def _display_name(model_id: str) -> str:
    return "Fake Claude" if model_id == "fake-claude" else f"Fake: {model_id[5:]}"


class ProviderSimulator:
    """Start with ``await start()``; ``base_urls`` then names the three flavours' base URLs."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        scenarios: Iterable[Scenario] = (),
        record_requests: bool = False,
        groq_reject_stream_options: bool = False,
    ) -> None:
        if host not in LOOPBACK_HOSTS:
            raise ValueError("The provider simulator binds loopback only (127.0.0.1, ::1 or localhost).")
        self.host = host
        self.port = port
        self.state = SimulatorState(
            record_requests=record_requests, groq_reject_stream_options=groq_reject_stream_options
        )
        for scenario in scenarios:
            self.state.scenarios[scenario.name] = scenario
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_urls(self) -> dict[str, str]:
        return {
            "openai": f"{self.base_url}/openai/v1",
            "groq": f"{self.base_url}/groq/openai/v1",
            "anthropic": f"{self.base_url}/anthropic",
        }

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEADER_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None  # noqa: S101 - start() sets it
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # --- Connection loop ------------------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        connection = Connection(reader, writer)
        try:
            while True:
                try:
                    request = await connection.read_request()
                except BadFraming as exc:
                    await self._send_json(connection, exc.status, {"error": {"message": str(exc)}}, keep_alive=False)
                    break
                if request is None:
                    break
                keep_alive = await self._dispatch(connection, request)
                if not keep_alive or not request.keep_alive:
                    break
        except (ClientGone, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            connection.aborted = True
            writer.transport.abort()
            raise
        finally:
            if task is not None:
                self._tasks.discard(task)
            if not connection.aborted:
                writer.close()

    async def _send_json(
        self,
        connection: Connection,
        status: int,
        body: Any,
        *,
        headers: dict[str, str] | None = None,
        keep_alive: bool = True,
    ) -> None:
        payload = body if isinstance(body, bytes) else dumps(body).encode()
        lines = [
            f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Error')}",
            "content-type: application/json",
            f"content-length: {len(payload)}",
            f"connection: {'keep-alive' if keep_alive else 'close'}",
        ]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        await connection.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)

    async def _dispatch(self, connection: Connection, request: Request) -> bool:
        if request.path.startswith("/_fake/"):
            return await self._control(connection, request)
        for prefix, flavour in _PREFIXES:
            if request.path == prefix or request.path.startswith(prefix + "/"):
                return await self._provider(connection, request, flavour, request.path[len(prefix) :])
        body = error_body("openai", "not_found", request_id="", message=f"Unknown path {request.path[:100]}.")
        await self._send_json(connection, 404, body)
        return True

    # --- Control API ----------------------------------------------------------------------------------------------

    async def _control(self, connection: Connection, request: Request) -> bool:
        routes = {
            "/_fake/scenarios": "POST",
            "/_fake/reset": "POST",
            "/_fake/config": "POST",
            "/_fake/requests": "GET",
            "/_fake/health": "GET",
        }
        if request.path not in routes:
            await self._send_json(connection, 404, {"error": {"message": "Unknown control endpoint."}})
            return True
        if request.method != routes[request.path]:
            await self._send_json(connection, 405, {"error": {"message": "Method not allowed."}})
            return True
        state = self.state
        try:
            document = json.loads(request.body) if request.body else {}
        except ValueError:
            await self._send_json(connection, 400, {"error": {"message": "The body is not valid JSON."}})
            return True
        if request.path == "/_fake/health":
            await self._send_json(connection, 200, {"status": "ok", "scenarios": sorted(state.scenarios)})
        elif request.path == "/_fake/reset":
            state.reset()
            await self._send_json(connection, 200, {"ok": True})
        elif request.path == "/_fake/requests":
            if not state.record_requests:
                message = "The request log is disabled (start the simulator with --record-requests)."
                await self._send_json(connection, 404, {"error": {"message": message}})
            else:
                await self._send_json(connection, 200, {"requests": state.requests()})
        elif request.path == "/_fake/config":
            if isinstance(document, dict) and isinstance(document.get("groq_reject_stream_options"), bool):
                state.groq_reject_stream_options = document["groq_reject_stream_options"]
            await self._send_json(connection, 200, {"groq_reject_stream_options": state.groq_reject_stream_options})
        else:
            scenarios = document.get("scenarios") if isinstance(document, dict) else None
            flavour = document.get("flavour", "any") if isinstance(document, dict) else "any"
            if not isinstance(scenarios, list):
                await self._send_json(connection, 400, {"error": {"message": "'scenarios' must be a list."}})
                return True
            try:
                queued = state.enqueue(str(flavour), scenarios)
            except ScenarioError as exc:
                await self._send_json(connection, 400, {"error": {"message": str(exc)}})
                return True
            await self._send_json(connection, 200, {"queued": queued})
        return True

    # --- Provider endpoints ---------------------------------------------------------------------------------------

    async def _provider(self, connection: Connection, request: Request, flavour: str, subpath: str) -> bool:
        number = self.state.next_id()
        request_id = f"req_fake_{number}"
        id_header = {"request-id" if flavour == "anthropic" else "x-request-id": request_id}
        try:
            parsed_body = json.loads(request.body) if request.body else None
        except ValueError:
            parsed_body = None
        entry: dict[str, Any] = {
            "id": number,
            "method": request.method,
            "path": request.path,
            "connection": connection.peer,
            "flavour": flavour,
            "headers": _masked_headers(request.headers),
            "body": parsed_body,
            "scenario": None,
            "status": None,
            "stream": False,
            "events_sent": 0,
            "completed": False,
            "client_closed": False,
        }
        self.state.log(entry)
        key = api_key(flavour, request.headers)

        async def fail(status: int, preset: str, *, message: str | None = None, param: str | None = None) -> bool:
            body = error_body(
                flavour,
                preset,
                request_id=request_id,
                masked_key=mask_key(key),
                model=str((parsed_body or {}).get("model", "")) if isinstance(parsed_body, dict) else "",
                message=message,
                param=param,
            )
            self.state.update(entry, status=status, completed=True)
            await self._send_json(connection, status, body, headers=id_header)
            return True

        if subpath == _CHAT_PATHS[flavour]:
            endpoint, method = "chat", "POST"
        elif subpath == _MODELS_PATHS[flavour]:
            endpoint, method = "models", "GET"
        else:
            return await fail(404, "not_found", message=f"Unknown path {request.path[:100]}.")
        if request.method != method:
            return await fail(405, "bad_request", message=f"Method {request.method[:10]} not allowed.")

        invalid: Invalid | None = check_auth(key)
        if invalid is None and flavour == "anthropic":
            invalid = check_anthropic_version(request.headers)
        if invalid is None and endpoint == "chat":
            if parsed_body is None:
                invalid = Invalid(400, "bad_request", "We could not parse the JSON body of your request.")
            elif flavour == "anthropic":
                invalid = check_anthropic_body(parsed_body, request.headers.get("anthropic-version", ""))
            else:
                invalid = check_openai_body(parsed_body)
                groq_strict = flavour == "groq" and self.state.groq_reject_stream_options
                if invalid is None and groq_strict and "stream_options" in parsed_body:
                    message = "property 'stream_options' is unsupported, did you mean 'stream'?"
                    invalid = Invalid(400, "bad_request", message)
        if invalid is not None:
            return await fail(invalid.status, invalid.preset, message=invalid.message, param=invalid.param)

        body: dict[str, Any] = parsed_body if isinstance(parsed_body, dict) else {}
        model = body.get("model") if isinstance(body.get("model"), str) else None
        scenario = self.state.take(flavour=flavour, model=model, endpoint=endpoint)
        if scenario is None and endpoint == "chat" and model and model.startswith("fake/"):
            scenario = self.state.scenarios.get(model[5:])
            if scenario is None:
                return await fail(404, "not_found")
        if scenario is None and key.startswith("fake") and ":" in key:
            scenario = self.state.scenarios.get(key.rsplit(":", 1)[1])
        if scenario is None and endpoint == "chat":
            scenario = self.state.scenarios["echo"]
        self.state.update(entry, scenario=scenario.name if scenario else None)

        fault = scenario.fault if scenario else None
        if fault is not None and fault["type"] == "http":
            return await self._http_fault(connection, flavour, fault, key, model or "", request_id, entry)
        if fault is not None and fault["type"] == "disconnect" and (endpoint == "models" or not body.get("stream")):
            connection.aborted = True
            connection.writer.transport.abort()
            return False

        if endpoint == "models":
            return await self._models(connection, flavour, request, id_header, entry)
        assert scenario is not None  # noqa: S101 - chat always falls back to echo
        turn = build_turn(scenario, flavour, body)
        include_usage = flavour == "anthropic" or bool((body.get("stream_options") or {}).get("include_usage"))
        ctx = StreamContext(
            flavour=flavour,
            model=model or "",
            completion_id=f"msg_fake_{number}" if flavour == "anthropic" else f"chatcmpl-fake-{number}",
            groq_id=request_id,
            include_usage=include_usage,
        )
        if body.get("stream") is not True:
            if fault is not None and fault["type"] in ("stall", "stall_with_pings"):
                await connection.pause(int(fault.get("stall_ms", 0)))
            self.state.update(entry, status=200, completed=True)
            await self._send_json(connection, 200, render_json(turn, ctx), headers=id_header)
            return True
        self.state.update(entry, status=200, stream=True)
        return await self._stream(connection, flavour, scenario, render_stream(turn, scenario, ctx), id_header, entry)

    async def _http_fault(
        self,
        connection: Connection,
        flavour: str,
        fault: dict[str, Any],
        key: str,
        model: str,
        request_id: str,
        entry: dict[str, Any],
    ) -> bool:
        status = int(fault.get("status") or 500)
        headers = {"request-id" if flavour == "anthropic" else "x-request-id": request_id}
        if fault.get("retry_after_s") is not None:
            value = float(fault["retry_after_s"])
            headers["retry-after"] = str(int(value)) if value.is_integer() else str(value)
        if status == 429:
            remaining = (
                "anthropic-ratelimit-requests-remaining" if flavour == "anthropic" else "x-ratelimit-remaining-requests"
            )
            headers[remaining] = "0"
        headers.update({str(k).lower(): str(v) for k, v in (fault.get("headers") or {}).items()})
        custom = fault.get("body")
        if custom is not None:
            # "{{api_key}}" echoes the caller's full key: leak tests need a provider that does that.
            text = custom if isinstance(custom, str) else dumps(custom)
            payload: Any = text.replace("{{api_key}}", key).encode()
        else:
            preset = fault.get("error") or preset_for_status(status)
            payload = error_body(flavour, preset, request_id=request_id, masked_key=mask_key(key), model=model)
        self.state.update(entry, status=status, completed=True)
        await self._send_json(connection, status, payload, headers=headers)
        return True

    async def _models(
        self,
        connection: Connection,
        flavour: str,
        request: Request,
        headers: dict[str, str],
        entry: dict[str, Any],
    ) -> bool:
        # The fixed model (§3.3.6) first, then one per scenario, so a demo's model picker offers the behaviours.
        names = sorted(self.state.scenarios)
        if flavour == "anthropic":
            ids = ["fake-claude", *(f"fake/{n}" for n in names)]
            try:
                limit = max(1, min(1000, int(request.query.get("limit", ["20"])[0])))
            except ValueError:
                limit = 20
            page = [
                {
                    "type": "model",
                    "id": i,
                    "display_name": _display_name(i),
                    "created_at": "2025-01-01T00:00:00Z",
                }
                for i in ids[:limit]
            ]
            body: dict[str, Any] = {
                "data": page,
                "has_more": len(ids) > limit,
                "first_id": page[0]["id"],
                "last_id": page[-1]["id"],
            }
        else:
            ids = ["fake-model", *(f"fake/{n}" for n in names)]
            body = {
                "object": "list",
                "data": [{"id": i, "object": "model", "created": 0, "owned_by": "fake"} for i in ids],
            }
        self.state.update(entry, status=200, completed=True)
        await self._send_json(connection, 200, body, headers=headers)
        return True

    async def _stream(
        self,
        connection: Connection,
        flavour: str,
        scenario: Scenario,
        events: list[str],
        headers: dict[str, str],
        entry: dict[str, Any],
    ) -> bool:
        head = [
            "HTTP/1.1 200 OK",
            "content-type: text/event-stream; charset=utf-8",
            "cache-control: no-cache",
            "transfer-encoding: chunked",
            "connection: keep-alive",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        fault = scenario.fault
        # Stream faults fire before event K; never after the last one, so the terminal event is always withheld.
        fault_at = min(int(fault.get("after_events", 0)), len(events) - 1) if fault else -1
        ping_every = scenario.timing_ms("ping_every_ms") if flavour == "anthropic" else 0
        split = bool(scenario.shape("split_events", False))
        crlf = bool(scenario.shape("crlf", False))
        comments = bool(scenario.shape("comments", False))
        watcher = asyncio.create_task(connection.watch_eof())
        try:
            await connection.write(("\r\n".join(head) + "\r\n\r\n").encode())
            await self._wait(connection, flavour, scenario.timing_ms("first_token_ms"), ping_every)
            for index, event in enumerate(events):
                if index == fault_at and fault is not None:
                    outcome = await self._stream_fault(connection, flavour, fault, entry)
                    if outcome is not None:
                        return outcome
                text = f": keep-alive\n{event}" if comments and index % 3 == 0 else event
                raw = (text.replace("\n", "\r\n") if crlf else text).encode()
                if split:
                    cuts = [0, *split_points(raw), len(raw)]
                    for start, end in itertools.pairwise(cuts):
                        await connection.write(chunk(raw[start:end]))
                else:
                    await connection.write(chunk(raw))
                self.state.update(entry, events_sent=index + 1)
                if index < len(events) - 1:
                    await self._wait(connection, flavour, scenario.timing_ms("per_event_ms"), ping_every)
            await connection.pause(scenario.timing_ms("body_end_ms"))
            await connection.write(LAST_CHUNK)
            self.state.update(entry, completed=True)
            return True
        except ClientGone:
            self.state.update(entry, client_closed=True)
            return False
        finally:
            # Await the cancelled watcher: while it is still parked in read(), the next request on this
            # kept-alive connection would fail with "read() called while another coroutine is waiting".
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if connection.closed.is_set():
                self.state.update(entry, client_closed=True)

    async def _wait(self, connection: Connection, flavour: str, ms: int, ping_every_ms: int) -> None:
        """Pause ``ms``; with ``ping_every_ms``, keep-alives go out meanwhile (Anthropic ping events)."""
        if ping_every_ms <= 0 or ms < ping_every_ms:
            await connection.pause(ms)
            return
        remaining = ms
        while remaining > 0:
            step = min(ping_every_ms, remaining)
            await connection.pause(step)
            remaining -= step
            if remaining > 0:
                await connection.write(chunk(ping_event(flavour).encode()))

    async def _stream_fault(
        self, connection: Connection, flavour: str, fault: dict[str, Any], entry: dict[str, Any]
    ) -> bool | None:
        """Apply a stream fault. Returns keep-alive for faults that end the response, None to carry on."""
        kind = fault["type"]
        if kind == "disconnect":
            # Abort: RST / close without the terminating chunk (httpx: "incomplete chunked read").
            connection.aborted = True
            connection.writer.transport.abort()
            self.state.update(entry, completed=False)
            return False
        if kind == "truncate":
            # Clean end of body, but no [DONE] / message_stop: the SDKs accept this silently.
            await connection.write(LAST_CHUNK)
            return True
        if kind == "midstream_error":
            preset = fault.get("error") or ("overloaded" if flavour == "anthropic" else "server")
            event = midstream_error_event(flavour, preset, request_id=f"req_fake_{entry['id']}")
            await connection.write(chunk(event.encode()))
            await connection.write(LAST_CHUNK)
            return True
        stall_ms = int(fault.get("stall_ms", 0))
        if kind == "stall_with_pings":
            await self._wait(connection, flavour, stall_ms, max(1, int(fault.get("ping_every_ms", 1000))))
        else:
            await connection.pause(stall_ms)
        return None
