"""The tenant gate on every dashboard view: anonymous -> login, outsider -> org_create, developer on an admin
page or action -> 403, another org's object -> 404 with nothing changed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from orgs.models import ApiKey, Invitation, Membership, Role
from orgs.services import invitation_create

pytestmark = pytest.mark.django_db


@dataclass(frozen=True)
class Route:
    """One dashboard view: its URL (built from the cast), method, form data and who may use it."""

    name: str
    method: str
    admin_only: bool
    kwargs: Callable[[Any], dict[str, Any]] = lambda cast: {}
    data: Callable[[Any], dict[str, Any]] = lambda cast: {}

    def url(self, cast: Any) -> str:
        namespace = "runs" if self.name.startswith("audit") else "orgs"
        return reverse(f"{namespace}:{self.name}", kwargs=self.kwargs(cast))

    def __str__(self) -> str:
        return f"{self.method} {self.name}"


def _membership(member: Any) -> Membership:
    return Membership.objects.get(user=member.user, org=member.org)


def _dev_a_membership(cast: Any) -> dict[str, Any]:
    return {"membership_id": _membership(cast.dev_a).id}


def _own_invitation(cast: Any) -> dict[str, Any]:
    invitation, _token = invitation_create(
        org=cast.org_a, email="new@a.example", role=Role.DEVELOPER, actor=cast.admin_a.user
    )
    return {"invitation_id": invitation.id}


def _dev_a_key(cast: Any) -> dict[str, Any]:
    return {"api_key_id": cast.dev_a.api_key.id}


ORG_ROUTES = [
    Route("home", "get", admin_only=False),
    Route("team", "get", admin_only=False),
    Route("team", "post", admin_only=True, data=lambda cast: {"email": "x@a.example", "role": Role.DEVELOPER}),
    Route("member_role", "post", True, kwargs=_dev_a_membership, data=lambda cast: {"role": Role.ADMIN}),
    Route("member_remove", "post", True, kwargs=_dev_a_membership),
    Route("invitation_revoke", "post", True, kwargs=_own_invitation),
    Route("api_keys", "get", admin_only=True),
    Route("api_keys", "post", admin_only=True, data=lambda cast: {"name": "k", "scopes": ["org:read"]}),
    Route("api_key_revoke", "post", True, kwargs=_dev_a_key),
    Route("settings", "get", admin_only=True),
    Route("settings", "post", admin_only=True, data=lambda cast: {"name": "Renamed"}),
    Route("audit", "get", admin_only=True),
    Route("audit_csv", "get", admin_only=True),
]
ADMIN_ROUTES = [route for route in ORG_ROUTES if route.admin_only]
# Pages for any logged-in user, whether or not they belong to an org.
ACCOUNT_ROUTES = [
    Route("org_create", "get", admin_only=False),
    Route("org_create", "post", admin_only=False, data=lambda cast: {"name": "New"}),
    Route("org_switch", "post", admin_only=False, data=lambda cast: {"org": str(cast.org_a.id)}),
    Route("logout", "post", admin_only=False),
]


def _call(client: Client, route: Route, cast: Any) -> Any:
    return getattr(client, route.method)(route.url(cast), route.data(cast))


@pytest.mark.parametrize("route", ORG_ROUTES + ACCOUNT_ROUTES, ids=str)
def test_anonymous_is_sent_to_login(cast, route):
    response = _call(Client(), route, cast)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("orgs:login") + "?next=")


@pytest.mark.parametrize("route", ORG_ROUTES, ids=str)
def test_outsider_without_org_is_sent_to_org_create(cast, route):
    response = _call(cast.outsider.client(), route, cast)
    assert response.status_code == 302
    assert response["Location"] == reverse("orgs:org_create")


@pytest.mark.parametrize("route", ADMIN_ROUTES, ids=str)
def test_developer_gets_403_on_admin_pages_and_actions(cast, route):
    url = route.url(cast)  # first: some routes create their target
    before = (
        sorted(Membership.objects.values_list("id", "role")),
        ApiKey.objects.filter(revoked_at=None).count(),
        Invitation.objects.filter(revoked_at=None).count(),
    )
    response = getattr(cast.dev_a.client(), route.method)(url, route.data(cast))
    assert response.status_code == 403
    cast.org_a.refresh_from_db()
    assert cast.org_a.name == "Org A"
    assert sorted(Membership.objects.values_list("id", "role")) == before[0]
    assert ApiKey.objects.filter(revoked_at=None).count() == before[1]
    assert Invitation.objects.filter(revoked_at=None).count() == before[2]


@pytest.mark.parametrize("route", [r for r in ORG_ROUTES if not r.admin_only], ids=str)
def test_developer_can_use_member_pages(cast, route):
    response = _call(cast.dev_a.client(), route, cast)
    assert response.status_code == 200


@pytest.mark.parametrize("route", ORG_ROUTES, ids=str)
def test_admin_can_use_every_org_page(cast, route):
    response = _call(cast.admin_a.client(), route, cast)
    assert response.status_code in {200, 302}
    if response.status_code == 302:  # actions redirect back inside the dashboard, never to login
        assert not response["Location"].startswith(reverse("orgs:login"))


def test_developer_team_page_hides_management(cast):
    response = cast.dev_a.client().get(reverse("orgs:team"))
    content = response.content.decode()
    assert "alice@a.example" in content
    assert "Invite a teammate" not in content
    assert "Pending invitations" not in content
    assert reverse("orgs:member_remove", kwargs={"membership_id": _membership(cast.dev_a).id}) not in content


def test_head_request_is_checked_like_get(cast):
    assert cast.dev_a.client().head(reverse("orgs:settings")).status_code == 403
    assert cast.admin_a.client().head(reverse("orgs:settings")).status_code == 200


def test_undeclared_method_is_not_allowed(cast):
    assert cast.admin_a.client().put(reverse("orgs:team")).status_code == 405


# --- Another org's objects: 404, and nothing changes ------------------------------------------------


def test_admin_gets_404_changing_role_in_other_org(cast):
    target = _membership(cast.dev_b)
    response = cast.admin_a.client().post(
        reverse("orgs:member_role", kwargs={"membership_id": target.id}), {"role": Role.ADMIN}
    )
    assert response.status_code == 404
    target.refresh_from_db()
    assert target.role == Role.DEVELOPER


def test_admin_gets_404_removing_member_of_other_org(cast):
    target = _membership(cast.dev_b)
    response = cast.admin_a.client().post(reverse("orgs:member_remove", kwargs={"membership_id": target.id}))
    assert response.status_code == 404
    assert Membership.objects.filter(id=target.id).exists()


def test_admin_gets_404_revoking_invitation_of_other_org(cast):
    invitation, _ = invitation_create(org=cast.org_b, email="z@b.example", role=Role.DEVELOPER, actor=cast.admin_b.user)
    response = cast.admin_a.client().post(reverse("orgs:invitation_revoke", kwargs={"invitation_id": invitation.id}))
    assert response.status_code == 404
    invitation.refresh_from_db()
    assert invitation.revoked_at is None


def test_admin_gets_404_revoking_api_key_of_other_org(cast):
    key = cast.dev_b.api_key
    response = cast.admin_a.client().post(reverse("orgs:api_key_revoke", kwargs={"api_key_id": key.id}))
    assert response.status_code == 404
    key.refresh_from_db()
    assert key.revoked_at is None


def test_unknown_ids_get_404(cast):
    client = cast.admin_a.client()
    missing = "00000000-0000-0000-0000-000000000000"
    for name, kwarg in (
        ("member_role", "membership_id"),
        ("member_remove", "membership_id"),
        ("invitation_revoke", "invitation_id"),
        ("api_key_revoke", "api_key_id"),
    ):
        assert client.post(reverse(f"orgs:{name}", kwargs={kwarg: missing}), {"role": "admin"}).status_code == 404
    assert client.post("/team/members/not-a-uuid/remove/").status_code == 404


def test_other_orgs_data_is_not_listed(cast):
    client = cast.admin_a.client()
    invitation_create(org=cast.org_b, email="secret-invitee@b.example", role=Role.DEVELOPER, actor=cast.admin_b.user)
    team = client.get(reverse("orgs:team")).content.decode()
    assert "bob@b.example" not in team
    assert "erin@b.example" not in team
    assert "secret-invitee@b.example" not in team
    keys = client.get(reverse("orgs:api_keys")).content.decode()
    assert cast.dev_b.api_key.masked not in keys
    assert cast.dev_a.api_key.masked in keys


def test_org_switch_to_an_org_you_do_not_belong_to_is_404(cast):
    client = cast.admin_a.client()
    response = client.post(reverse("orgs:org_switch"), {"org": str(cast.org_b.id)})
    assert response.status_code == 404
    assert client.post(reverse("orgs:org_switch"), {"org": "garbage"}).status_code == 404
    assert "Org A" in client.get(reverse("orgs:home")).content.decode()


def test_org_switch_get_is_not_allowed(cast):
    assert cast.admin_a.client().get(reverse("orgs:org_switch")).status_code == 405
