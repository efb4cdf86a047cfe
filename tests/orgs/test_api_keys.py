"""/api/v1/api-keys: create (the secret once), list and detail (never the secret), revoke (effective at once)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from orgs.models import ApiKey
from orgs.permissions import AUDIT_READ, DEVELOPER_CAPABILITIES
from orgs.services import api_key_create
from orgs.tokens import API_KEY_RE
from runs.models import AuditEvent

pytestmark = pytest.mark.django_db

LIST = "/api/v1/api-keys"
KEY_FIELDS = {
    "id",
    "name",
    "prefix",
    "masked",
    "scopes",
    "created_by",
    "created_at",
    "expires_at",
    "last_used_at",
    "revoked_at",
    "is_active",
    "scopes_clipped_at",
    "clipped_scopes",
}


def _detail(api_key_id) -> str:
    return f"{LIST}/{api_key_id}"


def test_create_returns_the_secret_once_and_it_works(cast):
    client = cast.admin_a.session_api()
    response = client.post(LIST, {"name": "  laptop  "}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert set(body) == KEY_FIELDS | {"key"}
    secret = body["key"]
    assert API_KEY_RE.match(secret)
    assert body["name"] == "laptop"
    assert body["prefix"] == secret.split("_")[2]
    assert body["masked"].endswith(secret[-4:])
    assert body["scopes"] == sorted(DEVELOPER_CAPABILITIES)  # the default
    assert body["created_by"] == {"id": str(cast.admin_a.user.id), "email": "alice@a.example", "name": "Alice"}
    assert body["is_active"] is True
    assert body["expires_at"] is None

    stored = ApiKey.objects.get(pk=body["id"])
    assert stored.org_id == cast.org_a.id
    assert secret not in (stored.digest, stored.prefix)

    # Never again: not in the list, not in the detail.
    assert secret not in client.get(LIST).content.decode()
    detail = client.get(_detail(body["id"]))
    assert set(detail.json()) == KEY_FIELDS
    assert secret[-20:] not in detail.content.decode()

    # The new key authenticates, as a key of org A.
    fresh = APIClient()
    fresh.credentials(HTTP_X_API_KEY=secret)
    assert fresh.get("/api/v1/org").json()["id"] == str(cast.org_a.id)


def test_create_is_audited_with_actor_and_ip_and_no_secret(cast):
    response = cast.admin_a.api().post(
        LIST, {"name": "ci", "scopes": ["runs:write", "org:read"]}, format="json", REMOTE_ADDR="192.0.2.44"
    )
    assert response.status_code == 201
    body = response.json()
    event = AuditEvent.objects.get(event=AuditEvent.API_KEY_CREATED, target_id=body["id"])
    assert event.org_id == cast.org_a.id
    assert event.actor_api_key_id == cast.admin_a.api_key.id
    assert event.target_type == "apikey"
    assert event.ip == "192.0.2.44"
    assert event.metadata == {"name": "ci", "prefix": body["prefix"], "scopes": ["org:read", "runs:write"]}
    assert body["key"] not in str(event.metadata)


def test_create_with_scopes_and_expiry(cast):
    expires = (timezone.now() + timedelta(days=30)).replace(microsecond=0)
    response = cast.admin_a.api().post(
        LIST,
        {"name": "auditor", "scopes": ["audit:read", "audit:read", "org:read"], "expires_at": expires.isoformat()},
        format="json",
    )
    assert response.status_code == 201
    body = response.json()
    assert body["scopes"] == ["audit:read", "org:read"]
    assert ApiKey.objects.get(pk=body["id"]).expires_at == expires


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 101}, "name"),
        ({}, "name"),
        ({"name": "k", "scopes": []}, "scopes"),
        ({"name": "k", "scopes": ["root"]}, "scopes"),
        ({"name": "k", "scopes": "org:read"}, "scopes"),
        ({"name": "k", "expires_at": "tomorrow"}, "expires_at"),
        ({"name": "k", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ],
)
def test_bad_input_is_a_400_with_field_details_and_creates_nothing(cast, body, field):
    before = ApiKey.objects.count()
    response = cast.admin_a.api().post(LIST, body, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert field in error["details"]["fields"]
    assert ApiKey.objects.count() == before


@pytest.mark.parametrize(
    "field",
    ["org", "id", "created_by", "digest", "prefix", "last_used_at", "revoked_at", "key", "last_four", "role"],
)
def test_read_only_fields_are_rejected_and_never_applied(cast, field):
    before = ApiKey.objects.count()
    response = cast.admin_a.api().post(LIST, {"name": "k", field: str(cast.org_b.id)}, format="json")
    assert response.status_code == 400
    assert set(response.json()["error"]["details"]["fields"]) == {field}
    assert ApiKey.objects.count() == before


def test_a_key_cannot_mint_a_key_with_more_scopes_than_its_own(cast):
    _, secret = api_key_create(
        org=cast.org_a, name="key manager", actor=cast.admin_a.user, scopes=["api_keys:manage", "org:read"]
    )
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=secret)
    refused = client.post(LIST, {"name": "escalate", "scopes": [AUDIT_READ]}, format="json")
    assert refused.status_code == 400
    assert "audit:read" in str(refused.json()["error"]["details"]["fields"]["scopes"])
    # Without explicit scopes the default (the Developer set) is beyond this key too.
    assert client.post(LIST, {"name": "default"}, format="json").status_code == 400
    allowed = client.post(LIST, {"name": "narrow", "scopes": ["org:read"]}, format="json")
    assert allowed.status_code == 201
    assert ApiKey.objects.filter(org=cast.org_a, name__in=["escalate", "default"]).count() == 0


def test_revoke_takes_effect_on_the_next_request(cast):
    victim = cast.dev_a.api()
    assert victim.get("/api/v1/org").status_code == 200
    response = cast.admin_a.session_api().delete(_detail(cast.dev_a.api_key.id), REMOTE_ADDR="192.0.2.7")
    assert response.status_code == 204
    assert response.content == b""
    assert victim.get("/api/v1/org").status_code == 401
    detail = cast.admin_a.api().get(_detail(cast.dev_a.api_key.id)).json()
    assert detail["revoked_at"] is not None
    assert detail["is_active"] is False
    event = AuditEvent.objects.get(event=AuditEvent.API_KEY_REVOKED)
    assert (event.actor_user_id, event.target_id, event.ip) == (
        cast.admin_a.user.id,
        str(cast.dev_a.api_key.id),
        "192.0.2.7",
    )


def test_revoking_twice_is_a_no_op_with_one_audit_event(cast):
    client = cast.admin_a.api()
    assert client.delete(_detail(cast.dev_a.api_key.id)).status_code == 204
    first = ApiKey.objects.get(pk=cast.dev_a.api_key.id).revoked_at
    assert client.delete(_detail(cast.dev_a.api_key.id)).status_code == 204
    assert ApiKey.objects.get(pk=cast.dev_a.api_key.id).revoked_at == first
    assert AuditEvent.objects.filter(event=AuditEvent.API_KEY_REVOKED).count() == 1


def test_a_key_may_revoke_itself_and_is_refused_right_after(cast):
    client = cast.admin_a.api()
    assert client.delete(_detail(cast.admin_a.api_key.id)).status_code == 204
    assert client.get(LIST).status_code == 401


def test_list_shows_the_orgs_keys_newest_first_without_secrets(cast):
    response = cast.admin_a.api().get(LIST)
    assert response.status_code == 200
    rows = response.json()["results"]
    assert [row["id"] for row in rows] == [str(cast.dev_a.api_key.id), str(cast.admin_a.api_key.id)]
    assert all(set(row) == KEY_FIELDS for row in rows)
    text = response.content.decode()
    for secret in (cast.admin_a.api_secret, cast.dev_a.api_secret):
        assert secret not in text
        assert secret.split("_")[-1][:20] not in text


@pytest.mark.parametrize("extra", [1, 5])
def test_list_query_count_does_not_grow_with_keys(cast, django_assert_num_queries, extra):
    for i in range(extra):
        api_key_create(org=cast.org_a, name=f"extra {i}", actor=cast.admin_a.user)
    client = cast.admin_a.api()
    client.get(LIST)  # records last_used_at once
    # One page of keys with their creators: the API key itself was verified a moment ago (orgs.api_key_cache)
    with django_assert_num_queries(1):
        response = client.get(LIST)
    assert len(response.json()["results"]) == 2 + extra
