"""Dashboard sessions: sign in, authenticate a browser's cookies, refresh, sign out, revoke.

A signed-in browser holds two HttpOnly cookies:

* the **access token** (``settings.SESSION_COOKIE_NAME``): a JWT of at most 15 minutes (``orgs.sessions.tokens``)
  naming the user (``sub``) and the session (``sid``);
* the **refresh cookie** (``settings.SESSION_REFRESH_COOKIE_NAME``): ``<sid>.<secret>``, whose secret's SHA-256 is in
  the session record. It lets the server issue a new access token silently while the session lives.

Every request with these cookies checks the token's signature and expiry **and** that its session record is
in the store (``orgs.sessions.store``), live (idle and absolute deadlines) and belongs to an active user. A
token whose record is gone signs the browser out. The store unreachable raises ``SessionStoreUnavailable``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, replace
from typing import Final

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.contrib.auth.signals import user_logged_in, user_logged_out
from django.db import transaction
from django.http import HttpRequest
from django.middleware.csrf import rotate_token

from cesaflow.lib.middleware import client_ip
from orgs import revocation, signals
from orgs.models import User
from orgs.sessions.store import SessionRecord, SessionStore, session_key, session_store
from orgs.sessions.tokens import TokenExpired, TokenInvalid, token_decode, token_issue

# last_seen (and so the idle deadline) moves at most this often: one store write per minute, not per request.
TOUCH_INTERVAL_SECONDS: Final = 60
MAX_REFRESH_COOKIE_LENGTH: Final = 256


@dataclass(frozen=True)
class IssuedCookies:
    """Cookies the response must set: a new access token, and the refresh cookie when the session is new."""

    access: str
    refresh: str | None
    max_age: int


@dataclass(frozen=True)
class SessionState:
    """What a browser's cookies amount to."""

    user: User | None = None
    record: SessionRecord | None = None
    sid: str | None = None
    issue: IssuedCookies | None = None  # a silently refreshed access token
    clear: bool = False  # cookies were presented but their session is over: delete them

    @property
    def signed_in(self) -> bool:
        return self.user is not None and self.record is not None


ANONYMOUS: Final = SessionState()
SIGNED_OUT: Final = SessionState(clear=True)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _device(user_agent: str) -> str:
    """ "Firefox on Windows" from a user agent, for the Sessions page (ua-parser's maintained regexes)."""
    if not user_agent:
        return "Unknown device"
    from ua_parser import parse  # imported on sign-in only: loading its rules takes a moment

    result = parse(user_agent)
    browser = result.user_agent.family if result.user_agent else ""
    system = result.os.family if result.os else ""
    if browser and system:
        return f"{browser} on {system}"[:100]
    return (browser or system or user_agent[:60])[:100]


def _max_age(record: SessionRecord, now: float) -> int:
    return max(1, int(record.absolute_expiry - now))


def _split_refresh(value: str) -> tuple[str, str] | None:
    if not value or len(value) > MAX_REFRESH_COOKIE_LENGTH:
        return None
    sid, sep, secret = value.partition(".")
    if not sep or not sid or not secret:
        return None
    return sid, secret


def _located(
    access: str | None, refresh: str | None, store: SessionStore, now: float
) -> tuple[SessionRecord, str, bool] | None:
    """(record, sid, renew the access token?) for the cookies, or None if they name no session of ours."""
    if access:
        try:
            claims = token_decode(access)
        except TokenExpired:
            pass  # the refresh cookie may renew it
        except TokenInvalid:
            return None  # forged or tampered: never fall back to the refresh cookie
        else:
            record = store.get(session_key(claims.sid))
            if record is None or record.user_id != claims.sub:
                return None
            return record, claims.sid, claims.exp - now < float(settings.SESSION_TOKEN_SECONDS) / 2
    parts = _split_refresh(refresh or "")
    if parts is None:
        return None
    sid, secret = parts
    record = store.get(session_key(sid))
    if record is None or not hmac.compare_digest(record.refresh_hash, _digest(secret)):
        return None
    return record, sid, True


def session_authenticate(*, access: str | None, refresh: str | None, now: float | None = None) -> SessionState:
    """The session behind a browser's cookies (DB and store reads; sync). Raises ``SessionStoreUnavailable``."""
    if not access and not refresh:
        return ANONYMOUS
    now = time.time() if now is None else now
    store = session_store()
    located = _located(access, refresh, store, now)
    if located is None:
        return SIGNED_OUT
    record, sid, renew = located
    if not record.is_live(now):
        store.delete(record.key, user_id=record.user_id)
        return SIGNED_OUT
    user = User.objects.filter(pk=record.user_id, is_active=True).first()
    if user is None:
        store.delete(record.key, user_id=record.user_id)
        return SIGNED_OUT
    if now - record.last_seen >= TOUCH_INTERVAL_SECONDS:
        if not store.update(record.key, now=now, last_seen=now):
            return SIGNED_OUT  # revoked in the meantime
        record = replace(record, last_seen=now)
    issue = None
    if renew:
        token, _ = token_issue(user_id=str(user.pk), sid=sid, now=now)
        issue = IssuedCookies(access=token, refresh=None, max_age=_max_age(record, now))
    return SessionState(user=user, record=record, sid=sid, issue=issue)


def session_is_live(*, key: str, user_id: str, now: float | None = None) -> bool:
    """For open streams: is this session still there, live and its user's? (store read; sync)."""
    now = time.time() if now is None else now
    record = session_store().get(key)
    return record is not None and record.user_id == user_id and record.is_live(now)


def session_sign_in(request: HttpRequest, user: User) -> SessionRecord:
    """Starts a new session for ``user`` on this browser (a new ``sid`` every time: no fixation). The middleware
    sets the cookies on the response."""
    now = time.time()
    previous: SessionRecord | None = getattr(request, "cf_session", None)
    store = session_store()
    if previous is not None:
        store.delete(previous.key, user_id=previous.user_id)
    sid = secrets.token_urlsafe(32)
    refresh_secret = secrets.token_urlsafe(32)
    user_agent = request.META.get("HTTP_USER_AGENT", "")[:256]
    record = SessionRecord(
        key=session_key(sid),
        user_id=str(user.pk),
        created=now,
        last_seen=now,
        absolute_expiry=now + float(settings.SESSION_ABSOLUTE_SECONDS),
        refresh_hash=_digest(refresh_secret),
        ip=client_ip(request) or "",
        user_agent=user_agent,
        device=_device(user_agent),
    )
    store.create(record, now=now)
    token, _ = token_issue(user_id=str(user.pk), sid=sid, now=now)
    session_bind(request, SessionState(user=user, record=record, sid=sid))
    request.cf_session_issue = IssuedCookies(  # type: ignore[attr-defined]
        access=token, refresh=f"{sid}.{refresh_secret}", max_age=_max_age(record, now)
    )
    rotate_token(request)  # a new CSRF secret with the new session
    user_logged_in.send(sender=User, request=request, user=user)
    return record


def session_sign_out(request: HttpRequest) -> None:
    """Ends this browser's session (server-side) and has the middleware delete its cookies."""
    record: SessionRecord | None = getattr(request, "cf_session", None)
    user = getattr(request, "user", None)
    if record is not None:
        session_store().delete(record.key, user_id=record.user_id)
        revocation.signal_user(record.user_id)
    user_logged_out.send(sender=User, request=request, user=user if isinstance(user, User) else None)
    session_bind(request, SIGNED_OUT)


def session_set_org(request: HttpRequest, org_id: str) -> None:
    """Remembers the org this browser works in (the tenant gate re-checks membership on every request)."""
    record: SessionRecord | None = getattr(request, "cf_session", None)
    if record is None:
        return
    session_store().update(record.key, now=time.time(), org_id=org_id)
    request.cf_session = replace(record, org_id=org_id)  # type: ignore[attr-defined]


def sessions_for_user(*, user: User) -> list[SessionRecord]:
    now = time.time()
    records = [record for record in session_store().for_user(str(user.pk)) if record.is_live(now)]
    return sorted(records, key=lambda record: record.last_seen, reverse=True)


def session_revoke(*, user: User, key: str, actor: User) -> bool:
    """Ends one of ``user``'s sessions (the Sessions page's per-row revoke). False if it was not theirs or gone."""
    store = session_store()
    record = store.get(key)
    if record is None or record.user_id != str(user.pk):
        return False
    store.delete(key, user_id=record.user_id)
    transaction.on_commit(lambda: revocation.signal_user(str(user.pk)))
    signals.session_revoked.send(sender=User, org=None, actor=actor, user=user, device=record.device, count=1)
    return True


def sessions_revoke_all(*, user: User, actor: User | None, keep: str | None = None, reason: str) -> int:
    """Ends every session of ``user`` except ``keep`` (a key). ``reason``: ``signed_out_everywhere`` or
    ``password_changed``. Audited; open streams of those sessions close within seconds."""
    doomed = session_store().delete_for_user(str(user.pk), keep=keep)
    transaction.on_commit(lambda: revocation.signal_user(str(user.pk)))
    signals.sessions_ended.send(sender=User, org=None, actor=actor, user=user, count=len(doomed), reason=reason)
    return len(doomed)


def session_bind(request: HttpRequest, state: SessionState) -> None:
    """Puts a session state on the request (``request.user``, ``request.cf_session``)."""
    user: User | AnonymousUser = state.user if state.user is not None and state.record else AnonymousUser()
    request.user = user
    request.cf_session = state.record  # type: ignore[attr-defined]
    request.cf_sid = state.sid  # type: ignore[attr-defined]
    if state.clear:
        request.cf_session_clear = True  # type: ignore[attr-defined]
        request.cf_session_issue = None  # type: ignore[attr-defined]

    async def auser() -> User | AnonymousUser:
        return user

    request.auser = auser
