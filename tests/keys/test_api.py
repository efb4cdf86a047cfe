"""The provider-key API: the isolation matrix with the fixed cast (anonymous 401, outsider 404, Developer 403 on
writes, another org's key 404 like a random id), mass assignment, and responses that never carry the secret."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.urls import get_resolver, reverse
from rest_framework.test import APIClient

from keys.models import KeyStatus, Provider, ProviderKey
from runs.models import AuditEvent
from tests.keys.conftest import fake_secret

pytestmark = pytest.mark.django_db

AUTH_STYLES = ["api_key", "session"]
LIST = "keys_api:provider-key-list"
DETAIL = "keys_api:provider-key-detail"


def _client(member, auth: str):
    return member.api() if auth == "api_key" else member.session_api()


def _body(**overrides: Any) -> dict[str, Any]:
    return {"provider": "openai", "label": "from-api", "secret": fake_secret(), **overrides}


def _state() -> tuple[Any, ...]:
    return (
        sorted(ProviderKey.objects.values_list("id", "status", "sealed_secret")),
        AuditEvent.objects.exclude(event__startswith="auth.").count(),
    )


def _assert_error(response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    return body


def test_every_keys_api_route_is_covered_here():
    _, resolver = get_resolver().namespace_dict["keys_api"]
    assert {name for name in resolver.reverse_dict if isinstance(name, str)} == {
        "provider-key-list",
        "provider-key-detail",
        "provider-key-check",  # isolation and role tests: tests/keys/test_check.py
    }


# --- Anonymous, outsider, developer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "name"), [("get", LIST), ("post", LIST), ("get", DETAIL), ("delete", DETAIL)], ids=str
)
def test_anonymous_gets_401(cast, key_a, method, name):
    before = _state()
    url = reverse(name, kwargs={"key_id": key_a.id}) if name == DETAIL else reverse(name)
    response = getattr(APIClient(), method)(url, _body(), format="json")
    _assert_error(response, 401, "unauthenticated")
    assert _state() == before


@pytest.mark.parametrize(
    ("method", "name"), [("get", LIST), ("post", LIST), ("get", DETAIL), ("delete", DETAIL)], ids=str
)
def test_outsider_gets_404(cast, key_a, method, name):
    client = cast.outsider.session_api()
    before = _state()
    url = reverse(name, kwargs={"key_id": key_a.id}) if name == DETAIL else reverse(name)
    response = getattr(client, method)(url, _body(), format="json")
    _assert_error(response, 404, "not_found")
    assert _state() == before


@pytest.mark.parametrize("auth", AUTH_STYLES)
def test_developer_can_list_and_read_keys(cast, key_a, auth):
    client = _client(cast.dev_a, auth)
    assert client.get(reverse(LIST)).status_code == 200
    assert client.get(reverse(DETAIL, kwargs={"key_id": key_a.id})).status_code == 200


@pytest.mark.parametrize("auth", AUTH_STYLES)
def test_developer_gets_403_on_add_and_revoke(cast, key_a, auth):
    client = _client(cast.dev_a, auth)
    before = _state()
    _assert_error(client.post(reverse(LIST), _body(), format="json"), 403, "permission_denied")
    _assert_error(client.delete(reverse(DETAIL, kwargs={"key_id": key_a.id})), 403, "permission_denied")
    assert _state() == before


@pytest.mark.parametrize("auth", AUTH_STYLES)
@pytest.mark.parametrize("method", ["get", "delete"])
def test_another_orgs_key_is_a_404_identical_to_a_random_id(cast, key_a, auth, method):
    client = _client(cast.admin_b, auth)
    before = _state()
    foreign = getattr(client, method)(reverse(DETAIL, kwargs={"key_id": key_a.id}))
    missing = getattr(client, method)(reverse(DETAIL, kwargs={"key_id": uuid.uuid4()}))
    _assert_error(foreign, 404, "not_found")
    assert foreign.json() == missing.json()
    assert _state() == before
    assert ProviderKey.objects.get(pk=key_a.pk).status == KeyStatus.UNCHECKED


@pytest.mark.parametrize("auth", AUTH_STYLES)
def test_lists_never_show_another_orgs_keys(cast, key_a, key_b, auth):
    response = _client(cast.admin_b, auth).get(reverse(LIST))
    assert response.status_code == 200
    ids = {row["id"] for row in response.json()["results"]}
    assert ids == {str(key_b.id)}
    assert str(key_a.id) not in response.content.decode()


def test_api_key_without_keys_read_scope_gets_403(cast, key_a):
    from orgs.services import api_key_create

    _, secret = api_key_create(org=cast.org_a, name="runs only", actor=cast.admin_a.user, scopes=["runs:read"])
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=secret)
    _assert_error(client.get(reverse(LIST)), 403, "permission_denied")


def test_unsupported_method_is_405(cast, key_a):
    response = cast.admin_a.api().patch(reverse(DETAIL, kwargs={"key_id": key_a.id}), {"label": "x"}, format="json")
    _assert_error(response, 405, "method_not_allowed")


# --- Admin: add, read, revoke ---------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", AUTH_STYLES)
def test_admin_adds_a_key_and_the_response_shows_only_its_last_four(cast, ring1, auth):
    secret = fake_secret("sk-ant-api03-")
    response = _client(cast.admin_a, auth).post(
        reverse(LIST), _body(provider="anthropic", secret=secret), format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == {
        "id",
        "provider",
        "label",
        "base_url",
        "last_four",
        "status",
        "created_by",
        "created_at",
        "last_used_at",
        "last_checked_at",
        "revoked_at",
    }
    assert body["last_four"] == secret[-4:]
    assert body["status"] == "unchecked"
    assert secret not in response.content.decode()
    key = ProviderKey.objects.get(pk=body["id"])
    assert key.org == cast.org_a
    assert AuditEvent.objects.filter(event=AuditEvent.KEY_CREATED, target_id=str(key.id)).exists()


def test_mass_assignment_fields_are_ignored(cast, ring1):
    body = _body(
        org=str(cast.org_b.id),
        id=str(uuid.uuid4()),
        status="valid",
        last_four="XXXX",
        kid=99,
        sealed_secret="cf1.99.AAAA.BBBB",
        created_by=str(cast.admin_b.user.id),
        created_by_label="mallory",
        last_used_at="2020-01-01T00:00:00Z",
        revoked_at="2020-01-01T00:00:00Z",
    )
    response = cast.admin_a.api().post(reverse(LIST), body, format="json")
    assert response.status_code == 201, response.content
    key = ProviderKey.objects.get(pk=response.json()["id"])
    assert key.id != uuid.UUID(body["id"])
    assert key.org == cast.org_a
    assert key.status == KeyStatus.UNCHECKED
    assert key.last_four == body["secret"][-4:]
    assert key.kid == 1
    assert key.created_by_label.startswith("API key")
    assert key.last_used_at is None
    assert key.revoked_at is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"provider": "mistral"}, "provider"),
        ({"label": "a/b"}, "label"),
        ({"label": ""}, "label"),
        ({"secret": ""}, "secret"),
        ({"secret": "has spaces in it"}, "secret"),
        ({"secret": ["sk-proj-in-a-list"]}, "secret"),
        ({"secret": True}, "secret"),
        ({"secret": "x" * 5000}, "secret"),
        ({"provider": "openai_compatible"}, "base_url"),
        ({"base_url": "http://169.254.169.254/"}, "base_url"),
        ({"base_url": "gopher://example.com/"}, "base_url"),
    ],
)
def test_bad_input_is_a_400_with_field_errors_that_never_echo_the_secret(cast, ring1, body, field):
    data = _body(**body)
    response = cast.admin_a.api().post(reverse(LIST), data, format="json")
    error = _assert_error(response, 400, "validation_error")
    assert field in error["error"]["details"]["fields"]
    if isinstance(data["secret"], str) and len(data["secret"]) > 4:
        assert data["secret"] not in response.content.decode()
    assert not ProviderKey.objects.exists()


def test_duplicate_label_is_a_400(cast, key_a):
    response = cast.admin_a.api().post(reverse(LIST), _body(label="PROD"), format="json")
    error = _assert_error(response, 400, "validation_error")
    assert "label" in error["error"]["details"]["fields"]


def test_missing_body_and_wrong_content_type_are_client_errors(cast, ring1):
    client = cast.admin_a.api()
    _assert_error(client.post(reverse(LIST), {}, format="json"), 400, "validation_error")
    response = client.post(reverse(LIST), "provider=openai", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415


def test_detail_and_list_never_contain_the_secret_or_the_ciphertext(cast, key_a, secret_a):
    client = cast.admin_a.api()
    for response in (client.get(reverse(LIST)), client.get(reverse(DETAIL, kwargs={"key_id": key_a.id}))):
        text = response.content.decode()
        assert response.status_code == 200
        assert secret_a not in text
        assert key_a.sealed_secret.split(".")[3][:20] not in text
        assert "sealed" not in text
        assert "kid" not in text


@pytest.mark.parametrize("auth", AUTH_STYLES)
def test_admin_revokes_with_delete(cast, key_a, auth):
    response = _client(cast.admin_a, auth).delete(reverse(DETAIL, kwargs={"key_id": key_a.id}))
    assert response.status_code == 204
    key = ProviderKey.objects.get(pk=key_a.pk)
    assert (key.status, key.sealed_secret) == (KeyStatus.REVOKED, "")
    detail = cast.admin_a.api().get(reverse(DETAIL, kwargs={"key_id": key_a.id})).json()
    assert detail["status"] == "revoked"
    assert detail["revoked_at"]


def test_list_query_count_does_not_grow_with_keys(cast, ring1, django_assert_max_num_queries):
    from keys.services import provider_key_create

    for i in range(12):
        provider_key_create(
            org=cast.org_a, actor=cast.admin_a.user, provider=Provider.OPENAI, label=f"k{i}", secret=fake_secret()
        )
    client = cast.admin_a.api()
    # Auth (key lookup + last_used) and the page itself: a fixed handful, never one per key.
    with django_assert_max_num_queries(6):
        response = client.get(reverse(LIST))
    assert len(response.json()["results"]) == 12


def test_list_is_paginated_with_a_cursor(cast, ring1):
    from keys.services import provider_key_create

    for i in range(3):
        provider_key_create(org=cast.org_a, actor=None, provider=Provider.OPENAI, label=f"k{i}", secret=fake_secret())
    client = cast.admin_a.api()
    first = client.get(reverse(LIST), {"limit": 2}).json()
    assert len(first["results"]) == 2
    second = client.get(first["next"]).json()
    assert len(second["results"]) == 1
