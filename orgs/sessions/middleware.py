"""``SessionTokenMiddleware``: who the browser is, from its session cookies, checked against the session store.

It replaces Django's session and authentication middleware. On the way in it sets ``request.user`` (a concrete
user or ``AnonymousUser``: never a lazy object, so nothing later touches the database from async code) and
``request.cf_session`` (the session record, or None). On the way out it writes the cookies a sign-in or a silent
refresh produced, or deletes those of a session that is over. With the store unreachable, a request that
presents session cookies is answered 503 (fail closed); one without any goes on as anonymous.

Nexus paths (``/<NEXUS_PREFIX>/...``) are not the dashboard's: there the dashboard cookies are ignored entirely
(the request stays anonymous here) and ``nexus.middleware`` sets the operator from Nexus's own session.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from django.utils.cache import patch_vary_headers

from cesaflow.lib.middleware import GetResponse, _DualMiddleware, is_nexus_path
from orgs.sessions.services import ANONYMOUS, IssuedCookies, SessionState, session_authenticate, session_bind
from orgs.sessions.store import SessionStoreUnavailable


def session_cookies(cookies: dict[str, str]) -> tuple[str | None, str | None]:
    """(access token, refresh cookie) as presented, or None for each one absent."""
    return cookies.get(settings.SESSION_COOKIE_NAME) or None, cookies.get(settings.SESSION_REFRESH_COOKIE_NAME) or None


def set_session_cookies(response: HttpResponseBase, issue: IssuedCookies) -> None:
    options: dict[str, Any] = {
        "max_age": issue.max_age,
        "path": "/",
        "secure": settings.SESSION_COOKIE_SECURE,
        "httponly": True,
        "samesite": "Lax",  # sent on top-level navigations to us, never on cross-site subrequests
    }
    response.set_cookie(settings.SESSION_COOKIE_NAME, issue.access, **options)
    if issue.refresh is not None:
        response.set_cookie(settings.SESSION_REFRESH_COOKIE_NAME, issue.refresh, **options)


def delete_session_cookies(response: HttpResponseBase) -> None:
    for name in (settings.SESSION_COOKIE_NAME, settings.SESSION_REFRESH_COOKIE_NAME):
        response.delete_cookie(name, path="/", samesite="Lax")


class SessionTokenMiddleware(_DualMiddleware):
    def _unavailable(self, request: HttpRequest) -> HttpResponseBase:
        from cesaflow.views import service_unavailable

        session_bind(request, ANONYMOUS)
        return service_unavailable(request)

    def _finish(self, request: HttpRequest, response: HttpResponseBase, state: SessionState) -> HttpResponseBase:
        issued: IssuedCookies | None = getattr(request, "cf_session_issue", None)  # a sign-in in this request
        if issued is not None:
            set_session_cookies(response, issued)
        elif getattr(request, "cf_session_clear", False):
            delete_session_cookies(response)
        elif state.issue is not None and getattr(request, "cf_session", None) is not None:
            set_session_cookies(response, state.issue)
        if state is not ANONYMOUS or issued is not None:
            patch_vary_headers(response, ("Cookie",))
        return response

    def handle(self, request: HttpRequest, get_response: GetResponse) -> HttpResponseBase:
        if is_nexus_path(request.path_info):
            session_bind(request, ANONYMOUS)
            nexus_response: HttpResponseBase = get_response(request)
            return nexus_response
        access, refresh = session_cookies(request.COOKIES)
        state = ANONYMOUS
        if access or refresh:
            try:
                state = session_authenticate(access=access, refresh=refresh)
            except SessionStoreUnavailable:
                return self._unavailable(request)
        session_bind(request, state)
        return self._finish(request, get_response(request), state)

    async def ahandle(self, request: HttpRequest, call_next: Any) -> HttpResponseBase:
        if is_nexus_path(request.path_info):
            session_bind(request, ANONYMOUS)
            response: HttpResponseBase = await call_next(request)
            return response
        access, refresh = session_cookies(request.COOKIES)
        state = ANONYMOUS
        if access or refresh:
            try:
                # One thread hop for the store and the user row; requests without cookies make none.
                state = await sync_to_async(session_authenticate)(access=access, refresh=refresh)
            except SessionStoreUnavailable:
                return self._unavailable(request)
        session_bind(request, state)
        return self._finish(request, await call_next(request), state)
