"""Demotion and removal: a member's org API keys never keep more than their role grants, the Admin removing someone
chooses whether their keys die with the membership, and invitations sent by an Admin who is demoted or removed
stop working."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from orgs.models import ApiKey, Invitation, Membership, Role
from orgs.permissions import ADMIN_CAPABILITIES, AUDIT_READ, DEVELOPER_CAPABILITIES, TEAM_MANAGE
from orgs.services import (
    api_key_create,
    api_key_revoke,
    invitation_accept,
    invitation_create,
    membership_change_role,
    membership_remove,
)
from runs.models import AuditEvent

pytestmark = pytest.mark.django_db

ADMIN_ONLY = sorted(ADMIN_CAPABILITIES - DEVELOPER_CAPABILITIES)


def _membership(member, org=None) -> Membership:
    return Membership.objects.get(user=member.user, org=org or member.org)


def _promote_dave(cast) -> Membership:
    """Dave (Developer of org A) becomes a second Admin, so he can be demoted and make admin-scoped keys."""
    return membership_change_role(membership=_membership(cast.dev_a), role=Role.ADMIN, actor=cast.admin_a.user)


def _admin_key(cast, name: str = "dave admin key") -> tuple[ApiKey, str]:
    return api_key_create(org=cast.org_a, name=name, actor=cast.dev_a.user, scopes=sorted(ADMIN_CAPABILITIES))


def _events(name: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(event=name).order_by("created_at"))


# --- Demotion clips API key scopes ------------------------------------------------------------------


def test_demotion_clips_the_members_keys_to_the_new_role_and_audits_it(cast):
    dave = _promote_dave(cast)
    key, _secret = _admin_key(cast)
    membership_change_role(membership=dave, role=Role.DEVELOPER, actor=cast.admin_a.user)
    key.refresh_from_db()
    assert key.scopes == sorted(DEVELOPER_CAPABILITIES)
    assert key.clipped_scopes == ADMIN_ONLY
    assert key.scopes_clipped_at is not None
    assert key.revoked_at is None
    (event,) = _events(AuditEvent.API_KEY_SCOPES_CLIPPED)
    assert (event.org_id, event.actor_user_id, event.target_type, event.target_id) == (
        cast.org_a.id,
        cast.admin_a.user.id,
        "apikey",
        str(key.id),
    )
    assert event.metadata == {
        "name": "dave admin key",
        "prefix": key.prefix,
        "removed": ADMIN_ONLY,
        "scopes": sorted(DEVELOPER_CAPABILITIES),
    }


def test_demotion_leaves_revoked_keys_other_creators_keys_and_other_orgs_alone(cast):
    dave = _promote_dave(cast)
    revoked, _ = _admin_key(cast, "revoked")
    api_key_revoke(api_key=revoked, actor=cast.admin_a.user)
    alice_key = cast.admin_a.api_key
    # Dave is also an Admin of org B, with an admin key there: demotion in org A does not reach it.
    Membership.objects.create(user=cast.dev_a.user, org=cast.org_b, role=Role.ADMIN)
    other_org_key, _ = api_key_create(
        org=cast.org_b, name="b key", actor=cast.dev_a.user, scopes=sorted(ADMIN_CAPABILITIES)
    )
    membership_change_role(membership=dave, role=Role.DEVELOPER, actor=cast.admin_a.user)
    for key in (revoked, alice_key, other_org_key):
        key.refresh_from_db()
        assert key.scopes == sorted(ADMIN_CAPABILITIES), key.name
        assert key.scopes_clipped_at is None
        assert key.clipped_scopes == []
    assert not _events(AuditEvent.API_KEY_SCOPES_CLIPPED)


def test_promotion_clips_nothing(cast):
    dev_key = cast.dev_a.api_key
    _promote_dave(cast)
    dev_key.refresh_from_db()
    assert dev_key.scopes_clipped_at is None
    assert not _events(AuditEvent.API_KEY_SCOPES_CLIPPED)


def test_a_key_left_without_any_scope_is_revoked(cast):
    dave = _promote_dave(cast)
    key, _ = api_key_create(org=cast.org_a, name="audit only", actor=cast.dev_a.user, scopes=[AUDIT_READ])
    membership_change_role(membership=dave, role=Role.DEVELOPER, actor=cast.admin_a.user)
    key.refresh_from_db()
    assert key.scopes == []
    assert key.clipped_scopes == [AUDIT_READ]
    assert key.revoked_at is not None
    assert [e.target_id for e in _events(AuditEvent.API_KEY_REVOKED)] == [str(key.id)]


def test_demotion_on_the_dashboard_clips_keys_and_the_api_keys_page_says_so(cast):
    _promote_dave(cast)
    key, _ = _admin_key(cast)
    client = cast.admin_a.client()
    response = client.post(
        reverse("orgs:member_role", kwargs={"membership_id": _membership(cast.dev_a).id}), {"role": Role.DEVELOPER}
    )
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.scopes == sorted(DEVELOPER_CAPABILITIES)
    page = client.get(reverse("orgs:api_keys")).content.decode()
    notes = re.findall(r"<div class=\"warning small\" data-scopes-clipped>(.*?)</div>", page, re.S)
    assert len(notes) == 1
    assert "role changed; removed: " in notes[0]
    assert ", ".join(ADMIN_ONLY) in notes[0]


def test_demotion_through_the_api_clips_keys_which_then_lose_access(cast):
    _promote_dave(cast)
    key, secret = _admin_key(cast)
    dave_key = APIClient()
    dave_key.credentials(HTTP_X_API_KEY=secret)
    assert dave_key.get("/api/v1/audit-events").status_code == 200
    response = cast.admin_a.api().patch(
        f"/api/v1/members/{_membership(cast.dev_a).id}", {"role": "developer"}, format="json"
    )
    assert response.status_code == 200
    assert dave_key.get("/api/v1/audit-events").status_code == 403
    assert dave_key.get("/api/v1/org").status_code == 200  # what a Developer may do, it still does
    body = cast.admin_a.api().get(f"/api/v1/api-keys/{key.id}").json()
    assert body["scopes"] == sorted(DEVELOPER_CAPABILITIES)
    assert body["clipped_scopes"] == ADMIN_ONLY
    assert body["scopes_clipped_at"] is not None
    assert len(_events(AuditEvent.API_KEY_SCOPES_CLIPPED)) == 1


def test_self_demotion_clips_the_key_making_the_request(cast):
    """Alice steps down with her own admin key: the change applies to that very key."""
    _promote_dave(cast)
    client = cast.admin_a.api()
    response = client.patch(f"/api/v1/members/{_membership(cast.admin_a).id}", {"role": "developer"}, format="json")
    assert response.status_code == 200
    assert client.get("/api/v1/api-keys").status_code == 403
    cast.admin_a.api_key.refresh_from_db()
    assert TEAM_MANAGE in cast.admin_a.api_key.clipped_scopes


# --- Removal chooses whether keys are revoked -------------------------------------------------------


def test_removal_revokes_the_members_active_keys_by_default_each_audited(cast):
    second, _ = api_key_create(org=cast.org_a, name="second", actor=cast.dev_a.user)
    expired, _ = api_key_create(
        org=cast.org_a, name="old", actor=cast.dev_a.user, expires_at=timezone.now() + timedelta(seconds=1)
    )
    ApiKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(days=1))
    membership_remove(membership=_membership(cast.dev_a), actor=cast.admin_a.user)
    revoked = {e.target_id for e in _events(AuditEvent.API_KEY_REVOKED)}
    assert revoked == {str(cast.dev_a.api_key.id), str(second.id)}
    assert ApiKey.objects.get(pk=expired.pk).revoked_at is None  # already dead: nothing to do
    assert ApiKey.objects.get(pk=cast.admin_a.api_key.pk).revoked_at is None


def test_a_key_made_with_a_members_key_goes_with_the_member(cast):
    """An Admin makes K2 with their key K1 over the API; removing the Admin revokes both (K2 belongs to them too)."""
    membership = _promote_dave(cast)
    _, k1 = _admin_key(cast)
    maker = APIClient()
    maker.credentials(HTTP_X_API_KEY=k1)
    made = maker.post(
        "/api/v1/api-keys", {"name": "made by a key", "scopes": sorted(ADMIN_CAPABILITIES)}, format="json"
    )
    assert made.status_code == 201, made.content
    child = ApiKey.objects.get(pk=made.json()["id"])
    assert child.created_by == cast.dev_a.user
    membership_remove(membership=membership, actor=cast.admin_a.user)
    child.refresh_from_db()
    assert child.revoked_at is not None
    with_child = APIClient()
    with_child.credentials(HTTP_X_API_KEY=made.json()["key"])
    assert with_child.get("/api/v1/members").status_code == 401


def test_removal_may_keep_the_members_keys(cast):
    membership_remove(membership=_membership(cast.dev_a), actor=cast.admin_a.user, revoke_api_keys=False)
    assert ApiKey.objects.get(pk=cast.dev_a.api_key.pk).revoked_at is None
    assert not _events(AuditEvent.API_KEY_REVOKED)
    assert cast.dev_a.api().get("/api/v1/org").status_code == 200  # the key still works for the org


def test_team_page_offers_to_revoke_the_keys_with_their_count_checked(cast):
    api_key_create(org=cast.org_a, name="second", actor=cast.dev_a.user)
    page = cast.admin_a.client().get(reverse("orgs:team")).content.decode()
    action = reverse("orgs:member_remove", kwargs={"membership_id": _membership(cast.dev_a).id})
    form = re.search(rf'<form method="post" action="{action}".*?</form>', page, re.S)
    assert form
    checkbox = r'<input type="checkbox" name="revoke_api_keys" value="on" checked>'
    assert re.search(rf"{checkbox} Also revoke the API keys they created \(2\)", form.group(0))


@pytest.mark.parametrize(("data", "revoked"), [({"revoke_api_keys": "on"}, True), ({}, False)])
def test_removal_on_the_dashboard_follows_the_checkbox(cast, data, revoked):
    url = reverse("orgs:member_remove", kwargs={"membership_id": _membership(cast.dev_a).id})
    response = cast.admin_a.client().post(url, data)
    assert response.status_code == 302
    assert not Membership.objects.filter(user=cast.dev_a.user, org=cast.org_a).exists()
    assert (ApiKey.objects.get(pk=cast.dev_a.api_key.pk).revoked_at is not None) is revoked


@pytest.mark.parametrize(
    ("query", "revoked"),
    [
        ("", True),
        ("?revoke_api_keys=", True),  # no value: the default
        ("?revoke_api_keys=true", True),
        ("?revoke_api_keys=false", False),
        ("?revoke_api_keys=0", False),
    ],
)
def test_removal_through_the_api_follows_revoke_api_keys(cast, query, revoked):
    response = cast.admin_a.api().delete(f"/api/v1/members/{_membership(cast.dev_a).id}{query}")
    assert response.status_code == 204
    assert (ApiKey.objects.get(pk=cast.dev_a.api_key.pk).revoked_at is not None) is revoked
    assert cast.dev_a.api().get("/api/v1/org").status_code == (401 if revoked else 200)


@pytest.mark.parametrize("value", ["maybe", "2", "revoke"])
def test_a_bad_revoke_api_keys_value_is_a_400_and_removes_no_one(cast, value):
    response = cast.admin_a.api().delete(f"/api/v1/members/{_membership(cast.dev_a).id}?revoke_api_keys={value}")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert set(error["details"]["fields"]) == {"revoke_api_keys"}
    assert Membership.objects.filter(user=cast.dev_a.user, org=cast.org_a).exists()
    assert ApiKey.objects.get(pk=cast.dev_a.api_key.pk).revoked_at is None


def test_outsider_gets_404_before_the_query_is_even_read(cast):
    response = cast.admin_b.api().delete(f"/api/v1/members/{_membership(cast.dev_a).id}?revoke_api_keys=maybe")
    assert response.status_code == 404


# --- Invitations of a demoted or removed Admin ------------------------------------------------------


def _dave_invites(cast, email: str) -> tuple[Invitation, str]:
    return invitation_create(org=cast.org_a, email=email, role=Role.ADMIN, actor=cast.dev_a.user)


def test_invitations_of_a_demoted_admin_are_revoked_and_stop_working(cast):
    dave = _promote_dave(cast)
    invitation, token = _dave_invites(cast, "friend@a.example")
    alices, _ = invitation_create(org=cast.org_a, email="kept@a.example", role=Role.DEVELOPER, actor=cast.admin_a.user)
    assert Client().get(reverse("orgs:invite_accept", kwargs={"token": token})).status_code == 200
    membership_change_role(membership=dave, role=Role.DEVELOPER, actor=cast.admin_a.user)
    invitation.refresh_from_db()
    alices.refresh_from_db()
    assert invitation.revoked_at is not None
    assert alices.revoked_at is None  # another Admin's invitation is not touched
    (event,) = _events(AuditEvent.INVITATION_REVOKED)
    assert (event.target_id, event.actor_user_id) == (str(invitation.id), cast.admin_a.user.id)
    assert Client().get(reverse("orgs:invite_accept", kwargs={"token": token})).status_code == 410
    with pytest.raises(ValidationError):
        invitation_accept(token=token, user=cast.outsider.user)


def test_invitations_of_a_removed_admin_are_revoked_even_when_their_keys_are_kept(cast):
    _promote_dave(cast)
    invitation, token = _dave_invites(cast, "friend@a.example")
    response = cast.admin_a.api().delete(f"/api/v1/members/{_membership(cast.dev_a).id}?revoke_api_keys=false")
    assert response.status_code == 204
    invitation.refresh_from_db()
    assert invitation.revoked_at is not None
    assert [e.target_id for e in _events(AuditEvent.INVITATION_REVOKED)] == [str(invitation.id)]
    assert Client().get(reverse("orgs:invite_accept", kwargs={"token": token})).status_code == 410


def test_a_refused_demotion_revokes_and_clips_nothing(cast):
    """The last-Admin rule refuses the change: the keys and invitations stay as they were (one transaction)."""
    invitation, _ = invitation_create(org=cast.org_a, email="x@a.example", role=Role.DEVELOPER, actor=cast.admin_a.user)
    with pytest.raises(ValidationError):
        membership_change_role(membership=_membership(cast.admin_a), role=Role.DEVELOPER, actor=cast.admin_a.user)
    invitation.refresh_from_db()
    cast.admin_a.api_key.refresh_from_db()
    assert invitation.revoked_at is None
    assert cast.admin_a.api_key.scopes == sorted(ADMIN_CAPABILITIES)
