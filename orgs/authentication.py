"""The one authentication path: a request, a websocket scope or an SSE request → a principal → an org context.

Credentials, and nothing else:

* an **org API key** in ``x-api-key`` or ``Authorization: Bearer`` (IDEs, CLIs, SDKs);
* the **session token** cookie of a signed-in browser (``orgs.sessions``; the middleware has checked it for HTTP
  requests, ``principal_for_scope`` checks it for websockets).

Refused the same way everywhere (REST, pages, websockets, SSE, the OpenAI-compatible proxy): a key header sent
twice (Django joins repeated headers with a comma, so does ``scope_headers``), ``x-api-key`` and a Bearer key that
disagree, and a key in the query string (URLs end up in logs). A presented key that is invalid is a failure,
never a fallback to the session. Used by DRF (``OrgAuthentication``), the page mixin and the context processor
(``orgs.tenancy.context_for_session``), the consumers and SSE streams (``principal_for_scope``, ``revalidate``)
and the OpenAI-compatible proxy (``aapi_key_verify``: keys only, sessions refused, on the event loop).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl

from django.http import HttpRequest
from django.http.cookie import parse_cookie
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from cesaflow.lib import row_cache
from cesaflow.lib.hops import db_hop
from orgs import api_key_cache
from orgs.models import ApiKey, User
from orgs.permissions import RUNS_READ
from orgs.selectors import api_key_get_active_by_secret
from orgs.services import api_key_record_use, api_key_use_due
from orgs.sessions.middleware import session_cookies
from orgs.sessions.services import session_authenticate, session_is_live
from orgs.sessions.store import SessionRecord
from orgs.tenancy import OrgContext, context_for_api_key, context_for_user
from orgs.tokens import MAX_KEY_LENGTH, PREFIX, api_key_digest, parse_api_key

if TYPE_CHECKING:
    from drf_spectacular.openapi import AutoSchema

# Query parameters that look like someone put a credential in the URL.
QUERY_CREDENTIAL_NAMES: Final = frozenset(
    {"api_key", "apikey", "api-key", "x-api-key", "x_api_key", "access_token", "token", "bearer", "authorization"}
)

INVALID_API_KEY_CODE: Final = "unauthenticated"

# Websocket close codes for credentials (the consumers use them at connect and on re-validation).
CLOSE_UNAUTHENTICATED: Final = 4401
CLOSE_FORBIDDEN: Final = 4403


class AuthenticationError(Exception):
    """Credentials that cannot be accepted. ``code`` is the REST API's error code (every invalid key gets the same
    ``unauthenticated``; the proxy says ``invalid_api_key`` as OpenAI does)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_api_key() -> AuthenticationError:
    return AuthenticationError(INVALID_API_KEY_CODE, "Invalid API key.")


def _ambiguous() -> AuthenticationError:
    return AuthenticationError(
        "ambiguous_credentials", "Send one API key, in one header: x-api-key or Authorization: Bearer."
    )


def _in_url() -> AuthenticationError:
    return AuthenticationError(
        "credentials_in_url", "API keys go in the x-api-key or Authorization header, never in the URL."
    )


@dataclass(frozen=True)
class KeyPrincipal:
    """An org API key presented valid."""

    api_key: ApiKey

    @property
    def actor(self) -> ApiKey:
        return self.api_key


@dataclass(frozen=True)
class SessionPrincipal:
    """A user with a live session."""

    user: User
    session: SessionRecord

    @property
    def actor(self) -> User:
        return self.user


# Who presented valid credentials.
Principal = KeyPrincipal | SessionPrincipal


# --- Reading credentials -------------------------------------------------------------------------------------------


def presented_api_key(headers: Mapping[str, str], query: Iterable[tuple[str, str]] = ()) -> str | None:
    """The org API key the client sent, None if it sent none; ``AuthenticationError`` if it sent one badly."""
    for name, value in query:
        if name.lower() in QUERY_CREDENTIAL_NAMES or PREFIX in value:
            raise _in_url()
    x_api_key = headers.get("x-api-key")
    bearer: str | None = None
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            bearer = token.strip()
    presented = [value.strip() for value in (x_api_key, bearer) if value is not None]
    if any("," in value for value in presented):
        raise _ambiguous()  # the header came twice (joined with a comma): never guess which one counts
    if len(presented) == 2 and presented[0] != presented[1]:
        raise _ambiguous()
    return presented[0] if presented else None


def scope_headers(scope: Mapping[str, Any]) -> dict[str, str]:
    """A websocket scope's headers by lower-case name, repeated ones joined with a comma (as Django does)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers") or ():
        name = bytes(raw_name).decode("latin-1").lower()
        value = bytes(raw_value).decode("latin-1")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers


def scope_query(scope: Mapping[str, Any]) -> list[tuple[str, str]]:
    raw = scope.get("query_string") or b""
    return parse_qsl(bytes(raw).decode("latin-1"), keep_blank_values=True)


def request_api_key(request: HttpRequest) -> str | None:
    """``presented_api_key`` for an HTTP request (headers and query string)."""
    query = [(name, value) for name, values in request.GET.lists() for value in values]
    return presented_api_key(request.headers, query)


def api_key_verify(presented: str) -> ApiKey:
    """The active key for a presented value (sync), its use recorded; ``AuthenticationError`` otherwise. A key
    verified recently is answered from ``orgs.api_key_cache`` while nothing about keys, orgs or users changed."""
    digest = _presented_digest(presented)
    token = row_cache.generation()
    api_key = api_key_cache.recall(digest=digest, token=token)
    if api_key is None or not api_key.is_active():
        api_key = api_key_get_active_by_secret(secret=presented)
        if api_key is None:
            api_key_cache.forget(digest=digest)  # held no more (``api_key_held``): its limits stop counting it
            raise invalid_api_key()
        api_key_cache.remember(digest=digest, api_key=api_key, token=token)
    api_key_record_use(api_key=api_key)
    api_key_cache.touch(digest=digest, api_key=api_key)
    return api_key


async def aapi_key_verify(presented: str, *, token: str | None) -> ApiKey:
    """``api_key_verify`` for the gateway's event loop, given the authorization generation the caller just read
    (``row_cache.ageneration``): a cached key whose use needs no new record costs no thread hop; anything else
    takes the sync path."""
    api_key = api_key_cache.recall(digest=_presented_digest(presented), token=token)
    if api_key is not None and _usable_unrecorded(api_key):
        return api_key
    return await db_hop(api_key_verify)(presented)


def _usable_unrecorded(api_key: ApiKey) -> bool:
    """A cached key that is active now and whose use now needs no new record (``api_key_use_due``)."""
    now = timezone.now()
    return api_key.is_active(now) and not api_key_use_due(api_key=api_key, now=now)


def api_key_held(presented: str) -> tuple[str, ApiKey] | None:
    """The key this process verified recently for ``presented`` and the authorization generation it was verified
    under, when using it now needs no new record: **not trusted yet**. A caller that reads the current generation
    anyway, in a round trip of its own made after this (the rate limits'), trusts the key only if the two are the
    same, exactly as ``api_key_verify`` and ``aapi_key_verify`` would have after reading it first; otherwise (also
    when the generation could not be read) it verifies the key with one of them. Raises ``AuthenticationError`` for
    a malformed key."""
    held = api_key_cache.held(digest=_presented_digest(presented))
    return held if held is not None and _usable_unrecorded(held[1]) else None


def _presented_digest(presented: str) -> str:
    if not presented or len(presented) > MAX_KEY_LENGTH or parse_api_key(presented) is None:
        raise invalid_api_key()
    return api_key_digest(presented)


# --- Principals ------------------------------------------------------------------------------------------------------


def principal_for_request(request: HttpRequest, *, sessions: bool = True) -> Principal | None:
    """The principal of an HTTP request (sync: an API key costs a DB read). The session comes from
    ``SessionTokenMiddleware``, which has already checked it against the store. ``sessions=False``: only API keys
    count (the CSRF-exempt proxy must never be driven by a cookie)."""
    presented = request_api_key(request)
    if presented is not None:
        return KeyPrincipal(api_key_verify(presented))
    record: SessionRecord | None = getattr(request, "cf_session", None)
    user = getattr(request, "user", None)
    if sessions and record is not None and isinstance(user, User):
        return SessionPrincipal(user, record)
    return None


def principal_for_scope(scope: Mapping[str, Any]) -> Principal | None:
    """The principal of a websocket handshake (sync: DB and session store). Raises ``AuthenticationError`` for
    badly presented or invalid keys and ``SessionStoreUnavailable`` when sessions cannot be checked."""
    headers = scope_headers(scope)
    presented = presented_api_key(headers, scope_query(scope))
    if presented is not None:
        return KeyPrincipal(api_key_verify(presented))
    access, refresh = session_cookies(parse_cookie(headers.get("cookie", "")))
    state = session_authenticate(access=access, refresh=refresh)
    if state.user is None or state.record is None:
        return None
    return SessionPrincipal(state.user, state.record)


async def aprincipal_and_context_for_scope(scope: Mapping[str, Any]) -> tuple[Principal | None, OrgContext | None]:
    """``principal_for_scope`` and ``org_context_for`` from the event loop: an org API key verified recently costs
    no thread hop (``aapi_key_verify``, as the gateway's), anything else one. Raises as ``principal_for_scope``."""
    presented = presented_api_key(scope_headers(scope), scope_query(scope))
    if presented is not None:
        principal = KeyPrincipal(await aapi_key_verify(presented, token=await row_cache.ageneration()))
        return principal, org_context_for(principal)
    return await db_hop(_principal_and_context)(scope)


def _principal_and_context(scope: Mapping[str, Any]) -> tuple[Principal | None, OrgContext | None]:
    principal = principal_for_scope(scope)
    return principal, org_context_for(principal) if principal is not None else None


def org_context_for(principal: Principal) -> OrgContext | None:
    """The org context of a principal: the key's org and scopes, or the session's current org and the user's role
    there (None: a signed-in user of no organization)."""
    if isinstance(principal, KeyPrincipal):
        return context_for_api_key(principal.api_key)
    return context_for_user(principal.user, org_id=principal.session.org_id or None)


def _current(principal: Principal, *, org_id: str) -> tuple[bool, OrgContext | None]:
    """(are the credentials still live?, the principal's context in ``org_id`` as of now)."""
    if isinstance(principal, KeyPrincipal):
        key = ApiKey.objects.select_related("org", "created_by").filter(pk=principal.api_key.pk).first()
        if key is None or (key.created_by is not None and not key.created_by.is_active):
            return False, None
        return _key_current(key, org_id=org_id)
    user = User.objects.filter(pk=principal.user.pk, is_active=True).first()
    if user is None or not session_is_live(key=principal.session.key, user_id=str(user.pk)):
        return False, None
    return True, context_for_user(user, org_id=org_id, fallback=False)


def _key_current(key: ApiKey, *, org_id: str) -> tuple[bool, OrgContext | None]:
    if not key.is_active():
        return False, None
    context = context_for_api_key(key)
    return True, context if str(context.org.pk) == org_id else None


def context_now(principal: Principal, *, org_id: str) -> OrgContext | None:
    """The principal's context in ``org_id`` as of now, for an action on a long-open stream (None: not any more)."""
    return _current(principal, org_id=org_id)[1]


def revalidate(principal: Principal, context: OrgContext, *, capability: str = RUNS_READ) -> int | None:
    """For an open stream: None if ``principal`` may still use ``capability`` in ``context``'s org, else the
    websocket close code (4401 credentials gone, 4403 rights gone or the org suspended). Sync (DB and session
    store); raises ``SessionStoreUnavailable`` (callers treat it as gone: fail closed)."""
    return _verdict(*_current(principal, org_id=str(context.org.pk)), capability=capability)


def _verdict(live: bool, fresh: OrgContext | None, *, capability: str) -> int | None:
    if not live:
        return CLOSE_UNAUTHENTICATED
    if fresh is None or fresh.org.is_suspended or not fresh.can(capability):
        return CLOSE_FORBIDDEN
    return None


@dataclass(frozen=True)
class CachedVerdict:
    refused: int | None  # ``revalidate``'s answer


def revalidate_cached(
    principal: Principal, context: OrgContext, *, token: str | None, capability: str = RUNS_READ
) -> CachedVerdict | None:
    """``revalidate`` answered on the event loop, without the database, when it can be: for an org API key still
    in the verified-keys cache for ``token``, the authorization generation read once the stream had joined its
    revocation groups (``row_cache.ageneration``; ``orgs.api_key_cache``, the gateway's cache). None: it cannot be
    (a session, a key not cached, a generation changed since): call ``revalidate``.

    Why a cached answer is as good as the database's right after a stream joined its revocation groups: every
    revocation signal is sent only after the generation has been replaced, after the revocation committed
    (``orgs.revocation``). A signal sent before the stream joined therefore replaced the generation before this
    read, and every entry of the generation read here was remembered from a database read made after that
    revocation committed. A signal sent after the stream joined is heard, and its check reads the database."""
    if not isinstance(principal, KeyPrincipal):
        return None
    cached = api_key_cache.recall(digest=principal.api_key.digest, token=token)
    if cached is None or cached.pk != principal.api_key.pk:
        return None
    return CachedVerdict(_verdict(*_key_current(cached, org_id=str(context.org.pk)), capability=capability))


# --- DRF -------------------------------------------------------------------------------------------------------------


class ApiKeyUser:
    """``request.user`` for a request authenticated by an org API key (the key acts; no person does)."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    pk = None

    def __init__(self, api_key: ApiKey) -> None:
        self.api_key = api_key

    def __str__(self) -> str:
        return f"api-key:{self.api_key.prefix}"


class _CsrfCheck(authentication.SessionAuthentication):
    """DRF's CSRF enforcement for cookie-authenticated API calls (the session token is a cookie like any other)."""


class OrgAuthentication(authentication.BaseAuthentication):
    """The API's only authentication class: an org API key, else the session (with CSRF on unsafe methods)."""

    def authenticate(self, request: Request) -> tuple[Any, ApiKey | SessionRecord] | None:
        try:
            principal = principal_for_request(request._request)
        except AuthenticationError as exc:
            raise exceptions.AuthenticationFailed(exc.message, code=exc.code) from None
        if principal is None:
            return None
        if isinstance(principal, KeyPrincipal):
            return ApiKeyUser(principal.api_key), principal.api_key
        _CsrfCheck().enforce_csrf(request)
        return principal.user, principal.session

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="cesaflow"'


class OrgGateAuthentication(OrgAuthentication):
    """``OrgAuthentication`` for the tenant gate alone (``OrgAPIView``), which confirms what this returns before any
    view runs: an org API key this process verified recently comes back *held* (``api_key_held``), the generation
    it was verified under kept on the request (``held_generation``), and the gate trusts it only once it has read
    the current generation in its rate limits' round trip, or verifies it again (``OrgAPIView.initial``). That saves
    each API request one Redis round trip. Every other view authenticates with ``OrgAuthentication``, which returns
    nothing it has not checked."""

    def authenticate(self, request: Request) -> tuple[Any, ApiKey | SessionRecord] | None:
        try:
            presented = request_api_key(request._request)
            held = None if presented is None else api_key_held(presented)
        except AuthenticationError as exc:
            raise exceptions.AuthenticationFailed(exc.message, code=exc.code) from None
        if held is None:
            return super().authenticate(request)
        generation, api_key = held
        setattr(request, _HELD_GENERATION, generation)
        return ApiKeyUser(api_key), api_key


_HELD_GENERATION: Final = "cf_held_generation"


def held_generation(request: Request) -> str | None:
    """The generation ``OrgGateAuthentication`` held the request's key under; None when it checked the credential
    itself (a session, a key verified just now)."""
    value = getattr(request, _HELD_GENERATION, None)
    return value if isinstance(value, str) else None


# drf-spectacular registers extensions in an untyped __init_subclass__.
class OrgAuthenticationScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """Documents both ways of presenting an org API key in the OpenAPI schema (either one suffices)."""

    target_class = OrgAuthentication
    match_subclasses = True  # OrgGateAuthentication, the tenant gate's
    name = ["apiKeyAuth", "bearerAuth"]

    def get_security_definition(self, auto_schema: AutoSchema) -> list[dict[str, str]]:
        return [
            {"type": "apiKey", "in": "header", "name": "x-api-key"},
            {"type": "http", "scheme": "bearer", "description": "The org API key as a Bearer token."},
        ]

    def get_security_requirement(self, auto_schema: AutoSchema) -> list[dict[str, list[Any]]]:
        return [{"apiKeyAuth": []}, {"bearerAuth": []}]
