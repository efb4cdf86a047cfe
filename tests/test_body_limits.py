"""Request bodies (issue #14, point 3): each route's limit is counted as the bytes arrive, 413 comes before more is
read, and nothing of a body is ever written to disk.

Through the real server (``python -m cesaflow.serve``, a subprocess on loopback with a TMPDIR of its own): chunked
bodies carrying a canary are cut in flight, a declared Content-Length over the limit is refused before any body is
sent, every route class has its own limit and answer shape, a body just under the limit is served, and websockets
still connect. Through the ASGI application called directly: the same limits by the middleware other ASGI servers
rely on.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import select
import socket
import stat
import struct
import tempfile
import termios
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator

from bench.wsclient import WebSocket
from cesaflow.asgi import application
from cesaflow.lib.body_limit import describe_size
from runs.models import Run, RunStatus
from runs.proxy.errors import ProxyError
from runs.proxy.request import max_body_bytes, parse_json_body
from tests.disk_traces import files_holding, holds
from tests.live_server import LiveServer, live_server
from tests.runs.conftest import simulator, simulator_server  # noqa: F401 - fixtures, used below
from tests.runs.test_execution_support import async_isolation, make_run, sim_key  # noqa: F401 - a fixture too

MIB = 1024 * 1024
# The server runs with a limit of its own for each route class, so a test can tell which one applied.
PAGE_LIMIT = MIB  # DATA_UPLOAD_MAX_MEMORY_SIZE; not configurable
API_LIMIT = 768 * 1024
GATEWAY_LIMIT = 2 * MIB  # the default
WEBHOOK_LIMIT = 512 * 1024
SERVER_ENV = {
    "CESAFLOW_API_MAX_BODY_BYTES": str(API_LIMIT),
    "CESAFLOW_WEBHOOK_MAX_BODY_BYTES": str(WEBHOOK_LIMIT),
    "CESAFLOW_EXECUTOR": "worker",  # runs stay queued: nothing executes behind the tests' backs
}
PIECE_BYTES = 64 * 1024
WAIT_SECONDS = 10.0  # a deadline for what must happen, never an expected duration


@dataclass(frozen=True)
class Route:
    name: str
    path: str
    limit: int
    content_type: str
    shape: str  # "page", "api" (the one API error shape) or "openai"
    status_at_limit: int  # the application's own answer to a body of exactly the limit (no credentials)


ROUTES = [
    Route("page", "/login/", PAGE_LIMIT, "application/x-www-form-urlencoded", "page", 403),
    Route("api", "/api/v1/runs", API_LIMIT, "application/json", "api", 401),
    Route("gateway", "/api/v1/chat/completions", GATEWAY_LIMIT, "application/json", "openai", 401),
    Route("webhook", f"/hooks/github/{uuid.uuid4()}/", WEBHOOK_LIMIT, "application/json", "api", 401),
]
BY_NAME = {route.name: route for route in ROUTES}


@pytest.fixture(scope="module")
def server(django_db_setup, tmp_path_factory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("body-limits"), SERVER_ENV) as running:
        yield running


# --- A raw HTTP/1.1 client: how the body is sent is the point -------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_head: bytes


def _connect(server: LiveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_SECONDS)


def _head(route_path: str, content_type: str, **headers: str) -> bytes:
    lines = [f"POST {route_path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _read_answer(sock: socket.socket) -> Answer:
    """The whole response, read to the end of the stream: returns only once the server has closed the connection
    (a socket timeout fails the test)."""
    sock.settimeout(WAIT_SECONDS)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return Answer(int(status_line.split()[1]), headers, body, head)


def _dechunk(data: bytes) -> bytes:
    body = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body
        body, data = body + data[:size], data[size + 2 :]


def _wait_until_delivered(sock: socket.socket) -> None:
    """Until everything written to ``sock`` has reached the server (nothing left unacknowledged in our queue)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]:
        assert time.monotonic() < deadline, "the server stopped reading the body"
        time.sleep(0.01)


def _assert_too_large(answer: Answer, route: Route) -> None:
    assert answer.status == 413, answer.raw_head
    assert answer.headers["connection"] == "close"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["content-length"] == str(len(answer.body))
    _assert_shape(answer.headers["content-type"], answer.body, route)


def _assert_shape(content_type: str, body: bytes, route: Route) -> None:
    """The 413 body in the route's shape, naming the route's own limit."""
    size = describe_size(route.limit)
    if route.shape == "page":
        assert content_type == "text/html; charset=utf-8"
        assert b"<h1>413</h1>" in body
        assert size.encode() in body
        return
    assert content_type == "application/json"
    error = json.loads(body)["error"]
    if route.shape == "openai":
        # OpenAI's shape, which the SDKs parse: message, type, param, code.
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    else:
        assert set(error) == {"code", "message", "details"}
        assert error["code"] == "request_too_large"
    assert size in error["message"]


# --- What is on disk ----------------------------------------------------------------------------------------------


def _temp_roots(server: LiveServer) -> list[Path]:
    roots = {Path(tempfile.gettempdir()), Path("/tmp"), Path("/var/tmp"), server.tmpdir}  # noqa: S108 - scanned
    return [root.resolve() for root in roots if root.exists()]


def _disk_traces(server: LiveServer, canary: bytes, since: float) -> list[str]:
    """Every trace of a body on disk: a file in a temp directory holding the canary (written since the test began),
    and any file the server process holds open in a temp directory, deleted (an anonymous temporary file), or
    holding the canary."""
    roots = _temp_roots(server)
    traces = [f"file holding the canary: {path}" for path in files_holding(canary, roots, since=since)]
    fd_dir = Path(f"/proc/{server.pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
            if not stat.S_ISREG(os.stat(fd).st_mode):
                continue
        except OSError:
            continue  # closed meanwhile
        if holds(str(fd), canary):
            traces.append(f"open file holding the canary: {target}")
        elif target.endswith(" (deleted)"):
            traces.append(f"open deleted file: {target}")
        elif target != str(server.log) and any(Path(target).is_relative_to(root) for root in roots):
            traces.append(f"open temporary file: {target}")
    return traces


# --- Through the server ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["page", "api", "gateway"])
def test_a_chunked_body_is_cut_in_flight_at_the_limit_and_never_touches_disk(server, name):
    route = BY_NAME[name]
    canary = f"CANARYbody{secrets.token_hex(12)}".encode()
    piece = (canary + b"&") * (PIECE_BYTES // (len(canary) + 1))
    planned = 4 * route.limit
    since = time.time() - 1
    with _connect(server) as sock:
        sock.sendall(_head(route.path, route.content_type, Transfer_Encoding="chunked"))
        sent = 0
        checked_in_flight = False
        while sent < planned:
            sock.sendall(_chunk(piece))
            sent += len(piece)
            if not checked_in_flight and sent >= route.limit // 2:
                # Half the limit is with the server, the rest not sent yet: still nothing on disk.
                _wait_until_delivered(sock)
                assert _disk_traces(server, canary, since) == []
                checked_in_flight = True
            if sent > route.limit:
                # The piece that passed the limit must be answered before we send another.
                readable, _, _ = select.select([sock], [], [], WAIT_SECONDS)
                assert readable, f"no answer although {sent} bytes passed the {route.limit}-byte limit"
                break
        answer = _read_answer(sock)  # to the end of the stream: the server closed the connection
    assert sent <= route.limit + len(piece) < planned
    _assert_too_large(answer, route)
    assert canary not in answer.body
    assert _disk_traces(server, canary, since) == []
    assert canary not in server.log.read_bytes()


@pytest.mark.parametrize("route", ROUTES, ids=[route.name for route in ROUTES])
def test_each_route_refuses_a_declared_length_over_its_own_limit_unread(server, route):
    """Each route class has its own limit (the API's below the pages', the gateway's above it, the webhooks' their
    own) and its own answer shape. Over it, the 413 comes with no body byte sent; at it, the application answers."""
    with _connect(server) as sock:
        sock.sendall(_head(route.path, route.content_type, Content_Length=str(route.limit + 1), Expect="100-continue"))
        answer = _read_answer(sock)  # no body byte was ever sent
    assert b"100 Continue" not in answer.raw_head  # nor invited
    _assert_too_large(answer, route)

    with _connect(server) as sock:
        sock.sendall(_head(route.path, route.content_type, Content_Length=str(route.limit)) + b" " * route.limit)
        answer = _read_answer(sock)
    assert answer.status == route.status_at_limit, answer.raw_head


@pytest.mark.parametrize("route", ROUTES, ids=[route.name for route in ROUTES])
def test_the_server_leaves_a_post_body_to_the_application_whatever_its_content_type(server, route):
    """Left to itself, Twisted parses the form fields of a POST body (``request.args``, which daphne never reads) and
    answers a body declared ``multipart/form-data`` that is not one with a bare 400 before the application sees it.
    The server leaves every body to the application, which answers in the route's own shape."""
    body = b"no boundary here"  # Twisted's parser: "Not a multipart."
    with _connect(server) as sock:
        sock.sendall(_head(route.path, "multipart/form-data; boundary=zz", Content_Length=str(len(body))) + body)
        answer = _read_answer(sock)
    # No CSRF cookie (the page), no credentials (the API, the gateway), not JSON (a webhook): each its own answer.
    expected = {"page": 403, "api": 401, "gateway": 401, "webhook": 415}[route.name]
    assert answer.status == expected, answer.raw_head
    assert answer.headers["x-content-type-options"] == "nosniff"  # the application's headers, not Twisted's
    if route.shape != "page":
        assert answer.headers["content-type"] == "application/json"
        assert set(json.loads(answer.body)["error"]) >= {"code", "message"}


@pytest.mark.django_db(transaction=True)
def test_a_completion_just_under_the_gateway_limit_is_served_from_memory(server, cast, simulator):  # noqa: F811
    sim_key(cast.org_a, cast.admin_a.user, simulator, label="sim")
    canary = f"CANARYprompt{secrets.token_hex(12)}"
    since = time.time() - 1
    message = {"role": "user", "content": ""}
    envelope: dict[str, Any] = {"model": "sim/fake/echo", "max_tokens": 16, "messages": [message]}
    size = GATEWAY_LIMIT - len(json.dumps(envelope)) - 64
    message["content"] = (canary + " ") * (size // (len(canary) + 1))
    body = json.dumps(envelope).encode()
    assert GATEWAY_LIMIT - 100 < len(body) <= GATEWAY_LIMIT
    with _connect(server) as sock:
        head = _head(
            BY_NAME["gateway"].path,
            "application/json",
            Transfer_Encoding="chunked",
            Authorization=f"Bearer {cast.admin_a.api_secret}",
        )
        sock.sendall(head + b"".join(_chunk(body[i : i + PIECE_BYTES]) for i in range(0, len(body), PIECE_BYTES)))
        _wait_until_delivered(sock)
        # The whole prompt is with the server, its end not yet: it is held in memory only.
        assert _disk_traces(server, canary.encode(), since) == []
        sock.sendall(b"0\r\n\r\n")
        answer = _read_answer(sock)
    assert answer.status == 200, answer.raw_head
    completion = json.loads(answer.body)
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"]
    assert _disk_traces(server, canary.encode(), since) == []
    # The server records the call's end just after its answer: wait for it (the test's teardown empties the tables).
    deadline = time.monotonic() + WAIT_SECONDS
    while not Run.objects.filter(id=completion["id"].removeprefix("chatcmpl-"), status=RunStatus.SUCCEEDED).exists():
        assert time.monotonic() < deadline, "the completion's run end was not recorded"
        time.sleep(0.02)


@pytest.mark.django_db(transaction=True)
def test_a_run_websocket_connects_through_the_server(server, cast, simulator, settings):  # noqa: F811
    settings.RUN_EXECUTOR = "worker"  # the run stays queued
    run = make_run(cast.admin_a, sim_key(cast.org_a, cast.admin_a.user, simulator))

    async def first_message() -> dict[str, Any]:
        headers = {"origin": server.url, "x-api-key": cast.admin_a.api_secret}
        socket_ = await WebSocket.connect("127.0.0.1", server.port, f"/ws/runs/{run.id}/", headers=headers)
        try:
            async with asyncio.timeout(WAIT_SECONDS):
                message: dict[str, Any] = json.loads(await socket_.receive_text())
                return message
        finally:
            await socket_.close()

    snapshot = asyncio.run(first_message())
    assert (snapshot["type"], snapshot["run_id"]) == ("run.status", str(run.id))


# --- Through the ASGI application (any other ASGI server) -------------------------------------------------------------

SMALL_LIMITS = {"/": 4096, "/api/": 2048, "/api/v1/chat/completions": 8192, "/hooks/github/": 1024}
SMALL_ROUTES = [
    Route(route.name, route.path, SMALL_LIMITS[prefix], route.content_type, route.shape, route.status_at_limit)
    for route, prefix in zip(ROUTES, ["/", "/api/", "/api/v1/chat/completions", "/hooks/github/"], strict=True)
]


@pytest.fixture
def small_limits(settings) -> None:
    settings.REQUEST_BODY_LIMITS = SMALL_LIMITS
    settings.RUN_EXECUTOR = "worker"  # no inline executor is started on the test's event loop


def _scope(route: Route, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": route.path,
        "raw_path": route.path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", route.content_type.encode()), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def _answer(communicator: ApplicationCommunicator) -> tuple[int, dict[str, str], bytes]:
    start = await communicator.receive_output(timeout=WAIT_SECONDS)
    assert start["type"] == "http.response.start", start
    body = b""
    while True:
        message = await communicator.receive_output(timeout=WAIT_SECONDS)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = {name.decode().lower(): value.decode() for name, value in start["headers"]}
    return start["status"], headers, body


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("async_isolation", "small_limits")
@pytest.mark.parametrize("route", SMALL_ROUTES, ids=[route.name for route in SMALL_ROUTES])
async def test_the_application_refuses_a_body_as_it_passes_the_limit(route):
    communicator = ApplicationCommunicator(application, _scope(route))
    piece = b" " * 512
    for _ in range(route.limit // len(piece)):
        await communicator.send_input({"type": "http.request", "body": piece, "more_body": True})
    assert await communicator.receive_nothing(timeout=0.1)  # exactly the limit so far: still reading
    await communicator.send_input({"type": "http.request", "body": b" ", "more_body": True})
    status, headers, body = await _answer(communicator)  # the body never ended: no more was needed
    assert (status, headers["connection"]) == (413, "close")
    _assert_shape(headers["content-type"], body, route)
    await communicator.wait(timeout=WAIT_SECONDS)  # and the application stopped


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("async_isolation", "small_limits")
@pytest.mark.parametrize("route", SMALL_ROUTES, ids=[route.name for route in SMALL_ROUTES])
async def test_the_application_refuses_a_declared_length_over_the_limit_unread(route):
    over = ApplicationCommunicator(application, _scope(route, (b"content-length", str(route.limit + 1).encode())))
    status, headers, body = await _answer(over)  # not one body message was sent
    assert status == 413
    _assert_shape(headers["content-type"], body, route)
    await over.wait(timeout=WAIT_SECONDS)

    at_limit = ApplicationCommunicator(application, _scope(route, (b"content-length", str(route.limit).encode())))
    await at_limit.send_input({"type": "http.request", "body": b" " * (route.limit - 1), "more_body": True})
    await at_limit.send_input({"type": "http.request", "body": b" ", "more_body": False})
    status, _, _ = await _answer(at_limit)
    assert status == route.status_at_limit  # the application's own answer (no credentials)
    await at_limit.wait(timeout=WAIT_SECONDS)


# --- One table -------------------------------------------------------------------------------------------------------


def test_the_gateways_own_cap_is_the_tables_entry(settings):
    settings.REQUEST_BODY_LIMITS = {**settings.REQUEST_BODY_LIMITS, "/api/v1/chat/completions": 4096}
    assert max_body_bytes() == 4096
    assert parse_json_body(b"{}" + b" " * 4094) == {}
    with pytest.raises(ProxyError) as refused:
        parse_json_body(b"{}" + b" " * 4095)
    assert (refused.value.status, refused.value.code) == (413, "request_too_large")


def test_django_never_spools_an_accepted_body_to_a_file(settings):
    # Django's ASGI handler and upload handlers switch to a temporary file past FILE_UPLOAD_MAX_MEMORY_SIZE.
    assert settings.REQUEST_BODY_LIMITS["/"] == settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    assert settings.REQUEST_BODY_LIMITS["/hooks/github/"] == settings.WEBHOOK_MAX_BODY_BYTES
    assert all(limit <= settings.FILE_UPLOAD_MAX_MEMORY_SIZE for limit in settings.REQUEST_BODY_LIMITS.values())
