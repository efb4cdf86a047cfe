"""Project-level views: health probes, metrics and error pages (JSON under /api/, HTML elsewhere)."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.core.cache import cache
from django.db import InterfaceError, OperationalError, connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST

from cesaflow.lib import metrics as metrics_lib
from cesaflow.lib import shutdown
from cesaflow.lib.api import (
    DATABASE_RETRY_AFTER_SECONDS,
    DATABASE_UNAVAILABLE_CODE,
    DATABASE_UNAVAILABLE_MESSAGE,
    error_body,
)
from cesaflow.lib.hops import db_hop

logger = logging.getLogger(__name__)


@login_not_required
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """The process is up. No dependencies are touched."""
    return JsonResponse({"status": "ok"})


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def _check_cache() -> None:
    key = f"readyz:{uuid.uuid4().hex}"
    cache.set(key, "1", timeout=5)
    if cache.get(key) != "1":
        raise RuntimeError("cache read-back failed")
    cache.delete(key)


async def _probe_channel_layer() -> None:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer configured")
    # The default prefix: a process's channels of one prefix share the Redis queue its receive lock pops, so a
    # channel of another prefix waits for that lock behind a receiver (a websocket, the inline executor) blocked
    # on the default one, and the probe timed out whenever one was open (/readyz 503).
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "readyz.ping"})
    message = await asyncio.wait_for(layer.receive(channel), timeout=2)
    if message.get("type") != "readyz.ping":
        raise RuntimeError("channel layer read-back failed")


def _check_channel_layer() -> None:
    async_to_sync(_probe_channel_layer)()


def service_checks() -> dict[str, str]:
    """Database, cache (Redis) and channel layer: "ok" or "unavailable" each (the reason goes to the log only)."""
    checks: dict[str, str] = {}
    for name, check in (
        ("database", _check_database),
        ("cache", _check_cache),
        ("channel_layer", _check_channel_layer),
    ):
        try:
            check()
            checks[name] = "ok"
        except Exception:
            logger.warning("readiness check %s failed", name, exc_info=True)
            checks[name] = "unavailable"
    return checks


@login_not_required
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Database, cache and channel layer reachable: 200, else 503 naming what is down (never why in detail). A
    process shutting down answers 503 at once, so balancers stop sending it work."""
    if shutdown.draining():
        return JsonResponse({"status": "shutting_down", "checks": {}}, status=503)
    checks = service_checks()
    ok = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503)


@login_not_required
@require_GET
async def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics (``cesaflow.lib.metrics``) for a scraper presenting ``CESAFLOW_METRICS_TOKEN`` as a bearer
    token. Without the setting the endpoint does not exist (404)."""
    if not settings.METRICS_TOKEN:
        raise Http404
    if not metrics_lib.token_matches(request.headers.get("Authorization"), settings.METRICS_TOKEN):
        response = HttpResponse("A metrics bearer token is required.\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    body = await db_hop(metrics_lib.exposition)()
    response = HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
    response["Cache-Control"] = "no-store"
    return response


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(error_body("not_found", "Not found."), status=404)
    return render(request, "errors/404.html", status=404)


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(error_body("permission_denied", "You may not do this."), status=403)
    return render(request, "errors/403.html", status=403)


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(error_body("invalid_request", "The request is invalid."), status=400)
    return render(request, "errors/400.html", status=400)


# Sessions cannot be checked (the session store is down): signed-in requests fail closed with this, never pass.
SESSION_STORE_RETRY_AFTER_SECONDS = 5


def _unavailable(request: HttpRequest, *, code: str, message: str, template: str, retry_after: int) -> HttpResponse:
    """A 503 that clients and load balancers retry: the API's error shape under /api/, a page elsewhere."""
    if _is_api(request):
        response: HttpResponse = JsonResponse(error_body(code, message), status=503)
    else:
        response = render(request, template, status=503)
    response["Retry-After"] = str(retry_after)
    response["Cache-Control"] = "no-store"
    return response


def service_unavailable(request: HttpRequest) -> HttpResponse:
    return _unavailable(
        request,
        code="session_store_unavailable",
        message="Sign-in cannot be checked right now; try again shortly.",
        template="errors/503.html",
        retry_after=SESSION_STORE_RETRY_AFTER_SECONDS,
    )


def database_unavailable(request: HttpRequest) -> HttpResponse:
    return _unavailable(
        request,
        code=DATABASE_UNAVAILABLE_CODE,
        message=DATABASE_UNAVAILABLE_MESSAGE,
        template="errors/503_database.html",
        retry_after=DATABASE_RETRY_AFTER_SECONDS,
    )


def server_error(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    # Django calls this handler inside its ``except`` block: a database that went away (found by the deployment
    # drill: PostgreSQL restarting answered every request 500) is the 503 a client and a load balancer retry.
    if isinstance(sys.exc_info()[1], (OperationalError, InterfaceError)):
        logger.warning("database unavailable: %s answered 503", request.path)
        return database_unavailable(request)
    if _is_api(request):
        return JsonResponse(error_body("server_error", "Something went wrong on our side."), status=500)
    return render(request, "errors/500.html", status=500)
