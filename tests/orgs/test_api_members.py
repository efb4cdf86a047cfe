"""/api/v1/members: list (cursor-paginated), change a role, remove; the last Admin is protected (409)."""

from __future__ import annotations

import pytest

from orgs.models import Membership, Role, User
from runs.models import AuditEvent

pytestmark = pytest.mark.django_db

LIST = "/api/v1/members"


def _detail(membership: Membership) -> str:
    return f"/api/v1/members/{membership.id}"


def _membership(member) -> Membership:
    return Membership.objects.get(user=member.user, org=member.org)


def _add_members(org, count: int) -> None:
    for i in range(count):
        user = User.objects.create_user(email=f"extra{i}@{org.slug}.example", password=None)
        Membership.objects.create(user=user, org=org, role=Role.DEVELOPER)


def test_list_shows_each_member_with_its_fields_in_join_order(cast):
    response = cast.dev_a.api().get(LIST)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"next", "previous", "results"}
    alice, dave = _membership(cast.admin_a), _membership(cast.dev_a)
    assert body["results"] == [
        {
            "id": str(alice.id),
            "user_id": str(cast.admin_a.user.id),
            "email": "alice@a.example",
            "name": "Alice",
            "role": "admin",
            "joined_at": alice.created_at.isoformat().replace("+00:00", "Z"),
        },
        {
            "id": str(dave.id),
            "user_id": str(cast.dev_a.user.id),
            "email": "dave@a.example",
            "name": "Dave",
            "role": "developer",
            "joined_at": dave.created_at.isoformat().replace("+00:00", "Z"),
        },
    ]


def test_list_pages_with_a_cursor_without_gaps_or_repeats(cast):
    _add_members(cast.org_a, 5)
    client = cast.admin_a.api()
    seen: list[str] = []
    url: str | None = f"{LIST}?limit=3"
    while url:
        page = client.get(url).json()
        assert len(page["results"]) <= 3
        seen += [row["id"] for row in page["results"]]
        url = page["next"]
    assert len(seen) == len(set(seen)) == 7
    assert set(seen) == {str(i) for i in Membership.objects.filter(org=cast.org_a).values_list("id", flat=True)}


@pytest.mark.parametrize("cursor", ["garbage", "cD0yMDI0", "bz1hYmM=", "cD1ub3QtYS1kYXRl"])
def test_a_tampered_cursor_is_a_400(cast, cursor):
    response = cast.admin_a.api().get(f"{LIST}?cursor={cursor}")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_cursor"


@pytest.mark.parametrize("extra", [1, 5])
def test_list_query_count_does_not_grow_with_members(cast, django_assert_num_queries, extra):
    _add_members(cast.org_a, extra)
    client = cast.admin_a.api()
    client.get(LIST)  # the key's first use records last_used_at; later requests in the minute do not
    # One page of members with their users: the API key itself was verified a moment ago (orgs.api_key_cache)
    with django_assert_num_queries(1):
        response = client.get(LIST)
    assert len(response.json()["results"]) == 2 + extra


@pytest.mark.parametrize("extra", [1, 5])
def test_list_query_count_with_a_session_does_not_grow_with_members(cast, django_assert_num_queries, extra):
    _add_members(cast.org_a, extra)
    client = cast.admin_a.session_api()
    # 1: the user, 2: the membership of the session's org, 3: one page of members
    with django_assert_num_queries(3):
        response = client.get(LIST)
    assert len(response.json()["results"]) == 2 + extra


def test_detail_shows_one_member(cast):
    response = cast.dev_a.api().get(_detail(_membership(cast.admin_a)))
    assert response.status_code == 200
    assert response.json()["email"] == "alice@a.example"


def test_admin_promotes_a_developer_and_it_is_audited(cast):
    membership = _membership(cast.dev_a)
    response = cast.admin_a.session_api().patch(
        _detail(membership), {"role": "admin"}, format="json", REMOTE_ADDR="198.51.100.4"
    )
    assert response.status_code == 200
    assert response.json()["role"] == "admin"
    membership.refresh_from_db()
    assert membership.role == Role.ADMIN
    event = AuditEvent.objects.get(event=AuditEvent.MEMBER_ROLE_CHANGED)
    assert event.org_id == cast.org_a.id
    assert event.actor_user_id == cast.admin_a.user.id
    assert (event.target_type, event.target_id) == ("membership", str(membership.id))
    assert event.ip == "198.51.100.4"
    assert event.metadata == {"email": "dave@a.example", "from": "developer", "to": "admin"}


def test_the_new_role_takes_effect_on_the_next_request(cast):
    client = cast.dev_a.session_api()
    assert client.get("/api/v1/api-keys").status_code == 403
    cast.admin_a.api().patch(_detail(_membership(cast.dev_a)), {"role": "admin"}, format="json")
    assert client.get("/api/v1/api-keys").status_code == 200


def test_last_admin_cannot_demote_themselves(cast):
    membership = _membership(cast.admin_a)
    response = cast.admin_a.session_api().patch(_detail(membership), {"role": "developer"}, format="json")
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "last_admin"
    assert "Admin" in error["message"]
    membership.refresh_from_db()
    assert membership.role == Role.ADMIN
    assert not AuditEvent.objects.filter(event=AuditEvent.MEMBER_ROLE_CHANGED).exists()


def test_last_admin_cannot_be_removed(cast):
    membership = _membership(cast.admin_a)
    response = cast.admin_a.api().delete(_detail(membership))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "last_admin"
    assert Membership.objects.filter(pk=membership.pk).exists()


def test_an_admin_may_step_down_once_another_admin_exists(cast):
    client = cast.admin_a.api()
    client.patch(_detail(_membership(cast.dev_a)), {"role": "admin"}, format="json")
    response = client.patch(_detail(_membership(cast.admin_a)), {"role": "developer"}, format="json")
    assert response.status_code == 200
    assert response.json()["role"] == "developer"


@pytest.mark.parametrize("body", [{"role": "owner"}, {"role": ""}, {}, {"role": None}])
def test_bad_roles_are_a_400(cast, body):
    membership = _membership(cast.dev_a)
    response = cast.admin_a.api().patch(_detail(membership), body, format="json")
    assert response.status_code == 400
    assert set(response.json()["error"]["details"]["fields"]) == {"role"}
    membership.refresh_from_db()
    assert membership.role == Role.DEVELOPER


@pytest.mark.parametrize("field", ["org", "user", "user_id", "email", "id", "joined_at"])
def test_other_member_fields_cannot_be_written(cast, field):
    membership = _membership(cast.dev_a)
    body = {"role": "admin", field: str(cast.org_b.id)}
    response = cast.admin_a.api().patch(_detail(membership), body, format="json")
    assert response.status_code == 400
    assert set(response.json()["error"]["details"]["fields"]) == {field}
    fresh = Membership.objects.get(pk=membership.pk)
    assert (fresh.role, fresh.org_id, fresh.user_id) == (Role.DEVELOPER, cast.org_a.id, cast.dev_a.user.id)


def test_admin_removes_a_member_who_then_loses_access(cast):
    membership = _membership(cast.dev_a)
    session = cast.dev_a.session_api()
    assert session.get("/api/v1/org").status_code == 200
    response = cast.admin_a.api().delete(_detail(membership), REMOTE_ADDR="198.51.100.5")
    assert response.status_code == 204
    assert response.content == b""
    assert not Membership.objects.filter(pk=membership.pk).exists()
    event = AuditEvent.objects.get(event=AuditEvent.MEMBER_REMOVED)
    assert event.actor_api_key_id == cast.admin_a.api_key.id
    assert (event.target_type, event.target_id, event.ip) == ("membership", str(membership.id), "198.51.100.5")
    assert event.metadata == {"email": "dave@a.example", "role": "developer"}
    # The removed user's session now belongs to no org: nothing here is theirs.
    assert session.get("/api/v1/org").status_code == 404
    assert cast.admin_a.api().delete(_detail(membership)).status_code == 404
