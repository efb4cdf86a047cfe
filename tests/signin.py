"""Signed-in test clients through the real session path (``orgs.sessions``): a session record in the store and
the two cookies a browser would hold after signing in."""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.test import RequestFactory

from orgs.models import User
from orgs.sessions.services import ANONYMOUS, IssuedCookies, session_bind, session_sign_in
from orgs.sessions.store import SessionRecord, session_key, session_store
from orgs.sessions.tokens import token_decode


def session_cookies_for(user: User, *, user_agent: str = "pytest") -> dict[str, str]:
    request = RequestFactory().get("/", HTTP_USER_AGENT=user_agent)
    session_bind(request, ANONYMOUS)
    session_sign_in(request, user)
    issued: IssuedCookies = request.cf_session_issue  # type: ignore[attr-defined]
    assert issued.refresh is not None
    return {settings.SESSION_COOKIE_NAME: issued.access, settings.SESSION_REFRESH_COOKIE_NAME: issued.refresh}


def sign_in(client: Any, user: User) -> dict[str, str]:
    """Signs ``user`` in on a Django test client (or DRF's APIClient); returns the cookies set."""
    cookies = session_cookies_for(user)
    for name, value in cookies.items():
        client.cookies[name] = value
    return cookies


def cookie_header(cookies: dict[str, str]) -> tuple[bytes, bytes]:
    """A ``cookie`` header for a websocket handshake."""
    return b"cookie", "; ".join(f"{name}={value}" for name, value in cookies.items()).encode()


def record_for(cookies: dict[str, str]) -> SessionRecord | None:
    """The session record behind a set of session cookies (None: that session is over)."""
    access = cookies.get(settings.SESSION_COOKIE_NAME)
    if not access:
        return None
    return session_store().get(session_key(token_decode(access).sid))


def session_of(client: Any) -> SessionRecord | None:
    """The session record behind a test client's cookies (None: signed out or never signed in)."""
    return record_for({name: morsel.value for name, morsel in client.cookies.items()})


def set_session_org(client: Any, org_id: object) -> None:
    """What a session remembers as its current org, set directly (as a stale or tampered value would be)."""
    record = session_of(client)
    assert record is not None
    session_store().update(record.key, now=time.time(), org_id=str(org_id))
