"""GET/PATCH /api/v1/org: the caller's organization, chosen by the credential and nothing else."""

from __future__ import annotations

import pytest

from orgs.models import Membership, Organization, Role
from runs.models import AuditEvent
from tests.signin import set_session_org

pytestmark = pytest.mark.django_db

URL = "/api/v1/org"


def test_get_org_returns_the_keys_org(cast):
    response = cast.dev_a.api().get(URL)
    assert response.status_code == 200
    org = cast.org_a
    assert response.json() == {
        "id": str(org.id),
        "slug": "org-a",
        "name": "Org A",
        "created_at": org.created_at.isoformat().replace("+00:00", "Z"),
    }
    assert cast.admin_b.api().get(URL).json()["id"] == str(cast.org_b.id)


def test_get_org_with_a_session_returns_the_sessions_current_org(cast):
    assert cast.admin_a.session_api().get(URL).json()["slug"] == "org-a"


def test_session_org_follows_the_switcher_and_its_role(cast):
    """Alice is Admin of org A and Developer of org B: in org B she may read but not rename."""
    Membership.objects.create(user=cast.admin_a.user, org=cast.org_b, role=Role.DEVELOPER)
    client = cast.admin_a.session_api()
    set_session_org(client, cast.org_b.id)
    assert client.get(URL).json()["slug"] == "org-b"
    assert client.patch(URL, {"name": "Mine now"}, format="json").status_code == 403
    assert Organization.objects.get(pk=cast.org_b.pk).name == "Org B"


def test_session_org_from_a_left_org_falls_back_to_a_real_membership(cast):
    client = cast.dev_a.session_api()
    set_session_org(client, cast.org_b.id)  # never a member there
    assert client.get(URL).json()["slug"] == "org-a"


def test_org_cannot_be_chosen_by_query_string_or_header(cast):
    response = cast.admin_a.api().get(
        f"{URL}?org={cast.org_b.id}&org_id={cast.org_b.id}", HTTP_X_ORG_ID=str(cast.org_b.id)
    )
    assert response.json()["id"] == str(cast.org_a.id)


def test_admin_renames_the_org_and_it_is_audited_with_actor_and_ip(cast):
    client = cast.admin_a.session_api()
    response = client.patch(URL, {"name": "  Acme Labs "}, format="json", REMOTE_ADDR="203.0.113.9")
    assert response.status_code == 200
    assert response.json()["name"] == "Acme Labs"
    assert Organization.objects.get(pk=cast.org_a.pk).name == "Acme Labs"
    event = AuditEvent.objects.get(event=AuditEvent.ORG_SETTINGS_CHANGED)
    assert event.org_id == cast.org_a.id
    assert event.actor_user_id == cast.admin_a.user.id
    assert (event.target_type, event.target_id) == ("organization", str(cast.org_a.id))
    assert event.ip == "203.0.113.9"
    assert event.metadata == {"changes": {"name": ["Org A", "Acme Labs"]}}


def test_rename_with_an_api_key_is_audited_as_that_key(cast):
    response = cast.admin_a.api().patch(URL, {"name": "Acme"}, format="json")
    assert response.status_code == 200
    event = AuditEvent.objects.get(event=AuditEvent.ORG_SETTINGS_CHANGED)
    assert event.actor_api_key_id == cast.admin_a.api_key.id
    assert event.actor_user_id is None


def test_patch_without_changes_writes_no_audit_event(cast):
    client = cast.admin_a.api()
    assert client.patch(URL, {}, format="json").status_code == 200
    assert client.patch(URL, {"name": "Org A"}, format="json").status_code == 200
    assert not AuditEvent.objects.filter(event=AuditEvent.ORG_SETTINGS_CHANGED).exists()


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "slug": "evil"},
        {"name": "x", "id": "00000000-0000-0000-0000-000000000000"},
        {"name": "x", "created_at": "2000-01-01T00:00:00Z"},
        {"org": "org-b"},
    ],
)
def test_read_only_and_unknown_fields_are_rejected_and_never_applied(cast, body):
    response = cast.admin_a.api().patch(URL, body, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    unknown = set(body) - {"name"}
    assert set(error["details"]["fields"]) == unknown
    org = Organization.objects.get(pk=cast.org_a.pk)
    assert (org.name, org.slug) == ("Org A", "org-a")


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, None])
def test_bad_names_are_a_400_with_field_details(cast, name):
    response = cast.admin_a.api().patch(URL, {"name": name}, format="json")
    assert response.status_code == 400
    assert set(response.json()["error"]["details"]["fields"]) == {"name"}
    assert Organization.objects.get(pk=cast.org_a.pk).name == "Org A"


def test_malformed_json_is_a_400_in_the_error_shape(cast):
    response = cast.admin_a.api().generic("PATCH", URL, "{nope", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "parse_error"


def test_a_json_list_body_is_a_400_not_a_500(cast):
    response = cast.admin_a.api().patch(URL, ["name"], format="json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "validation_error"
