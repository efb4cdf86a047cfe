"""Project-wide middleware: security headers Django does not set, and the per-request context (audit trail, logs,
metrics)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.template.loader import render_to_string

from cesaflow.lib import metrics, request_context

access_logger = logging.getLogger("cesaflow.access")

GetResponse = Callable[[HttpRequest], Any]

logger = logging.getLogger("cesaflow.security")
# Whether this process has said that requests carry X-Forwarded-For the settings do not trust (once is enough).
_untrusted_forwarding_logged = False


def client_ip(request: HttpRequest) -> str | None:
    if settings.TRUST_X_FORWARDED_FOR:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        if forwarded:
            # The rightmost entry is the one our proxy appended (the address it saw); everything left of it was
            # sent by the client and can say anything.
            return forwarded.split(",")[-1].strip()[:45] or None
    elif "HTTP_X_FORWARDED_FOR" in request.META:
        _log_untrusted_forwarding()
    return request.META.get("REMOTE_ADDR") or None


def _log_untrusted_forwarding() -> None:
    """A proxy forwards, but its header is ignored: every client looks like the proxy, so one login lock or rate
    limit would hit everyone. Said once per process, at WARNING, without the header's (client-controlled) value."""
    global _untrusted_forwarding_logged  # a once-per-process flag
    if _untrusted_forwarding_logged:
        return
    _untrusted_forwarding_logged = True
    logger.warning(
        "Requests arrive with X-Forwarded-For but CESAFLOW_TRUST_X_FORWARDED_FOR is off: every client gets the "
        "proxy's address, so one login lock or rate limit hits everyone. Set it to true if your proxy sets the "
        "header (README: Configuration)."
    )


def is_nexus_path(path: str) -> bool:
    """Whether a request path belongs to Nexus, the operators' site (``/<NEXUS_PREFIX>/...``). There, the
    dashboard's session is ignored and Nexus's own operator session decides who the request is."""
    if not settings.NEXUS_ENABLED:
        return False
    prefix = f"/{settings.NEXUS_PREFIX}/"
    return path.startswith(prefix) or path == prefix[:-1]


class _DualMiddleware:
    """Base for middleware that works under both WSGI and ASGI without a thread hop."""

    async_capable = True
    sync_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self._is_async:
            return self._acall(request)
        return self.handle(request, self.get_response)

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        async def call_next(req: HttpRequest) -> HttpResponseBase:
            response: HttpResponseBase = await self.get_response(req)
            return response

        return await self.ahandle(request, call_next)

    def handle(self, request: HttpRequest, get_response: GetResponse) -> HttpResponseBase:
        raise NotImplementedError

    async def ahandle(self, request: HttpRequest, call_next: Any) -> HttpResponseBase:
        raise NotImplementedError


class SecurityHeadersMiddleware(_DualMiddleware):
    """X-XSS-Protection: 0 (the auditor is gone and could create XSS; the CSP replaces it) and no caching of
    authenticated or API responses."""

    def _apply(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        response.headers["X-XSS-Protection"] = "0"
        # The session record, not request.user: reading nothing lazy keeps this safe in async code.
        signed_in = getattr(request, "cf_session", None) is not None
        if request.path.startswith("/api/") or signed_in:
            response.headers["Cache-Control"] = "no-store"
        return response

    def handle(self, request: HttpRequest, get_response: GetResponse) -> HttpResponseBase:
        return self._apply(request, get_response(request))

    async def ahandle(self, request: HttpRequest, call_next: Any) -> HttpResponseBase:
        return self._apply(request, await call_next(request))


class MethodNotAllowedPageMiddleware(_DualMiddleware):
    """Django answers a method a view does not take with an empty 405; people get a page (the API its JSON error,
    from DRF or the proxy, untouched). The page is static: rendering it reads nothing, so it is safe in async code."""

    def _apply(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if (
            response.status_code == 405
            and isinstance(response, HttpResponse)
            and not response.content
            and not request.path.startswith("/api/")
        ):
            response.content = render_to_string("errors/405.html").encode()
        return response

    def handle(self, request: HttpRequest, get_response: GetResponse) -> HttpResponseBase:
        return self._apply(request, get_response(request))

    async def ahandle(self, request: HttpRequest, call_next: Any) -> HttpResponseBase:
        return self._apply(request, await call_next(request))


class RequestContextMiddleware(_DualMiddleware):
    """Binds client IP, user agent and a request id for the audit trail and the logs, for the duration of the
    request; answers with the id (``X-Request-Id``, for support), counts the request in the metrics and writes the
    access log line (``CESAFLOW_ACCESS_LOG``: method, the route's pattern, status, time to the response's headers).
    The pattern, never the path: some paths carry a one-time token (an invitation, a sign-up link), and a mistyped
    one is still a token."""

    def _context(self, request: HttpRequest) -> request_context.RequestContext:
        return request_context.RequestContext(
            ip=client_ip(request),
            user_agent=request.META.get("HTTP_USER_AGENT", "")[:256],
            request_id=secrets.token_hex(8),
        )

    def _done(self, request: HttpRequest, response: HttpResponseBase, started: float) -> HttpResponseBase:
        seconds = time.perf_counter() - started
        match = getattr(request, "resolver_match", None)
        route = (match.route or match.view_name) if match is not None else metrics.UNMATCHED
        metrics.observe_request(method=request.method or "", route=route, status=response.status_code, seconds=seconds)
        response["X-Request-Id"] = request_context.current().request_id
        if settings.ACCESS_LOG:
            access_logger.info(
                "%s %s %s",
                request.method,
                route,
                response.status_code,
                extra={
                    "method": request.method,
                    "path": route,
                    "status": response.status_code,
                    "duration_ms": round(seconds * 1000, 1),
                },
            )
        return response

    def handle(self, request: HttpRequest, get_response: GetResponse) -> HttpResponseBase:
        started = time.perf_counter()
        token = request_context.bind(self._context(request))
        try:
            return self._done(request, get_response(request), started)
        finally:
            request_context.unbind(token)

    async def ahandle(self, request: HttpRequest, call_next: Any) -> HttpResponseBase:
        started = time.perf_counter()
        token = request_context.bind(self._context(request))
        try:
            return self._done(request, await call_next(request), started)
        finally:
            request_context.unbind(token)
