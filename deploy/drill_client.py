"""What the drill's clients do against the web processes: the REST API with org API keys, SSE streams, websockets
with a dashboard session (signed in through the real login form: CSRF token, cookies, Origin), and dashboard pages.

Every wait is bounded by a deadline; nothing here sleeps on the wall clock to decide an outcome. Clients reach the
web processes through the TLS proxy (https, verifying the drill's throwaway CA); a websocket that must reach one
given process connects to it directly, still sending the site's https ``Origin``. Cookies are kept by hand:
production cookies are ``Secure`` and ``__Host-`` prefixed, which a cookie jar would not send to a process's
plain-HTTP address.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.wsclient import WebSocket, WebSocketClosed, WebSocketError

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
CSRF_INPUT_RE = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


@dataclass(frozen=True)
class Org:
    org_id: str
    email: str
    password: str
    api_key: str
    provider_key: str

    def __repr__(self) -> str:  # never the credentials
        return f"Org({self.org_id})"


@dataclass
class StreamResult:
    """What one watcher of one run saw."""

    events: int = 0
    text_deltas: int = 0
    final_status: str = ""  # from its run.finished, "" when the stream ended without one
    close_code: int | None = None  # websocket close code, when the server closed
    error: str = ""  # a transport error (connection reset, timeout)
    first_status: str = ""  # the snapshot's status (the first run.status)


def _cookies(response: httpx.Response) -> dict[str, str]:
    jar: dict[str, str] = {}
    for header in response.headers.get_list("set-cookie"):
        pair = header.split(";", 1)[0]
        name, _, value = pair.partition("=")
        jar[name.strip()] = value.strip()
    return jar


def cookie_header(cookies: dict[str, str]) -> str:
    return "; ".join(f"{name}={value}" for name, value in cookies.items())


class Client:
    """One HTTP client (connection pool) for the whole drill; ``base`` is a web process's URL. ``tls``: the context
    that verifies the proxy's certificate (the drill's throwaway CA)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        # Cookies are kept by hand, per org session: the client's own jar accepts none (over HTTPS it would keep
        # every session's cookies and send them with every request).
        no_cookies = http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(20.0, connect=5.0),
            follow_redirects=False,
            verify=tls if tls is not None else True,
            cookies=no_cookies,
        )

    async def close(self) -> None:
        await self.http.aclose()

    # --- REST API -----------------------------------------------------------------------------------------------

    async def create_run(self, base: str, org: Org, body: dict[str, Any]) -> httpx.Response:
        payload = {"provider_key": org.provider_key, **body}
        return await self.http.post(f"{base}/api/v1/runs", json=payload, headers={"x-api-key": org.api_key})

    async def get_run(self, base: str, org: Org, run_id: str) -> httpx.Response:
        return await self.http.get(f"{base}/api/v1/runs/{run_id}", headers={"x-api-key": org.api_key})

    async def list_runs(self, base: str, org: Org) -> httpx.Response:
        return await self.http.get(f"{base}/api/v1/runs", headers={"x-api-key": org.api_key})

    async def status_when_terminal(self, bases: list[str], org: Org, run_id: str, deadline: float) -> str:
        """Poll ``GET /runs/{id}`` (through whichever web answers) until the run is terminal or the deadline."""
        status = ""
        turn = 0
        while time.monotonic() < deadline:
            try:
                response = await self.get_run(bases[turn % len(bases)], org, run_id)
                if response.status_code == 200:
                    status = str(response.json()["status"])
                    if status in TERMINAL:
                        return status
            except httpx.HTTPError:
                pass
            turn += 1
            await asyncio.sleep(0.5)
        return status or "unknown"

    async def sse(
        self, base: str, org: Org, run_id: str, *, timeout: float, result: StreamResult | None = None
    ) -> StreamResult:
        """Read a run's SSE stream to its ``run.finished`` (or an error, or the timeout), counting into ``result``
        as events arrive (a drill may look at it meanwhile)."""
        result = result if result is not None else StreamResult()
        url = f"{base}/api/v1/runs/{run_id}/events"
        try:
            async with asyncio.timeout(timeout):
                async with self.http.stream("GET", url, headers={"x-api-key": org.api_key}) as response:
                    if response.status_code != 200:
                        result.error = f"HTTP {response.status_code}"
                        return result
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        if self._note(result, json.loads(line[5:])):
                            return result
        except (TimeoutError, httpx.HTTPError, ValueError) as exc:
            result.error = type(exc).__name__
        return result

    @staticmethod
    def _note(result: StreamResult, event: dict[str, Any]) -> bool:
        """Count one event; True at the stream's end (``run.finished``)."""
        result.events += 1
        kind = event.get("type")
        if kind == "run.status" and not result.first_status:
            result.first_status = str(event.get("status"))
        if kind == "text.delta":
            result.text_deltas += 1
        if kind == "run.finished":
            result.final_status = str(event.get("status"))
            return True
        return False

    # --- Dashboard sessions -------------------------------------------------------------------------------------

    async def sign_in(self, base: str, org: Org) -> dict[str, str]:
        """The login form as a browser submits it; returns the session cookies (empty if refused)."""
        page = await self.http.get(f"{base}/login/")
        jar = _cookies(page)
        token = CSRF_INPUT_RE.search(page.text)
        if page.status_code != 200 or token is None:
            return {}
        response = await self.http.post(
            f"{base}/login/",
            data={"email": org.email, "password": org.password, "csrfmiddlewaretoken": token.group(1)},
            headers={"cookie": cookie_header(jar), "origin": base, "referer": f"{base}/login/"},
        )
        if response.status_code != 302:
            return {}
        return {name: value for name, value in _cookies(response).items() if "session" in name or "refresh" in name}

    async def page(self, base: str, path: str, cookies: dict[str, str]) -> httpx.Response:
        return await self.http.get(f"{base}{path}", headers={"cookie": cookie_header(cookies)})

    # --- Websockets ---------------------------------------------------------------------------------------------


async def ws_connect(
    base: str, run_id: str, cookies: dict[str, str], *, origin: str, tls: ssl.SSLContext | None
) -> WebSocket:
    """A run's websocket at ``base`` (``wss`` through the proxy when it is ``https``, verified with ``tls``), sending
    the site's ``origin`` as a browser on it would."""
    parts = urlsplit(base)
    headers = {"cookie": cookie_header(cookies), "origin": origin}
    secure = parts.scheme == "https"
    return await WebSocket.connect(
        parts.hostname or "127.0.0.1",
        parts.port or (443 if secure else 80),
        f"/ws/runs/{run_id}/",
        headers=headers,
        tls=(tls or ssl.create_default_context()) if secure else None,
    )


async def ws_read(socket: WebSocket, result: StreamResult, *, timeout: float) -> StreamResult:
    """Read a run's websocket until ``run.finished``, a close, a broken connection or the timeout."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if Client._note(result, json.loads(await socket.receive_text())):
                    break
    except WebSocketClosed as exc:
        result.close_code = exc.code
    except (TimeoutError, WebSocketError, OSError, ValueError) as exc:
        result.error = type(exc).__name__
    return result


async def ws_watch(
    base: str,
    run_id: str,
    cookies: dict[str, str],
    *,
    origin: str,
    tls: ssl.SSLContext | None,
    timeout: float,
    result: StreamResult | None = None,
) -> StreamResult:
    result = result if result is not None else StreamResult()
    try:
        socket = await ws_connect(base, run_id, cookies, origin=origin, tls=tls)
    except (WebSocketError, OSError) as exc:
        result.error = type(exc).__name__
        return result
    try:
        return await ws_read(socket, result, timeout=timeout)
    finally:
        await socket.close(timeout=1.0)


@dataclass
class Tally:
    """HTTP statuses (or transport errors) seen by a burst of requests."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def __str__(self) -> str:
        return ", ".join(f"{key} x{count}" for key, count in sorted(self.counts.items())) or "none"
