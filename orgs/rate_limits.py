"""What is rate limited, per whom, and what a refusal looks like (README "Rate limits"; the counting is
``cesaflow.lib.ratelimit``, the rates are the ``RATE_LIMIT_*`` settings, read at each request).

* Per client IP: sign-up, sign-in attempts (on top of the failed-login lock of ``orgs.login_guard``), invitation
  acceptance — failing **closed** when the cache cannot count (a 503: these create accounts or check passwords, and
  in production their sessions live in that same Redis) — and API calls without a valid credential, failing open.
* Per org API key (or signed-in user) and per organization: the REST API and, with rates of its own, the
  OpenAI-compatible gateway — failing **open** with a log line: a Redis fault must not take the API down, and the
  key and the org are still checked against the database.

An IP past its budget of unauthenticated calls is refused with a valid key too until its window ends, so a guesser
cannot tell a right key from a wrong one by the answer (security.md T22); other addresses are not affected.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import render

from cesaflow.lib import row_cache
from cesaflow.lib.middleware import client_ip
from cesaflow.lib.ratelimit import (
    Bucket,
    Exceeded,
    Rate,
    RateLimited,
    RateLimitUnavailable,
    ahit,
    ahit_and_get,
    hit,
    hit_and_get,
)
from orgs.models import ApiKey
from orgs.tenancy import OrgContext

# Scopes (cache key part, log lines, the API's ``details.scope``) and the settings that rate them.
SIGNUP: Final = "signup"
LOGIN: Final = "login"
INVITATION: Final = "invitation"
API_UNAUTHENTICATED: Final = "api-unauthenticated"
API_KEY: Final = "api-key"
API_ORG: Final = "api-org"
GATEWAY_KEY: Final = "gateway-key"
GATEWAY_ORG: Final = "gateway-org"
SETTINGS: Final = {
    SIGNUP: "RATE_LIMIT_SIGNUP",
    LOGIN: "RATE_LIMIT_LOGIN",
    INVITATION: "RATE_LIMIT_INVITATION",
    API_UNAUTHENTICATED: "RATE_LIMIT_API_UNAUTHENTICATED",
    API_KEY: "RATE_LIMIT_API_KEY",
    API_ORG: "RATE_LIMIT_API_ORG",
    GATEWAY_KEY: "RATE_LIMIT_GATEWAY_KEY",
    GATEWAY_ORG: "RATE_LIMIT_GATEWAY_ORG",
}
WHOSE: Final = {
    API_UNAUTHENTICATED: "per client IP without a valid API key",
    API_KEY: "per API key or signed-in user",
    API_ORG: "per organization",
    GATEWAY_KEY: "per API key",
    GATEWAY_ORG: "per organization",
}
# Seconds a refused form asks the browser to wait when the limits cannot be counted at all.
UNAVAILABLE_RETRY_AFTER: Final = 30


def rate(scope: str) -> Rate | None:
    return Rate.from_setting(getattr(settings, SETTINGS[scope]))


def _buckets(*pairs: tuple[str, str]) -> list[Bucket]:
    found = [(scope, subject, rate(scope)) for scope, subject in pairs]
    return [Bucket(scope, subject, limit) for scope, subject, limit in found if limit is not None]


def _ip(request: HttpRequest) -> str:
    return client_ip(request) or "-"


def message(exceeded: Exceeded) -> str:
    whose = WHOSE.get(exceeded.scope, "from your address")
    return f"Too many requests: the limit is {exceeded.rate} {whose}. Retry in {exceeded.retry_after} s."


# --- Dashboard forms (per IP, fail closed) -----------------------------------------------------------------


def limit_posts(scope: str) -> Callable[[Callable[..., HttpResponseBase]], Callable[..., HttpResponseBase]]:
    """For a public form view's ``dispatch``: each POST counts against ``scope`` for the client IP; past the limit
    the answer is a 429 page with the wait (and ``Retry-After``), when the cache cannot count a 503 page."""

    def decorate(dispatch: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
        @functools.wraps(dispatch)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if request.method == "POST":
                try:
                    exceeded = hit(_buckets((scope, _ip(request))), fail_open=False)
                except RateLimitUnavailable:
                    response = render(request, "errors/503.html", status=503)
                    response["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER)
                    return response
                if exceeded is not None:
                    return _too_many(request, exceeded)
            return dispatch(request, *args, **kwargs)

        return wrapper

    return decorate


def _too_many(request: HttpRequest, exceeded: Exceeded) -> HttpResponse:
    minutes = max(1, -(-exceeded.retry_after // 60))
    response = render(request, "errors/429.html", {"retry_after": exceeded.retry_after, "minutes": minutes}, status=429)
    response["Retry-After"] = str(exceeded.retry_after)
    return response


# --- The REST API and the gateway (fail open) --------------------------------------------------------------


def _call_buckets(context: OrgContext, ip: str, *, gateway: bool) -> tuple[list[Bucket], list[Bucket]]:
    actor = context.actor
    who = f"key:{actor.pk}" if isinstance(actor, ApiKey) else f"user:{actor.pk}"
    key_scope, org_scope = (GATEWAY_KEY, GATEWAY_ORG) if gateway else (API_KEY, API_ORG)
    counted = _buckets((key_scope, who), (org_scope, str(context.org.pk)))
    # A key from an address that used up its unauthenticated budget waits like that address's guesses.
    peeked = _buckets((API_UNAUTHENTICATED, ip)) if isinstance(actor, ApiKey) else []
    return counted, peeked


def api_unauthenticated(request: HttpRequest) -> None:
    """Count a REST call without a valid credential for its client IP; ``RateLimited`` (429) past the limit."""
    exceeded = hit(_buckets((API_UNAUTHENTICATED, _ip(request))), fail_open=True)
    if exceeded is not None:
        raise RateLimited(exceeded, message(exceeded)) from None


async def aapi_unauthenticated(request: HttpRequest) -> Exceeded | None:
    """``api_unauthenticated`` for the gateway (one async round trip)."""
    return await ahit(_buckets((API_UNAUTHENTICATED, _ip(request))), fail_open=True)


def api_call(request: HttpRequest, context: OrgContext) -> None:
    """Count an authenticated REST call per key (or user) and per org; ``RateLimited`` (429) past a limit."""
    counted, peeked = _call_buckets(context, _ip(request), gateway=False)
    exceeded = hit(counted, peeked=peeked, fail_open=True)
    if exceeded is not None:
        raise RateLimited(exceeded, message(exceeded))


def api_call_and_generation(request: HttpRequest, context: OrgContext) -> tuple[Exceeded | None, str | None]:
    """``api_call``'s count, and the authorization generation read in its round trip (``row_cache.token_of``: None
    if it cannot be read); the limit it exceeds is returned, for the caller to raise once it trusts ``context``."""
    counted, peeked = _call_buckets(context, _ip(request), gateway=False)
    exceeded, value = hit_and_get(counted, peeked=peeked, fail_open=True, key=row_cache.GENERATION_KEY)
    return exceeded, row_cache.token_of(value)


async def agateway_call(
    request: HttpRequest, context: OrgContext, *, generation: bool
) -> tuple[Exceeded | None, str | None]:
    """Count a gateway call per key and per org, in one async round trip; the limit it exceeds, if any, and with
    ``generation`` the authorization generation read in that round trip (``row_cache.token_of``: None if it cannot
    be read, or was not asked for)."""
    counted, peeked = _call_buckets(context, _ip(request), gateway=True)
    key = row_cache.GENERATION_KEY if generation else None
    exceeded, value = await ahit_and_get(counted, peeked=peeked, fail_open=True, key=key)
    return exceeded, row_cache.token_of(value)


# --- The org's settings page --------------------------------------------------------------------------------


def limits_for_display() -> list[str]:
    """The limits that apply to an organization's API keys, in words (read-only, on its settings page)."""
    lines = []
    for label, scopes in (("REST API", (API_KEY, API_ORG)), ("OpenAI-compatible endpoint", (GATEWAY_KEY, GATEWAY_ORG))):
        parts = [f"{limit} {WHOSE[scope]}" for scope in scopes if (limit := rate(scope)) is not None]
        lines.append(f"{label}: {', '.join(parts) if parts else 'no limit'}")
    unauthenticated = rate(API_UNAUTHENTICATED)
    if unauthenticated is not None:
        lines.append(f"Calls without a valid API key: {unauthenticated} per client IP")
    return lines
