"""deploy/compose-smoke.sh's client: over HTTPS through the compose file's proxy, add a provider key pointing at the
simulator, create a chat run and stream it (SSE) to the end, then check what the proxy and CesaFlow answered.

``python3 deploy/compose_smoke_client.py <https base URL> <CA certificate file> <org API key>`` (the key comes on
stdin when the last argument is ``-``). Standard library only: it runs on the host. Exit 0 when every check holds.
"""

from __future__ import annotations

import http.client
import json
import ssl
import sys
import time
from typing import Any
from urllib.parse import urlsplit

OBJECTIVE = "hello through the TLS proxy"


def _connection(base: str, cafile: str) -> http.client.HTTPSConnection:
    parts = urlsplit(base)
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return http.client.HTTPSConnection(parts.hostname or "localhost", parts.port or 443, context=context, timeout=30)


def _json(conn: http.client.HTTPSConnection, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
    payload = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=payload, headers={"x-api-key": key, "content-type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"null")


def main(base: str, cafile: str, key: str) -> int:
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    conn = _connection(base, cafile)
    status, created = _json(
        conn,
        "POST",
        "/api/v1/provider-keys",
        key,
        {
            "provider": "openai",
            "label": "simulator",
            "secret": "fake-compose-smoke",
            "base_url": "http://simulator:8766/openai/v1",
        },
    )
    check(status == 201, f"provider key created over HTTPS (HTTP {status})")
    if status != 201:
        print(json.dumps(created)[:500])
        return 1

    started = time.monotonic()
    body = {"objective": OBJECTIVE, "provider_key": created["id"], "model": "fake/echo", "stream": True}
    conn.request(
        "POST",
        "/api/v1/runs",
        body=json.dumps(body).encode(),
        headers={"x-api-key": key, "content-type": "application/json"},
    )
    response = conn.getresponse()
    check(response.status == 200, f"streaming create answered HTTP {response.status}")
    check((response.getheader("content-type") or "").startswith("text/event-stream"), "the answer is text/event-stream")
    check("max-age=" in (response.getheader("strict-transport-security") or ""), "HSTS arrives through the proxy")
    sock = conn.sock
    check(isinstance(sock, ssl.SSLSocket) and sock.version() in {"TLSv1.2", "TLSv1.3"}, "TLS 1.2+ to the proxy")
    events: list[dict[str, Any]] = []
    first_delta_s: float | None = None
    while True:
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data:"):
            event = json.loads(line[5:])
            events.append(event)
            if event.get("type") == "text.delta" and first_delta_s is None:
                first_delta_s = time.monotonic() - started
            if event.get("type") == "run.finished":
                break
    types = [event.get("type") for event in events]
    text = "".join(str(event.get("text", "")) for event in events if event.get("type") == "text.delta")
    check("run.finished" in types, f"the stream ran to run.finished ({len(events)} events)")
    check(OBJECTIVE in text, "the streamed text is the simulator's answer to the objective")
    run_id = events[0].get("run_id") if events else None
    conn.close()

    conn = _connection(base, cafile)
    status, run = _json(conn, "GET", f"/api/v1/runs/{run_id}", key)
    check(status == 200 and run.get("status") == "succeeded", f"the run is recorded succeeded ({run.get('status')})")
    usage = run.get("usage") or {}
    check(bool(run.get("output_tokens") or usage.get("output_tokens")), "its token counts are recorded")
    conn.close()
    if first_delta_s is not None:
        print(f"first text delta {first_delta_s * 1000:.0f} ms after the request (through Caddy, web, Redis, worker)")
    return 1 if failures else 0


if __name__ == "__main__":
    api_key = sys.stdin.readline().strip() if sys.argv[3] == "-" else sys.argv[3]
    sys.exit(main(sys.argv[1], sys.argv[2], api_key))
