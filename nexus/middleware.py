"""``NexusSessionMiddleware``: who a request to ``/<NEXUS_PREFIX>/...`` is, from the Nexus cookie alone.

On Nexus paths, in this order:

1. a client IP outside ``NEXUS_ALLOWED_IPS`` (when set) gets the ordinary 404 page: Nexus looks absent;
2. the dashboard's session is ignored (``SessionTokenMiddleware`` skips these paths) and ``request.user`` becomes
   the operator of a live Nexus session, or ``AnonymousUser``; ``request.nexus_operator`` the same or None;
3. with the session store unreachable, a request presenting a Nexus cookie gets 503 (fail closed);
4. on the way out: the cookie a sign-in issued, or the deletion of one that is over; ``Cache-Control: no-store``.

Everywhere else it does nothing, and nothing outside Nexus reads the Nexus cookie (which browsers only send to
the Nexus path anyway).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http import HttpRequest, HttpResponseBase
from django.utils.cache import add_never_cache_headers, patch_vary_headers

from cesaflow.lib.middleware import GetResponse, _DualMiddleware, client_ip, is_nexus_path
from nexus.models import Operator
from nexus.sessions import (
    NO_SESSION,
    OperatorSession,
    OperatorSessionState,
    SessionStoreUnavailable,
    operator_session_authenticate,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class IssuedCookie:
    token: str
    max_age: int


@lru_cache(maxsize=8)
def _networks(entries: tuple[str, ...]) -> tuple[Network, ...] | None:
    """The allowlist as networks; None if an entry is invalid (then nobody is allowed: fail closed)."""
    try:
        return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)
    except ValueError:
        return None


def ip_allowed(ip: str | None) -> bool:
    entries = tuple(settings.NEXUS_ALLOWED_IPS)
    if not entries:
        return True
    networks = _networks(entries)
    if not networks or not ip:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


def nexus_cookie_path() -> str:
    return f"/{settings.NEXUS_PREFIX}/"


def set_nexus_cookie(response: HttpResponseBase, issued: IssuedCookie) -> None:
    response.set_cookie(
        settings.NEXUS_COOKIE_NAME,
        issued.token,
        max_age=issued.max_age,
        path=nexus_cookie_path(),
        secure=settings.SESSION_COOKIE_SECURE,
        httponly=True,
        samesite="Strict",  # never sent on a request another site starts, not even a top-level navigation
    )


def delete_nexus_cookie(response: HttpResponseBase) -> None:
    response.delete_cookie(settings.NEXUS_COOKIE_NAME, path=nexus_cookie_path(), samesite="Strict")


def operator_bind(request: HttpRequest, state: OperatorSessionState) -> None:
    """Puts an operator session state on the request (``request.user``, ``request.nexus_operator``)."""
    operator: Operator | None = state.operator if state.record is not None else None
    user: Operator | AnonymousUser = operator if operator is not None else AnonymousUser()
    request.user = user  # type: ignore[assignment]
    request.nexus_operator = operator  # type: ignore[attr-defined]
    request.nexus_session = state.record  # type: ignore[attr-defined]
    request.cf_session = None  # type: ignore[attr-defined]  # never a dashboard session on Nexus paths
    if state.clear:
        request.nexus_clear = True  # type: ignore[attr-defined]

    async def auser() -> Operator | AnonymousUser:
        return user

    request.auser = auser  # type: ignore[assignment]


def issue_cookie(request: HttpRequest, *, token: str, record: OperatorSession, now: float) -> None:
    """Has the middleware set the Nexus cookie of a session started in this request."""
    request.nexus_issue = IssuedCookie(token=token, max_age=max(1, int(record.absolute_expiry - now)))  # type: ignore[attr-defined]


class NexusSessionMiddleware(_DualMiddleware):
    def _refused(self, request: HttpRequest) -> HttpResponseBase:
        from cesaflow.views import page_not_found

        operator_bind(request, NO_SESSION)
        return page_not_found(request)

    def _unavailable(self, request: HttpRequest) -> HttpResponseBase:
        from cesaflow.views import service_unavailable

        operator_bind(request, NO_SESSION)
        return self._finish(request, service_unavailable(request))

    def _finish(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        issued: IssuedCookie | None = getattr(request, "nexus_issue", None)
        if issued is not None:
            set_nexus_cookie(response, issued)
        elif getattr(request, "nexus_clear", False):
            delete_nexus_cookie(response)
        add_never_cache_headers(response)  # Cache-Control: no-store (and private, max-age=0) on every Nexus page
        patch_vary_headers(response, ("Cookie",))
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponseBase | None:
        # A view that reaches the store (sign-in, sign-out) and finds it down: 503, as for a presented cookie.
        if isinstance(exception, SessionStoreUnavailable) and is_nexus_path(request.path_info):
            from cesaflow.views import service_unavailable

            return service_unavailable(request)
        return None

    def handle(self, request: HttpRequest, get_response: GetResponse) -> HttpResponseBase:
        if not is_nexus_path(request.path_info):
            response: HttpResponseBase = get_response(request)
            return response
        if not ip_allowed(client_ip(request)):
            return self._refused(request)
        try:
            state = operator_session_authenticate(request.COOKIES.get(settings.NEXUS_COOKIE_NAME))
        except SessionStoreUnavailable:
            return self._unavailable(request)
        operator_bind(request, state)
        return self._finish(request, get_response(request))

    async def ahandle(self, request: HttpRequest, call_next: Any) -> HttpResponseBase:
        if not is_nexus_path(request.path_info):
            response: HttpResponseBase = await call_next(request)
            return response
        if not ip_allowed(client_ip(request)):
            return self._refused(request)
        token = request.COOKIES.get(settings.NEXUS_COOKIE_NAME)
        try:
            state = await sync_to_async(operator_session_authenticate)(token) if token else NO_SESSION
        except SessionStoreUnavailable:
            return self._unavailable(request)
        operator_bind(request, state)
        return self._finish(request, await call_next(request))
