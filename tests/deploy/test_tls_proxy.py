"""The TLS proxy (issue #15, point 2): Caddy with ``deploy/proxy/Caddyfile`` in front of a production CesaFlow.

Real processes on loopback: ``python -m cesaflow.serve`` with ``CESAFLOW_ENV=production`` behind Caddy, which
terminates TLS with a throwaway certificate; clients are ``openssl s_client``, httpx, a raw TLS socket and a
websocket client. Clients connect from 127.0.0.2, so the address Caddy sees differs from the one CesaFlow sees
(Caddy's own, 127.0.0.1). Shown: only TLS 1.2 and 1.3 are accepted; Caddy listens on the site's address only; HSTS
and the security headers arrive; the client address CesaFlow records is the real client's, whatever the client
claims; a run streams over a websocket and over SSE unbuffered; a body over its limit gets 413 and never touches
disk; ``/static/`` comes from the collectstatic output. Skipped when ``caddy`` or ``openssl`` is not installed
(``.ci/run`` installs both).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.wsclient import WebSocket, WebSocketError
from deploy.throwaway import SITE_HOST, TLSFiles, throwaway_tls
from orgs.models import ApiKey, Organization, User
from orgs.permissions import ADMIN_CAPABILITIES
from orgs.services import api_key_create, organization_create
from runs.models import AuditEvent, Run, RunStatus
from tests.conftest import PASSWORD
from tests.deploy.processes import Process, caddy_proxy, collectstatic, production_env, production_web
from tests.disk_traces import files_holding, holds
from tests.runs.conftest import simulator, simulator_server  # noqa: F401 - fixtures, used below
from tests.runs.test_execution_support import sim_key

CADDY = shutil.which("caddy")
OPENSSL = shutil.which("openssl")
CLIENT_ADDRESS = "127.0.0.2"  # loopback, but not the proxy's own address
SPOOFED_ADDRESS = "203.0.113.9"
MIB = 1024 * 1024
WAIT_SECONDS = 15.0  # a deadline for what must happen, never an expected duration

pytestmark = [
    pytest.mark.deploy,
    # The web process verifies passwords with the production hashers, so the test's users must use them too.
    pytest.mark.real_hasher,
    pytest.mark.skipif(
        CADDY is None or OPENSSL is None,
        reason="the TLS proxy test needs Caddy and OpenSSL: apt-get install caddy openssl",
    ),
]


@dataclass(frozen=True)
class Stack:
    web: Process
    proxy: Process
    tls: TLSFiles
    static_root: Path

    @property
    def origin(self) -> str:
        return f"https://{SITE_HOST}:{self.proxy.port}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.tls.ca))

    def client(self, **headers: str) -> httpx.Client:
        """An HTTPS client of the proxy that trusts only the test CA and connects from CLIENT_ADDRESS."""
        transport = httpx.HTTPTransport(verify=self.ssl_context(), local_address=CLIENT_ADDRESS)
        return httpx.Client(
            transport=transport, base_url=self.origin, headers=headers, timeout=WAIT_SECONDS, follow_redirects=False
        )


@pytest.fixture(scope="module")
def stack(django_db_setup, tmp_path_factory) -> Iterator[Stack]:
    assert CADDY is not None
    workdir = tmp_path_factory.mktemp("tls-proxy")
    tls = throwaway_tls(workdir / "tls")
    # Agent workspaces where the sandbox's uid can reach them (pytest's directories are 0700); no agent runs here,
    # but the web process self-tests its sandbox there at start.
    workspaces = Path(tempfile.mkdtemp(prefix="cesaflow-tls-ws-", dir="/tmp"))
    workspaces.chmod(0o711)
    env = production_env(workdir, workspaces=workspaces)
    static_root = collectstatic(env)
    try:
        with (
            production_web(workdir, env) as web,
            caddy_proxy(workdir, caddy=CADDY, tls=tls, upstreams=[web.port], static_root=static_root) as proxy,
        ):
            yield Stack(web=web, proxy=proxy, tls=tls, static_root=static_root)
    finally:
        shutil.rmtree(workspaces, ignore_errors=True)


@dataclass
class Tenant:
    org: Organization
    user: User
    api_key: ApiKey
    api_secret: str


@pytest.fixture
def tenant(transactional_db) -> Tenant:
    user = User.objects.create_user(email="tess@tls.example", password=PASSWORD, name="Tess")
    org = organization_create(name="TLS Org", admin=user, slug="tls-org")
    api_key, secret = api_key_create(org=org, name="tls key", actor=user, scopes=sorted(ADMIN_CAPABILITIES))
    return Tenant(org=org, user=user, api_key=api_key, api_secret=secret)


def sign_in(client: httpx.Client, user: User, **headers: str) -> httpx.Response:
    """The login form, as a browser posts it: CSRF token and cookie, Origin and Referer of the site."""
    page = client.get("/login/", headers=headers)
    assert page.status_code == 200, page.text[:300]
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token is not None
    origin = str(client.base_url).rstrip("/")
    return client.post(
        "/login/",
        data={"csrfmiddlewaretoken": token.group(1), "email": user.email, "password": PASSWORD},
        headers={"origin": origin, "referer": f"{origin}/login/", **headers},
    )


# --- TLS versions and listeners ---------------------------------------------------------------------------------------


def s_client(stack: Stack, version: str) -> subprocess.CompletedProcess[str]:
    """One handshake with ``openssl s_client`` pinned to ``version``. SECLEVEL=0 lets the client offer TLS 1.0/1.1
    (Debian's OpenSSL refuses them itself otherwise), so a refusal observed is the server's."""
    assert OPENSSL is not None
    argv = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{stack.proxy.port}", "-servername", SITE_HOST]
    argv += [f"-{version}", "-cipher", "DEFAULT:@SECLEVEL=0", "-CAfile", str(stack.tls.ca), "-verify_return_error"]
    return subprocess.run(argv, input="", capture_output=True, text=True, timeout=WAIT_SECONDS, check=False)


@pytest.mark.parametrize("version", ["tls1", "tls1_1"])
def test_tls_1_0_and_1_1_handshakes_are_refused_by_the_server(stack, version):
    result = s_client(stack, version)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # The server answered the ClientHello with a protocol_version alert (70): it refused, the client did not.
    assert "alert protocol version" in output, output[-2000:]
    assert "Cipher is (NONE)" in output


@pytest.mark.parametrize(("version", "name"), [("tls1_2", "TLSv1.2"), ("tls1_3", "TLSv1.3")])
def test_tls_1_2_and_1_3_handshakes_are_accepted_with_a_verified_certificate(stack, version, name):
    result = s_client(stack, version)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-2000:]
    assert re.search(rf"Protocol\s*:\s*{re.escape(name)}", output), output[-2000:]
    assert "Verify return code: 0 (ok)" in output


def test_caddy_listens_on_the_site_address_only(stack):
    """No admin endpoint (:2019), no HTTP redirect listener (:80), no HTTP/3 (UDP): one TCP socket."""
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("needs ss (iproute2) to list listening sockets")
    listing = subprocess.run([ss, "-Hlntup"], capture_output=True, text=True, timeout=WAIT_SECONDS, check=True)
    mine = [line.split() for line in listing.stdout.splitlines() if f"pid={stack.proxy.pid}," in line]
    assert [(fields[0], fields[4]) for fields in mine] == [("tcp", f"127.0.0.1:{stack.proxy.port}")], mine


# --- Headers and the client address -----------------------------------------------------------------------------------


def test_hsts_and_the_security_headers_arrive_through_the_proxy(stack):
    # A client claiming the request came over plain HTTP changes nothing: the proxy says what it saw (HTTPS), so
    # CesaFlow neither redirects to HTTPS nor withholds its secure cookies.
    with stack.client() as client:
        response = client.get("/login/", headers={"x-forwarded-proto": "http"})
    assert response.status_code == 200
    headers = response.headers
    assert headers.get_list("strict-transport-security") == ["max-age=31536000; includeSubDomains; preload"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "strict-origin-when-cross-origin"
    assert headers["cross-origin-opener-policy"] == "same-origin"
    assert "script-src 'self'" in headers["content-security-policy"]
    csrf_cookie = next(c for c in headers.get_list("set-cookie") if c.startswith("__Host-cf_csrf="))
    assert "Secure" in csrf_cookie


def test_caddys_own_answers_carry_hsts_too(stack):
    with stack.client() as client:
        static = client.get("/static/css/does-not-exist.css")
    assert static.status_code == 404
    assert static.headers["strict-transport-security"].startswith("max-age=31536000")
    assert static.headers["x-content-type-options"] == "nosniff"


def test_cesaflow_records_the_real_client_address_not_a_spoofed_one(stack, tenant):
    with stack.client() as client:
        answer = sign_in(client, tenant.user, **{"x-forwarded-for": SPOOFED_ADDRESS})
    assert answer.status_code == 302, answer.text[:500]
    login = AuditEvent.objects.get(event=AuditEvent.LOGIN_SUCCEEDED, actor_user=tenant.user)
    # Caddy saw 127.0.0.2; CesaFlow's own peer is Caddy at 127.0.0.1; the client claimed 203.0.113.9.
    assert login.ip == CLIENT_ADDRESS


# --- Streaming through the proxy --------------------------------------------------------------------------------------


def create_run(stack: Stack, tenant: Tenant, simulator: Any) -> Run:  # noqa: F811
    key = sim_key(tenant.org, tenant.user, simulator)
    with stack.client(**{"x-api-key": tenant.api_secret}) as client:
        response = client.post(
            "/api/v1/runs", json={"provider_key": str(key.id), "model": "fake/echo", "objective": "Say hello."}
        )
    assert response.status_code == 201, response.text
    return Run.objects.get(pk=response.json()["id"])


async def wss_connect(stack: Stack, path: str, headers: dict[str, str]) -> WebSocket:
    """A websocket over TLS through the proxy, from the client address."""
    return await WebSocket.connect(
        SITE_HOST,
        stack.proxy.port,
        path,
        headers=headers,
        tls=stack.ssl_context(),
        local_addr=(CLIENT_ADDRESS, 0),
    )


def test_a_run_streams_over_a_websocket_through_the_proxy(stack, tenant, simulator):  # noqa: F811
    run = create_run(stack, tenant, simulator)
    with stack.client() as client:
        assert sign_in(client, tenant.user).status_code == 302
        cookies = "; ".join(f"{cookie.name}={cookie.value}" for cookie in client.cookies.jar)
    assert "__Host-cf_session=" in cookies

    async def watch() -> list[dict[str, Any]]:
        socket_ = await wss_connect(stack, f"/ws/runs/{run.id}/", {"origin": stack.origin, "cookie": cookies})
        seen: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(WAIT_SECONDS):
                while not seen or seen[-1]["type"] != "run.finished":
                    seen.append(json.loads(await socket_.receive_text()))
        finally:
            await socket_.close()
        return seen

    events = asyncio.run(watch())
    types = [event["type"] for event in events]
    assert types[0] == "run.status"
    assert "text.delta" in types
    assert events[-1]["status"] == RunStatus.SUCCEEDED
    assert "".join(event["text"] for event in events if event["type"] == "text.delta")


def test_a_websocket_from_another_origin_is_refused_through_the_proxy(stack, tenant, simulator):  # noqa: F811
    run = create_run(stack, tenant, simulator)
    with stack.client() as client:
        assert sign_in(client, tenant.user).status_code == 302
        cookies = "; ".join(f"{cookie.name}={cookie.value}" for cookie in client.cookies.jar)

    async def handshake() -> None:
        await wss_connect(stack, f"/ws/runs/{run.id}/", {"origin": "https://evil.example", "cookie": cookies})

    with pytest.raises(WebSocketError, match=r"HTTP/1\.1 403"):
        asyncio.run(handshake())


def test_server_sent_events_are_not_buffered_by_the_proxy(stack, tenant, simulator):  # noqa: F811
    # About 40 small deltas, 80 ms apart: a buffering proxy would hold the first until the run had ended.
    simulator.enqueue("openai", "slow")
    run = create_run(stack, tenant, simulator)
    headers = {"x-api-key": tenant.api_secret, "accept": "text/event-stream"}
    with stack.client(**headers) as client, client.stream("GET", f"/api/v1/runs/{run.id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        for line in lines:
            if line == "event: text.delta":
                break
        status_at_first_delta = Run.objects.get(pk=run.pk).status
        rest = list(lines)  # the stream ends after run.finished (the client's timeout bounds the wait)
    assert status_at_first_delta == RunStatus.RUNNING
    assert "event: run.finished" in rest


# --- Request bodies ---------------------------------------------------------------------------------------------------


def disk_traces(stack: Stack, canary: bytes, since: float) -> list[str]:
    """Files holding the canary: written since the test began in a temp directory or the proxy's HOME, or open in
    the proxy or the web process."""
    roots = {Path(tempfile.gettempdir()), Path("/tmp"), Path("/var/tmp"), stack.web.home, stack.proxy.home}  # noqa: S108
    traces = [f"file: {path}" for path in files_holding(canary, roots, since=since)]
    for pid in (stack.web.pid, stack.proxy.pid):
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir() if fd_dir.exists() else []:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("/") and not target.startswith(("/dev/", "/proc/")) and holds(str(fd), canary):
                traces.append(f"open file of {pid}: {target}")
    return traces


def tls_socket(stack: Stack) -> ssl.SSLSocket:
    context = stack.ssl_context()
    context.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", stack.proxy.port), timeout=WAIT_SECONDS)
    return context.wrap_socket(raw, server_hostname=SITE_HOST)


def answer_started(sock: ssl.SSLSocket) -> bytes:
    """What has arrived of an answer so far, without waiting (TLS 1.3 session tickets make the socket readable
    with no answer in sight, so a bare select cannot tell)."""
    sock.settimeout(0)
    try:
        return sock.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return b""
    finally:
        sock.settimeout(WAIT_SECONDS)


def read_answer(sock: ssl.SSLSocket, data: bytes = b"") -> tuple[int, bytes]:
    """The status and body of one answer: read until its Content-Length is complete, the proxy closes the
    connection, or the deadline passes."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        head, separator, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if separator and length and len(body) >= int(length.group(1)):
            break
        try:
            piece = sock.recv(65536)
        except (ConnectionError, ssl.SSLError, TimeoutError):
            break
        if not piece:
            break
        data += piece
    status = re.match(rb"HTTP/1\.1 (\d{3})", data)
    assert status is not None, data[:300]
    return int(status.group(1)), data.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
@pytest.mark.parametrize(("path", "limit"), [("/api/v1/runs", MIB), ("/api/v1/chat/completions", 2 * MIB)])
def test_a_body_over_the_limit_gets_413_and_never_touches_disk(stack, path, limit, chunked):
    canary = f"CANARYtls{secrets.token_hex(12)}".encode()
    piece = (canary + b" ") * (64 * 1024 // (len(canary) + 1))
    pieces = limit // len(piece) + 2
    since = time.time() - 1
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {pieces * len(piece)}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {SITE_HOST}:{stack.proxy.port}\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n\r\n"
    ).encode()
    with tls_socket(stack) as sock:
        sock.sendall(head)
        sent, early = 0, b""
        # Stop sending as soon as an answer is there: a client still writing after the proxy closes would get a
        # reset that loses the answer. A send that blocks (nobody reads any more) stops it too.
        try:
            while sent < pieces * len(piece) and not (early := answer_started(sock)):
                sock.settimeout(0.2)
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
                if limit // 2 <= sent < limit // 2 + len(piece):
                    # Half the limit is on its way through the proxy: it streams, so nothing of it is on disk.
                    assert disk_traces(stack, canary, since) == []
        except (TimeoutError, BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # refused in flight: what the answer below says
        if not early and chunked:
            # Caddy 2.6 answers an HTTP/1.1 body it cut at the limit once the client has finished sending it.
            with contextlib.suppress(TimeoutError, BrokenPipeError, ConnectionResetError, ssl.SSLError):
                sock.sendall(b"0\r\n\r\n")
        sock.settimeout(WAIT_SECONDS)
        status, answer = read_answer(sock, early)
    assert status == 413
    assert canary not in answer
    assert disk_traces(stack, canary, since) == []
    assert canary not in stack.web.log.read_bytes()
    assert canary not in stack.proxy.log.read_bytes()


# --- Static files -----------------------------------------------------------------------------------------------------


def test_static_files_come_from_the_collectstatic_output_via_the_proxy(stack):
    collected = sorted(p for p in stack.static_root.rglob("*.css") if p.is_file())
    assert collected, "collectstatic wrote no stylesheet"
    relative = collected[0].relative_to(stack.static_root).as_posix()
    marker = f"/* served from CADDY_STATIC_ROOT {uuid.uuid4()} */\n".encode()
    original = collected[0].read_bytes()
    collected[0].write_bytes(original + marker)
    try:
        with stack.client() as client:
            served = client.get(f"/static/{relative}")
        direct = httpx.get(f"http://127.0.0.1:{stack.web.port}/static/{relative}", timeout=WAIT_SECONDS)
    finally:
        collected[0].write_bytes(original)
    assert served.status_code == 200
    assert served.content == original + marker
    assert served.headers["content-type"].startswith("text/css")
    assert served.headers["x-content-type-options"] == "nosniff"
    # CesaFlow itself does not serve them: the proxy did.
    assert direct.status_code != 200
