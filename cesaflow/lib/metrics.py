"""Prometheus metrics (``prometheus_client``): what each process counts, and the bearer-token check of /metrics.

Per process (each web process and each ``run_worker --metrics-port`` has its own; scrape every one):

* ``cesaflow_http_requests_total{method,route,status}`` and ``cesaflow_http_response_start_seconds{route}`` (time to
  the response's headers; a stream's body goes on after). ``route`` is the URL pattern (``api/v1/runs/<uuid:run_id>``),
  never the path, so ids and typed URLs cannot grow the label set; unmatched paths are ``unmatched``.
* ``cesaflow_active_streams{transport}``: open run streams (``websocket``, ``sse``) and gateway completions being
  streamed (``gateway``).
* ``cesaflow_provider_response_seconds{provider,outcome}``: from sending a provider request to its response headers
  (``ok``, ``error``: an HTTP error answer, ``unreachable``: no answer).
* ``cesaflow_runs_finished_total{kind,status}``: runs this process recorded as ended.
* the client library's process metrics (CPU, memory, open files).

Shared state, computed when scraped (web processes only: ``runs.metrics``): runs queued and running by kind, the
queue's depth. Metrics carry no content, key or org names: labels are from fixed sets.
"""

from __future__ import annotations

import hmac
import threading
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

UNMATCHED: Final = "unmatched"
STREAM_TRANSPORTS: Final = ("websocket", "sse", "gateway")

HTTP_REQUESTS = Counter(
    "cesaflow_http_requests", "HTTP requests answered, by route pattern and status.", ["method", "route", "status"]
)
HTTP_RESPONSE_START = Histogram(
    "cesaflow_http_response_start_seconds",
    "Time from a request's arrival in Django to its response headers.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
ACTIVE_STREAMS = Gauge("cesaflow_active_streams", "Streams open now.", ["transport"])
PROVIDER_RESPONSE = Histogram(
    "cesaflow_provider_response_seconds",
    "Time from sending a provider request to its response headers.",
    ["provider", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
)
RUNS_FINISHED = Counter("cesaflow_runs_finished", "Runs recorded as ended by this process.", ["kind", "status"])

# Pre-create the stream gauges so a scrape shows 0 rather than nothing before the first stream.
for _transport in STREAM_TRANSPORTS:
    ACTIVE_STREAMS.labels(_transport)
del _transport

METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe_request(*, method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(method if method in METHODS else "other", route, str(status)).inc()
    HTTP_RESPONSE_START.labels(route).observe(seconds)


def token_matches(presented: str | None, expected: str) -> bool:
    """A scraper's ``Authorization: Bearer`` value against the configured token, in constant time."""
    if not expected or not presented:
        return False
    scheme, _, token = presented.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())


# Metrics of the shared state (the database), computed when scraped: apps register their collectors here at startup
# (``runs.apps``). Web processes serve them; workers do not (every process would report the same figures).
SHARED_REGISTRY = CollectorRegistry()


def exposition() -> bytes:
    """This process's metrics, then the shared ones, in Prometheus's text format. Sync: the shared collectors query
    the database (call it in a thread hop)."""
    return generate_latest(REGISTRY) + generate_latest(SHARED_REGISTRY)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No per-scrape line on stderr."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_process_metrics(*, host: str, port: int, token: str) -> WSGIServer:
    """This process's metrics (not the shared ones) at ``http://host:port/metrics`` for a scraper presenting
    ``token``, from a daemon thread: for processes that serve no HTTP themselves (``run_worker --metrics-port``)."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Not found.\n"]
        if not token_matches(environ.get("HTTP_AUTHORIZATION"), token):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"A metrics bearer token is required.\n"]
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Cache-Control", "no-store")])
        return [generate_latest(REGISTRY)]

    server = make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
