"""Rate limits (issue #14 point 1, security.md T22): 429 with ``Retry-After`` on every limited route, in each route's
own shape, counted in the real Redis; the windows end; the org's settings page shows the limits; a Redis fault fails
open on the API and closed on sign-in.

Limits are lowered per test with ``settings`` (the in-thread ASGI server reads them at each request) or, for the
production server in a subprocess, with its ``CESAFLOW_RATE_LIMIT_*`` environment. Where a test must stay inside one
window, the clock is frozen (Django's test client) or the window is a day long (real servers): windows are aligned to
the clock, and nothing here depends on how fast requests go.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from django.core.cache import cache, caches
from django.urls import reverse
from django.utils import timezone
from freezegun import freeze_time
from rest_framework.test import APIClient

from cesaflow.lib import ratelimit, row_cache
from orgs.models import ApiKey
from tests.live_server import LiveServer, live_server
from tests.runs.proxy_support import AsgiServer, serving

RUNS = "/api/v1/runs"
DAY = 86400
FLOODER = "203.0.113.9"
ELSEWHERE = "198.51.100.7"


def _retry_after(response) -> int:
    value = response["Retry-After"] if hasattr(response, "__getitem__") else response.headers["retry-after"]
    assert re.fullmatch(r"[1-9][0-9]*", value), value
    return int(value)


def _bad_key(n: int) -> str:
    # Well-formed (so each one costs a database lookup, like a real guess) and wrong.
    return f"cf_live_{n:08d}guessguessguessguessguessguess{n:04d}"


# --- Dashboard forms, per client IP ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_signup_posts_past_the_limit_get_a_429_page_with_retry_after(client, settings):
    settings.RATE_LIMIT_SIGNUP = (3, 3600)
    url = reverse("orgs:signup")
    for _ in range(3):
        assert client.post(url, {"email": "not-an-address"}).status_code == 200  # the form's own errors
    refused = client.post(url, {"email": "not-an-address"})
    assert refused.status_code == 429
    assert 1 <= _retry_after(refused) <= 3600
    assert b"Too many attempts" in refused.content
    # Another address is not affected.
    assert client.post(url, {"email": "not-an-address"}, REMOTE_ADDR=ELSEWHERE).status_code == 200


@pytest.mark.django_db
def test_login_attempts_past_the_limit_get_429_even_with_the_right_password(client, cast, settings):
    settings.RATE_LIMIT_LOGIN = (3, 60)
    url = reverse("orgs:login")
    for n in range(3):  # different accounts: the failed-login lock is not what answers here
        assert client.post(url, {"email": f"nobody{n}@a.example", "password": "wrong"}).status_code == 200
    refused = client.post(url, {"email": cast.admin_a.user.email, "password": "correct horse battery staple 42"})
    assert refused.status_code == 429
    assert 1 <= _retry_after(refused) <= 60
    assert settings.SESSION_COOKIE_NAME not in refused.cookies  # not signed in


@pytest.mark.django_db
def test_invitation_acceptance_past_the_limit_gets_429(client, settings):
    settings.RATE_LIMIT_INVITATION = (2, 3600)
    url = reverse("orgs:invite_accept", kwargs={"token": "no-such-invitation"})
    assert [client.post(url, {"password": "x"}).status_code for _ in range(2)] == [410, 410]
    refused = client.post(url, {"password": "x"})
    assert refused.status_code == 429
    assert 1 <= _retry_after(refused) <= 3600
    assert client.get(url).status_code == 410  # only submissions count: the page still opens


@pytest.mark.django_db
def test_a_form_window_ends_and_posts_are_served_again(client, settings):
    settings.RATE_LIMIT_LOGIN = (1, 60)
    url = reverse("orgs:login")
    with freeze_time("2026-03-01 12:00:10") as clock:
        assert client.post(url, {"email": "a@a.example", "password": "x"}).status_code == 200
        refused = client.post(url, {"email": "a@a.example", "password": "x"})
        assert refused.status_code == 429
        assert _retry_after(refused) == 50  # windows are aligned to the clock: this one ends at 12:01:00
        clock.tick(50)
        assert client.post(url, {"email": "a@a.example", "password": "x"}).status_code == 200


# --- The REST API ---------------------------------------------------------------------------------------------------


def _assert_rate_limited(response, *, scope: str, limit: int, window: int) -> None:
    assert response.status_code == 429, response.content
    error = response.json()["error"]
    assert error["code"] == "rate_limited"
    assert error["details"] == {
        "scope": scope,
        "limit": limit,
        "window": window,
        "retry_after": _retry_after(response),
    }
    assert 1 <= error["details"]["retry_after"] <= window


@pytest.mark.django_db
def test_rest_api_per_key_limit_gives_429_in_the_one_error_shape(cast, settings):
    settings.RATE_LIMIT_API_KEY = (3, 60)
    dev = cast.dev_a.api()
    assert [dev.get(RUNS).status_code for _ in range(3)] == [200, 200, 200]
    _assert_rate_limited(dev.get(RUNS), scope="api-key", limit=3, window=60)
    assert cast.admin_a.api().get(RUNS).status_code == 200  # another key of the same org has its own budget


@pytest.mark.django_db
def test_a_key_held_by_the_api_gate_is_verified_again_after_any_change_and_each_call_counts_once(cast, settings):
    """The REST API's gate holds a key it verified recently until its rate limits' round trip has read the
    authorization generation (``OrgGateAuthentication``): trusted under the same generation, verified again after
    any change anywhere (a revoked key refused at once), and each call counted once either way."""
    settings.RATE_LIMIT_API_KEY = (4, DAY)
    dev = cast.dev_a.api()
    assert dev.get(RUNS).status_code == 200  # verified from the database, and held
    assert dev.get(RUNS).status_code == 200  # held, and trusted under the same generation
    cache.set(row_cache.GENERATION_KEY, "moved-by-an-unrelated-change", timeout=None)
    assert dev.get(RUNS).status_code == 200  # held, not trusted: verified again
    assert dev.get(RUNS).status_code == 200
    _assert_rate_limited(dev.get(RUNS), scope="api-key", limit=4, window=DAY)  # the fifth: four counted

    admin = cast.admin_a.api()
    assert [admin.get(RUNS).status_code for _ in range(2)] == [200, 200]
    # Another server process revokes it: the row and the shared generation change, this process's memory does not.
    ApiKey.objects.filter(pk=cast.admin_a.api_key.pk).update(revoked_at=timezone.now())
    cache.set(row_cache.GENERATION_KEY, "moved-by-the-revocation", timeout=None)
    refused = admin.get(RUNS)
    assert refused.status_code == 401
    assert refused["WWW-Authenticate"] == 'Bearer realm="cesaflow"'
    assert refused.content == APIClient(HTTP_X_API_KEY="not-a-key").get(RUNS).content  # as any bad key's


@pytest.mark.django_db
def test_rest_api_per_org_limit_counts_every_key_of_the_org(cast, settings):
    settings.RATE_LIMIT_API_ORG = (3, 60)
    keys = [cast.dev_a.api(), cast.admin_a.api()]
    assert [keys[n % 2].get(RUNS).status_code for n in range(3)] == [200, 200, 200]
    _assert_rate_limited(keys[1].get(RUNS), scope="api-org", limit=3, window=60)
    assert cast.admin_b.api().get(RUNS).status_code == 200  # another organization is not affected


@pytest.mark.django_db
def test_signed_in_api_calls_count_per_user(cast, settings):
    settings.RATE_LIMIT_API_KEY = (2, 60)
    session = cast.dev_a.session_api()
    assert [session.get(RUNS).status_code for _ in range(2)] == [200, 200]
    _assert_rate_limited(session.get(RUNS), scope="api-key", limit=2, window=60)


@pytest.mark.django_db
def test_rest_api_window_ends_and_the_key_is_served_again(cast, settings):
    settings.RATE_LIMIT_API_KEY = (2, 60)
    api = cast.dev_a.api()
    with freeze_time("2026-03-01 12:00:00") as clock:
        assert [api.get(RUNS).status_code for _ in range(2)] == [200, 200]
        refused = api.get(RUNS)
        _assert_rate_limited(refused, scope="api-key", limit=2, window=60)
        assert _retry_after(refused) == 60
        clock.tick(60)
        assert api.get(RUNS).status_code == 200


@pytest.mark.django_db
def test_unauthenticated_api_calls_are_limited_per_ip(settings):
    settings.RATE_LIMIT_API_UNAUTHENTICATED = (3, 60)
    anonymous = APIClient(REMOTE_ADDR=FLOODER)
    assert [anonymous.get(RUNS).status_code for _ in range(3)] == [401, 401, 401]
    _assert_rate_limited(anonymous.get(RUNS), scope="api-unauthenticated", limit=3, window=60)
    assert APIClient(REMOTE_ADDR=ELSEWHERE).get(RUNS).status_code == 401


@pytest.mark.django_db
def test_t22_bad_keys_from_one_ip_hit_429_at_the_documented_threshold(cast, settings, caplog):
    """security.md T22 with the default limit: 200 bad keys from one IP within a minute; past 60 failures every
    answer is 429 (a right key too, from there), while a valid key from another IP still works."""
    threshold, window = settings.RATE_LIMIT_API_UNAUTHENTICATED
    assert (threshold, window) == (60, 60)  # the README's documented default
    caplog.set_level(logging.INFO)
    guesser = APIClient(REMOTE_ADDR=FLOODER)
    with freeze_time("2026-03-01 12:00:00"):  # the 200 calls stay in one window however long they take
        statuses = []
        for n in range(200):
            guesser.credentials(HTTP_X_API_KEY=_bad_key(n))
            statuses.append(guesser.get(RUNS).status_code)
        assert statuses == [401] * threshold + [429] * (200 - threshold)
        guesser.credentials(HTTP_X_API_KEY=cast.dev_a.api_secret)
        assert guesser.get(RUNS).status_code == 429  # no telling a right key from a wrong one
        assert cast.dev_a.api().get(RUNS, REMOTE_ADDR=ELSEWHERE).status_code == 200
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert logged.count("rate limit api-unauthenticated reached") == 1  # one line per window, not per request
    assert "guessguess" not in logged
    assert cast.dev_a.api_secret not in logged


# --- The org's settings page ----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_settings_page_shows_the_limits_that_apply(cast, settings):
    page = cast.admin_a.client().get(reverse("orgs:settings"))
    assert page.status_code == 200
    assert b"REST API: 600 requests per minute per API key or signed-in user, 1200 requests per minute" in page.content
    assert b"OpenAI-compatible endpoint: 600 requests per minute per API key" in page.content
    settings.RATE_LIMIT_GATEWAY_KEY = (5, 10)
    settings.RATE_LIMIT_GATEWAY_ORG = None
    page = cast.admin_a.client().get(reverse("orgs:settings"))
    assert b"OpenAI-compatible endpoint: 5 requests per 10 seconds per API key<br>" in page.content


# --- The gateway ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def production_server(django_db_setup, tmp_path_factory) -> Iterator[LiveServer]:
    """The production server in a subprocess, its gateway limits set by its environment."""
    env = {
        "CESAFLOW_RATE_LIMIT_GATEWAY_KEY": f"2/{DAY}",
        "CESAFLOW_RATE_LIMIT_API_UNAUTHENTICATED": f"2/{DAY}",
        "CESAFLOW_EXECUTOR": "worker",  # nothing executes behind the test's back
    }
    with live_server(tmp_path_factory.mktemp("rate-limits"), env) as running:
        yield running


@pytest.fixture(scope="module")
def asgi_server(django_db_blocker) -> Iterator[AsgiServer]:
    with serving(django_db_blocker) as running:
        yield running


def _sdk(base: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/api/v1", api_key=api_key, max_retries=0)


@pytest.mark.django_db(transaction=True)
def test_gateway_per_key_limit_makes_the_openai_sdk_raise_rate_limit_error(production_server, cast):
    sdk = _sdk(production_server.url, cast.dev_a.api_secret)
    assert sdk.models.list().data == []
    assert sdk.models.list().data == []
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(model="none/none", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 429
    assert raised.value.code == "rate_limit_exceeded"
    assert raised.value.type == "requests"
    assert 1 <= _retry_after(raised.value.response) <= DAY
    with pytest.raises(openai.RateLimitError):
        sdk.models.list()
    assert _sdk(production_server.url, cast.admin_a.api_secret).models.list().data == []  # its own budget


@pytest.mark.django_db(transaction=True)
def test_gateway_bad_keys_turn_from_401_to_rate_limit_error(production_server, cast):
    with pytest.raises(openai.AuthenticationError):
        _sdk(production_server.url, _bad_key(1)).models.list()
    assert httpx.get(f"{production_server.url}/api/v1/models", timeout=10).status_code == 401  # no key counts too
    with pytest.raises(openai.RateLimitError) as raised:
        _sdk(production_server.url, _bad_key(2)).models.list()
    assert raised.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):  # this address, even with a right key, until the window ends
        _sdk(production_server.url, cast.dev_a.api_secret).models.list()
    assert "guessguess" not in production_server.log.read_text(errors="replace")


@pytest.mark.django_db(transaction=True)
def test_gateway_per_org_limit_counts_every_key_of_the_org(asgi_server, cast, settings):
    settings.RATE_LIMIT_GATEWAY_ORG = (3, DAY)
    for member in (cast.dev_a, cast.admin_a, cast.dev_a):
        assert _sdk(asgi_server.url, member.api_secret).models.list().data == []
    with pytest.raises(openai.RateLimitError) as raised:
        _sdk(asgi_server.url, cast.admin_a.api_secret).models.list()
    assert "per organization" in raised.value.message
    assert _sdk(asgi_server.url, cast.admin_b.api_secret).models.list().data == []


@pytest.mark.django_db(transaction=True)
def test_a_key_held_by_the_gateway_is_verified_again_after_any_change_and_each_call_counts_once(
    asgi_server, cast, settings
):
    """A key the gateway verified recently is trusted only under the authorization generation it was verified
    under, read in its rate limits' own round trip: after any change anywhere it is verified again before anything
    else happens (a revoked key is refused at once), and a call counts once in its limits either way."""
    settings.RATE_LIMIT_GATEWAY_KEY = (4, DAY)
    dev = _sdk(asgi_server.url, cast.dev_a.api_secret)
    assert dev.models.list().data == []  # verified from the database, and held
    assert dev.models.list().data == []  # held, and trusted under the same generation
    cache.set(row_cache.GENERATION_KEY, "moved-by-an-unrelated-change", timeout=None)
    assert dev.models.list().data == []  # held, not trusted: verified again
    assert dev.models.list().data == []
    with pytest.raises(openai.RateLimitError):  # the fifth call: four counted, not more
        dev.models.list()

    admin = _sdk(asgi_server.url, cast.admin_a.api_secret)
    assert admin.models.list().data == []
    assert admin.models.list().data == []
    # Another server process revokes it: the row and the shared generation change, this process's memory does not.
    ApiKey.objects.filter(pk=cast.admin_a.api_key.pk).update(revoked_at=timezone.now())
    cache.set(row_cache.GENERATION_KEY, "moved-by-the-revocation", timeout=None)
    with pytest.raises(openai.AuthenticationError):
        admin.models.list()


@pytest.mark.django_db(transaction=True)
def test_t22_on_the_gateway_past_the_threshold_while_another_ip_still_works(asgi_server, cast, settings):
    """T22 through the gateway: the default threshold, with a day-long window so the 200 calls cannot straddle two
    windows (the clock is not frozen for a real server); the client IP comes from the trusted proxy header."""
    settings.TRUST_X_FORWARDED_FOR = True
    threshold = settings.RATE_LIMIT_API_UNAUTHENTICATED[0]
    settings.RATE_LIMIT_API_UNAUTHENTICATED = (threshold, DAY)
    statuses = []
    with httpx.Client(base_url=asgi_server.api, headers={"X-Forwarded-For": FLOODER}, timeout=10) as http:
        for n in range(200):
            statuses.append(http.get("/models", headers={"Authorization": f"Bearer {_bad_key(n)}"}).status_code)
        refused = http.get("/models", headers={"Authorization": f"Bearer {_bad_key(999)}"})
    assert statuses == [401] * threshold + [429] * (200 - threshold)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= _retry_after(refused) <= DAY
    valid = httpx.get(
        f"{asgi_server.api}/models",
        headers={"Authorization": f"Bearer {cast.dev_a.api_secret}", "X-Forwarded-For": ELSEWHERE},
        timeout=10,
    )
    assert valid.status_code == 200


# --- Redis faults ---------------------------------------------------------------------------------------------------


@pytest.fixture
def redis_down(settings):
    return _take_redis_down(settings)


def _take_redis_down(settings: Any) -> str:
    """Every cache and the async client point at a closed loopback port, as when Redis is down."""
    dead = "redis://127.0.0.1:9/0"
    options = {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5}
    settings.CACHES = {
        alias: {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": dead, "OPTIONS": options}
        for alias in ("default", "sessions")
    }
    settings.REDIS_URL = dead
    return dead


@pytest.mark.django_db
def test_a_redis_fault_fails_open_on_the_api_and_closed_on_sign_in(cast, client, redis_down, caplog):
    caplog.set_level(logging.WARNING, logger="cesaflow.ratelimit")
    assert cast.dev_a.api().get(RUNS).status_code == 200
    assert "not counted (the cache failed): serving anyway" in caplog.text
    refused = client.post(reverse("orgs:login"), {"email": "a@a.example", "password": "x"})
    assert refused.status_code == 503
    assert _retry_after(refused) > 0


@pytest.mark.django_db(transaction=True)
async def test_a_redis_fault_fails_open_on_the_gateway(cast, redis_down, caplog):
    from django.test import AsyncClient

    caplog.set_level(logging.WARNING, logger="cesaflow.ratelimit")
    response = await AsyncClient().get("/api/v1/models", headers={"Authorization": f"Bearer {cast.dev_a.api_secret}"})
    assert response.status_code == 200
    assert "not counted (the cache failed): serving anyway" in caplog.text


@pytest.mark.django_db(transaction=True)
async def test_a_held_key_is_not_trusted_when_the_generation_cannot_be_read(cast, settings):
    """Redis down: the rate limits' round trip reads no generation, so a held key is verified from the database (a
    key revoked behind the caches' back, without the generation moving, is refused), on the REST API and the
    gateway alike; rate limits fail open meanwhile."""
    from asgiref.sync import sync_to_async
    from django.test import AsyncClient

    from orgs.authentication import api_key_held

    for member in (cast.admin_a, cast.dev_a):
        headers = {"Authorization": f"Bearer {member.api_secret}"}
        for _ in range(2):
            assert (await AsyncClient().get(RUNS, headers=headers)).status_code == 200
            assert (await AsyncClient().get("/api/v1/models", headers=headers)).status_code == 200
        assert api_key_held(member.api_secret) is not None  # the next call would take the held path
    await sync_to_async(_revoke_quietly)([cast.admin_a.api_key.pk, cast.dev_a.api_key.pk])
    _take_redis_down(settings)
    rest = await AsyncClient().get(RUNS, headers={"Authorization": f"Bearer {cast.admin_a.api_secret}"})
    assert rest.status_code == 401
    gateway = await AsyncClient().get("/api/v1/models", headers={"Authorization": f"Bearer {cast.dev_a.api_secret}"})
    assert gateway.status_code == 401


def _revoke_quietly(pks: list[Any]) -> None:
    # ``update`` sends no signal: the generation does not move, as when it cannot be read to tell anyway.
    ApiKey.objects.filter(pk__in=pks).update(revoked_at=timezone.now())


def test_rates_read_in_words():
    assert str(ratelimit.Rate(600, 60)) == "600 requests per minute"
    assert str(ratelimit.Rate(1, 3600)) == "1 request per hour"
    assert str(ratelimit.Rate(5, 10)) == "5 requests per 10 seconds"


async def test_without_redis_the_local_cache_counts_for_the_dashboard_and_the_gateway_alike(settings):
    """``make run`` (no REDIS_URL): the local-memory cache counts, and sync and async callers share the counts."""
    settings.REDIS_URL = ""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "rl-test"}}
    caches["default"].clear()
    bucket = ratelimit.Bucket("api-key", "key:local", ratelimit.Rate(2, DAY))
    assert ratelimit.hit([bucket], fail_open=False) is None
    assert await ratelimit.ahit([bucket], fail_open=False) is None
    exceeded = await ratelimit.ahit([bucket], fail_open=False)
    assert exceeded is not None
    assert exceeded.scope == "api-key"
    assert 1 <= exceeded.retry_after <= DAY
    peeked = ratelimit.Bucket("api-unauthenticated", "127.0.0.1", ratelimit.Rate(1, 60))
    assert ratelimit.hit([], peeked=[peeked], fail_open=False) is None  # a peek does not count
    assert ratelimit.hit([], peeked=[peeked], fail_open=False) is None
