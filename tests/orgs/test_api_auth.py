"""Org API key authentication (security.md T12, T13, T15): headers only, one generic 401 for every failure,
revocation and expiry effective at once, ``last_used_at`` throttled and never touched by a failure."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from freezegun import freeze_time
from rest_framework.test import APIClient

from orgs.models import ApiKey
from orgs.services import api_key_create, api_key_revoke
from orgs.tokens import _checksum, generate_api_key

pytestmark = pytest.mark.django_db

URL = "/api/v1/org"


def _with_header(**headers: str) -> APIClient:
    client = APIClient()
    client.credentials(**headers)
    return client


def _last_used(api_key: ApiKey):
    return ApiKey.objects.get(pk=api_key.pk).last_used_at


def test_x_api_key_header_authenticates(cast):
    response = _with_header(HTTP_X_API_KEY=cast.admin_a.api_secret).get(URL)
    assert response.status_code == 200
    assert response.json()["id"] == str(cast.org_a.id)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_authorization_bearer_authenticates(cast, scheme):
    response = _with_header(HTTP_AUTHORIZATION=f"{scheme} {cast.dev_b.api_secret}").get(URL)
    assert response.status_code == 200
    assert response.json()["id"] == str(cast.org_b.id)


def test_key_in_the_query_string_does_not_authenticate(cast):
    response = APIClient().get(f"{URL}?api_key={cast.admin_a.api_secret}&x-api-key={cast.admin_a.api_secret}")
    assert response.status_code == 401


def test_key_in_a_cookie_does_not_authenticate(cast):
    client = APIClient()
    for name in ("api_key", "x-api-key", "x_api_key"):
        client.cookies[name] = cast.admin_a.api_secret
    assert client.get(URL).status_code == 401


def test_key_in_the_body_does_not_authenticate(cast):
    response = APIClient().post("/api/v1/api-keys", {"api_key": cast.admin_a.api_secret, "name": "x"}, format="json")
    assert response.status_code == 401


def test_other_authorization_schemes_do_not_authenticate(cast):
    assert _with_header(HTTP_AUTHORIZATION=f"Basic {cast.admin_a.api_secret}").get(URL).status_code == 401
    assert _with_header(HTTP_AUTHORIZATION=f"Token {cast.admin_a.api_secret}").get(URL).status_code == 401


def _wrong_secret_same_prefix(secret: str) -> str:
    """A well-formed key with a valid checksum and a real prefix, but not the secret that was issued."""
    prefix = secret.split("_")[2]
    body = generate_api_key().secret.split("_")[3][:43]
    return f"cf_live_{prefix}_{body}{_checksum(f'{prefix}_{body}')}"


def _bad_checksum(secret: str) -> str:
    last = secret[-1]
    return secret[:-1] + ("A" if last != "A" else "B")


def _other_prefix(secret: str, other: str) -> str:
    """The secret part of one key behind the lookup id of another."""
    parts, other_parts = secret.split("_"), other.split("_")
    return "_".join([*parts[:2], other_parts[2], parts[3]])


BAD_KEYS = {
    "wrong_secret": lambda cast: _wrong_secret_same_prefix(cast.admin_a.api_secret),
    "bad_checksum": lambda cast: _bad_checksum(cast.admin_a.api_secret),
    "swapped_prefix": lambda cast: _other_prefix(cast.admin_a.api_secret, cast.dev_a.api_secret),
    "truncated": lambda cast: cast.admin_a.api_secret[:-1],
    "extended": lambda cast: cast.admin_a.api_secret + "0",
    "oversized_8kib": lambda cast: "cf_live_" + "A" * 8192,
    "non_ascii": lambda cast: cast.admin_a.api_secret[:-2] + "é1",
    "non_latin": lambda cast: cast.admin_a.api_secret[:-4] + "ключ",
    "nul_byte": lambda cast: cast.admin_a.api_secret[:-1] + "\x00",
    "empty": lambda cast: "",
    "blank": lambda cast: "   ",
    "random": lambda cast: generate_api_key().secret,
    "other_format": lambda cast: "sk-proj-" + "a" * 40,
}


@pytest.mark.parametrize("header", ["x-api-key", "bearer"])
def test_every_bad_key_gets_the_identical_401_and_touches_nothing(cast, header):
    bodies = set()
    for name, make in BAD_KEYS.items():
        bad = make(cast)
        client = (
            _with_header(HTTP_X_API_KEY=bad)
            if header == "x-api-key"
            else _with_header(HTTP_AUTHORIZATION=f"Bearer {bad}")
        )
        response = client.get(URL)
        assert response.status_code == 401, name
        assert response["WWW-Authenticate"] == 'Bearer realm="cesaflow"'
        bodies.add(response.content)
    assert len(bodies) == 1
    assert b"unauthenticated" in bodies.pop()
    # A failure is never a use: no key's last_used_at moved.
    assert not ApiKey.objects.exclude(last_used_at=None).exists()


def test_a_bad_key_is_refused_even_alongside_a_valid_session(cast):
    client = cast.admin_a.session_api()
    client.credentials(HTTP_X_API_KEY=_bad_checksum(cast.admin_a.api_secret))
    assert client.get(URL).status_code == 401


def test_revoked_key_gets_401_on_the_next_request(cast):
    client = cast.dev_a.api()
    assert client.get(URL).status_code == 200
    api_key_revoke(api_key=cast.dev_a.api_key, actor=cast.admin_a.user)
    response = client.get(URL)
    assert response.status_code == 401
    assert response.content == _with_header(HTTP_X_API_KEY="nope").get(URL).content


def test_expired_key_gets_401(cast):
    start = timezone.now()
    _, secret = api_key_create(
        org=cast.org_a, name="short", actor=cast.admin_a.user, expires_at=start + timedelta(hours=1)
    )
    client = _with_header(HTTP_X_API_KEY=secret)
    with freeze_time(start + timedelta(minutes=59)):
        assert client.get(URL).status_code == 200
    with freeze_time(start + timedelta(hours=1, seconds=1)):
        assert client.get(URL).status_code == 401


def test_last_used_at_is_updated_at_most_once_a_minute(cast):
    start = timezone.now()
    api_key = cast.dev_a.api_key
    client = cast.dev_a.api()
    assert _last_used(api_key) is None
    with freeze_time(start):
        client.get(URL)
    assert _last_used(api_key) == start
    with freeze_time(start + timedelta(seconds=59)):
        client.get(URL)
    assert _last_used(api_key) == start
    with freeze_time(start + timedelta(seconds=61)):
        client.get(URL)
    assert _last_used(api_key) == start + timedelta(seconds=61)


def test_failed_attempts_never_update_last_used_at(cast):
    api_key = cast.dev_a.api_key
    _with_header(HTTP_X_API_KEY=_wrong_secret_same_prefix(cast.dev_a.api_secret)).get(URL)
    assert _last_used(api_key) is None
    api_key_revoke(api_key=api_key, actor=cast.admin_a.user)
    cast.dev_a.api().get(URL)
    assert _last_used(api_key) is None


def test_a_key_acts_only_within_its_scopes(cast):
    _, secret = api_key_create(org=cast.org_a, name="reader", actor=cast.admin_a.user, scopes=["org:read"])
    client = _with_header(HTTP_X_API_KEY=secret)
    assert client.get(URL).status_code == 200
    assert client.get("/api/v1/members").status_code == 403
    assert client.patch(URL, {"name": "nope"}, format="json").status_code == 403


def test_head_is_served_like_get(cast):
    response = cast.dev_a.api().head(URL)
    assert response.status_code == 200
    assert response.content == b""


def test_undeclared_methods_are_405_in_the_error_shape(cast):
    response = cast.admin_a.api().put(URL, {"name": "x"}, format="json")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
