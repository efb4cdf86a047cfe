"""End-to-end dashboard flows with the Django test client: sign up, orgs, team, invitations, API keys."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.messages import get_messages
from django.core import mail
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from orgs.models import ApiKey, Invitation, Membership, Organization, Role, User
from orgs.permissions import DEFAULT_API_KEY_SCOPES
from orgs.selectors import api_key_get_active_by_secret
from orgs.services import api_key_create, invitation_create
from runs.models import AuditEvent
from tests.signin import session_of

pytestmark = pytest.mark.django_db

GOOD_PASSWORD = "a long and unusual passphrase 7"
INVITE_LINK_RE = re.compile(r"http://testserver/invite/([A-Za-z0-9_\-]+)/")
CONFIRM_LINK_RE = re.compile(r"http://testserver(/signup/confirm/[A-Za-z0-9_\-]+/)")
SECRET_RE = re.compile(r"cf_live_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}")


def _messages(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def _invite(client: Client, email: str, role: str = Role.DEVELOPER) -> str:
    response = client.post(reverse("orgs:team"), {"email": email, "role": role})
    assert response.status_code == 200
    match = INVITE_LINK_RE.search(response.content.decode())
    assert match, "the one-time invitation link is shown to the admin"
    return match.group(0)


# --- Sign up and organizations ----------------------------------------------------------------------


def test_signup_confirmed_by_the_mailed_link_lands_on_home_as_admin(django_capture_on_commit_callbacks):
    client = Client()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            reverse("orgs:signup"),
            {"email": "New.Person@Example.com", "name": "New", "org_name": "Acme Labs", "password": GOOD_PASSWORD},
        )
    assert response.status_code == 200
    assert "Check your inbox" in response.content.decode()
    user = User.objects.get(email="new.person@example.com")
    assert not user.is_active
    assert [message.to for message in mail.outbox] == [["new.person@example.com"]]
    match = CONFIRM_LINK_RE.search(str(mail.outbox[0].body))
    assert match, "the confirmation link is mailed"
    assert client.get(match.group(1)).status_code == 200  # opening it shows the confirm button
    response = client.post(match.group(1), {"password": GOOD_PASSWORD})
    assert response.status_code == 302
    assert response["Location"] == reverse("orgs:home")
    assert User.objects.get(pk=user.pk).is_active
    membership = Membership.objects.get(user=user)
    assert membership.role == Role.ADMIN
    assert membership.org.name == "Acme Labs"
    home = client.get(reverse("orgs:home"))
    assert home.status_code == 200
    content = home.content.decode()
    assert "Acme Labs" in content
    assert "Admin" in content
    assert AuditEvent.objects.filter(event=AuditEvent.USER_SIGNED_UP, org=membership.org).exists()
    assert AuditEvent.objects.filter(event=AuditEvent.USER_SIGNUP_CONFIRMED, org=membership.org).exists()


def test_signup_shows_field_errors_and_creates_nothing():
    response = Client().post(reverse("orgs:signup"), {"email": "not-an-email", "org_name": "", "password": "short"})
    assert response.status_code == 200
    form = response.context["form"]
    assert set(form.errors) >= {"email", "org_name", "password"}
    assert not User.objects.exists()


def test_outsider_creates_an_org_and_becomes_its_admin(cast):
    client = cast.outsider.client()
    assert client.get(reverse("orgs:home"))["Location"] == reverse("orgs:org_create")
    response = client.post(reverse("orgs:org_create"), {"name": "Oscar Co"})
    assert response.status_code == 302
    org = Organization.objects.get(name="Oscar Co")
    assert Membership.objects.get(user=cast.outsider.user, org=org).role == Role.ADMIN
    assert "Oscar Co" in client.get(reverse("orgs:home")).content.decode()


def test_org_create_requires_a_name(cast):
    response = cast.outsider.client().post(reverse("orgs:org_create"), {"name": "   "})
    assert response.status_code == 200
    assert response.context["form"].errors["name"]


def test_member_of_two_orgs_switches_between_them(cast):
    Membership.objects.create(user=cast.admin_a.user, org=cast.org_b, role=Role.DEVELOPER)
    client = cast.admin_a.client()
    assert "Org A" in client.get(reverse("orgs:home")).content.decode()
    response = client.post(reverse("orgs:org_switch"), {"org": str(cast.org_b.id)})
    assert response.status_code == 302
    record = session_of(client)
    assert record is not None
    assert record.org_id == str(cast.org_b.id)
    home = client.get(reverse("orgs:home")).content.decode()
    assert "<h1>Org B</h1>" in home
    # Developer in org B: the admin pages of org B are closed, whatever the role in org A.
    assert client.get(reverse("orgs:api_keys")).status_code == 403


def test_nav_shows_switcher_and_links_by_capability(cast):
    admin_page = cast.admin_a.client().get(reverse("orgs:home")).content.decode()
    dev_page = cast.dev_a.client().get(reverse("orgs:home")).content.decode()
    for page in (admin_page, dev_page):
        assert 'action="/orgs/switch/"' in page
        assert reverse("orgs:team") in page
    assert reverse("runs:audit") in admin_page
    assert reverse("runs:audit") not in dev_page
    assert reverse("orgs:api_keys") not in dev_page
    assert reverse("orgs:settings") not in dev_page
    assert "dave@a.example" in dev_page


def test_settings_rename_org_is_saved_and_audited(cast):
    client = cast.admin_a.client()
    # What a browser sends: the page renders the agents checkbox checked, so it comes along.
    response = client.post(reverse("orgs:settings"), {"name": "Org A Renamed", "agents_may_run_commands": "on"})
    assert response.status_code == 302
    cast.org_a.refresh_from_db()
    assert cast.org_a.name == "Org A Renamed"
    event = AuditEvent.objects.get(event=AuditEvent.ORG_SETTINGS_CHANGED, org=cast.org_a)
    assert event.metadata["changes"] == {"name": ["Org A", "Org A Renamed"]}


def test_settings_turning_agent_commands_off_is_saved_and_audited(cast):
    client = cast.admin_a.client()
    page = client.get(reverse("orgs:settings")).content.decode()
    assert 'name="agents_may_run_commands"' in page
    assert "checked" in page.split('name="agents_may_run_commands"')[1].split(">")[0]
    response = client.post(reverse("orgs:settings"), {"name": "Org A"})  # the box unchecked
    assert response.status_code == 302
    cast.org_a.refresh_from_db()
    assert cast.org_a.agents_may_run_commands is False
    event = AuditEvent.objects.get(event=AuditEvent.ORG_SETTINGS_CHANGED, org=cast.org_a)
    assert event.metadata["changes"] == {"agents_may_run_commands": [True, False]}
    # Developers cannot change it: the settings page is for Admins.
    assert (
        cast.dev_a.client()
        .post(reverse("orgs:settings"), {"name": "Org A", "agents_may_run_commands": "on"})
        .status_code
        == 403
    )


def test_settings_rejects_empty_and_too_long_names(cast):
    client = cast.admin_a.client()
    for name in ("", "x" * 101):
        response = client.post(reverse("orgs:settings"), {"name": name})
        assert response.status_code == 200
        assert response.context["form"].errors["name"]
    cast.org_a.refresh_from_db()
    assert cast.org_a.name == "Org A"


def test_logout_is_post_only_and_clears_site_data(cast):
    client = cast.admin_a.client()
    assert client.get(reverse("orgs:logout")).status_code == 405
    response = client.post(reverse("orgs:logout"))
    assert response.status_code == 302
    assert response["Clear-Site-Data"] == '"cache", "cookies", "storage"'
    assert client.get(reverse("orgs:home"))["Location"].startswith(reverse("orgs:login"))
    assert AuditEvent.objects.filter(event=AuditEvent.LOGGED_OUT, actor_user=cast.admin_a.user).exists()


# --- Team: invitations, roles, removal --------------------------------------------------------------


def test_invite_new_person_who_signs_up_through_the_link_and_joins_as_developer(cast):
    admin = cast.admin_a.client()
    link = _invite(admin, "newbie@a.example")
    assert "newbie@a.example" in admin.get(reverse("orgs:team")).content.decode()  # pending invitation listed

    invitee = Client()
    landing = invitee.get(link)
    assert landing.status_code == 200
    assert "Create account and join" in landing.content.decode()
    response = invitee.post(link, {"name": "Newbie", "password": GOOD_PASSWORD})
    assert response.status_code == 302
    assert response["Location"] == reverse("orgs:home")

    user = User.objects.get(email="newbie@a.example")
    assert Membership.objects.get(user=user, org=cast.org_a).role == Role.DEVELOPER
    assert Membership.objects.filter(user=user).count() == 1  # no org of their own
    assert "Org A" in invitee.get(reverse("orgs:home")).content.decode()
    team = admin.get(reverse("orgs:team")).content.decode()
    assert "newbie@a.example" in team
    assert "No pending invitations." in team
    assert AuditEvent.objects.filter(event=AuditEvent.INVITATION_SENT, org=cast.org_a).exists()
    assert AuditEvent.objects.filter(event=AuditEvent.INVITATION_ACCEPTED, org=cast.org_a).exists()
    # The link works once.
    assert Client().get(link).status_code == 410


def test_invitation_link_is_not_shown_again_on_reload(cast):
    admin = cast.admin_a.client()
    link = _invite(admin, "newbie@a.example")
    assert link not in admin.get(reverse("orgs:team")).content.decode()


def test_invitation_is_mailed_when_smtp_is_configured(cast, settings, django_capture_on_commit_callbacks):
    settings.EMAIL_ENABLED = True  # the locmem backend stands in for SMTP
    admin = cast.admin_a.client()
    with django_capture_on_commit_callbacks(execute=True):
        link = _invite(admin, "mailed@a.example")
    assert len(mail.outbox) == 1
    assert link in mail.outbox[0].body
    assert mail.outbox[0].to == ["mailed@a.example"]


def test_existing_user_logged_in_with_invited_email_accepts(cast):
    link = _invite(cast.admin_a.client(), "oscar@nowhere.example", Role.ADMIN)
    client = cast.outsider.client()
    landing = client.get(link).content.decode()
    assert "Accept and join Org A" in landing
    response = client.post(link)
    assert response.status_code == 302
    assert Membership.objects.get(user=cast.outsider.user, org=cast.org_a).role == Role.ADMIN
    record = session_of(client)
    assert record is not None
    assert record.org_id == str(cast.org_a.id)


def test_logged_in_with_another_email_cannot_accept(cast):
    link = _invite(cast.admin_a.client(), "someone-else@a.example")
    client = cast.outsider.client()
    assert "but you are logged in as oscar@nowhere.example" in client.get(link).content.decode()
    client.post(link)
    assert not Membership.objects.filter(user=cast.outsider.user).exists()
    assert Invitation.objects.get(email="someone-else@a.example").accepted_at is None


def test_anonymous_invitee_with_existing_account_is_told_to_log_in(cast):
    link = _invite(cast.admin_a.client(), "oscar@nowhere.example")
    client = Client()
    landing = client.get(link).content.decode()
    assert "Log in to accept" in landing
    response = client.post(link, {"password": GOOD_PASSWORD})
    assert response.status_code == 200
    assert "already exists" in response.content.decode()
    assert not Membership.objects.filter(user=cast.outsider.user).exists()


def test_invitation_signup_validates_password(cast):
    link = _invite(cast.admin_a.client(), "newbie@a.example")
    response = Client().post(link, {"password": "short"})
    assert response.status_code == 200
    assert response.context["form"].errors["password"]
    assert not User.objects.filter(email="newbie@a.example").exists()


@pytest.mark.parametrize("state", ["wrong", "expired", "revoked", "used"])
def test_unusable_invitation_link_gets_a_clear_page_not_404(cast, state):
    invitation, token = invitation_create(
        org=cast.org_a, email="late@a.example", role=Role.DEVELOPER, actor=cast.admin_a.user
    )
    if state == "wrong":
        token = "not-a-real-token"
    elif state == "expired":
        Invitation.objects.filter(id=invitation.id).update(expires_at=timezone.now() - timedelta(seconds=1))
    elif state == "revoked":
        Invitation.objects.filter(id=invitation.id).update(revoked_at=timezone.now())
    else:
        Invitation.objects.filter(id=invitation.id).update(accepted_at=timezone.now())
    url = reverse("orgs:invite_accept", kwargs={"token": token})
    for response in (Client().get(url), Client().post(url, {"password": GOOD_PASSWORD})):
        assert response.status_code == 410
        assert "invalid, has expired or has already been used" in response.content.decode()
    assert not User.objects.filter(email="late@a.example").exists()


def test_oversized_invitation_token_is_refused_cleanly(cast):
    response = Client().get(reverse("orgs:invite_accept", kwargs={"token": "x" * 5000}))
    assert response.status_code == 410


def test_invite_form_errors(cast):
    client = cast.admin_a.client()
    response = client.post(reverse("orgs:team"), {"email": "dave@a.example", "role": Role.DEVELOPER})
    assert "already a member" in str(response.context["form"].errors["email"])
    response = client.post(reverse("orgs:team"), {"email": "x@a.example", "role": "owner"})
    assert response.context["form"].errors["role"]
    assert not Invitation.objects.filter(email="x@a.example").exists()


def test_admin_revokes_pending_invitation(cast):
    admin = cast.admin_a.client()
    link = _invite(admin, "newbie@a.example")
    invitation = Invitation.objects.get(email="newbie@a.example")
    response = admin.post(reverse("orgs:invitation_revoke", kwargs={"invitation_id": invitation.id}))
    assert response.status_code == 302
    invitation.refresh_from_db()
    assert invitation.revoked_at is not None
    assert Client().get(link).status_code == 410


def test_admin_changes_role_and_it_is_audited(cast):
    admin = cast.admin_a.client()
    membership = Membership.objects.get(user=cast.dev_a.user, org=cast.org_a)
    response = admin.post(reverse("orgs:member_role", kwargs={"membership_id": membership.id}), {"role": Role.ADMIN})
    assert response.status_code == 302
    assert "dave@a.example is now Admin." in _messages(response)
    membership.refresh_from_db()
    assert membership.role == Role.ADMIN
    event = AuditEvent.objects.get(event=AuditEvent.MEMBER_ROLE_CHANGED, org=cast.org_a)
    assert event.metadata["from"] == Role.DEVELOPER
    assert event.metadata["to"] == Role.ADMIN


def test_invalid_role_is_refused_with_a_message(cast):
    membership = Membership.objects.get(user=cast.dev_a.user, org=cast.org_a)
    response = cast.admin_a.client().post(
        reverse("orgs:member_role", kwargs={"membership_id": membership.id}), {"role": "owner"}
    )
    assert response.status_code == 302
    membership.refresh_from_db()
    assert membership.role == Role.DEVELOPER


def test_last_admin_cannot_be_demoted_or_removed(cast):
    admin = cast.admin_a.client()
    own = Membership.objects.get(user=cast.admin_a.user, org=cast.org_a)
    response = admin.post(
        reverse("orgs:member_role", kwargs={"membership_id": own.id}), {"role": Role.DEVELOPER}, follow=True
    )
    assert response.status_code == 200
    assert "at least one Admin" in response.content.decode()
    response = admin.post(reverse("orgs:member_remove", kwargs={"membership_id": own.id}), follow=True)
    assert response.status_code == 200
    assert "last Admin cannot be removed" in response.content.decode()
    own.refresh_from_db()
    assert own.role == Role.ADMIN


def test_admin_removes_member(cast):
    membership = Membership.objects.get(user=cast.dev_a.user, org=cast.org_a)
    response = cast.admin_a.client().post(reverse("orgs:member_remove", kwargs={"membership_id": membership.id}))
    assert response.status_code == 302
    assert not Membership.objects.filter(id=membership.id).exists()
    assert AuditEvent.objects.filter(event=AuditEvent.MEMBER_REMOVED, org=cast.org_a).exists()
    # The removed developer no longer belongs to any org.
    assert cast.dev_a.client().get(reverse("orgs:home"))["Location"] == reverse("orgs:org_create")


# --- Org API keys -----------------------------------------------------------------------------------


def test_api_key_page_lists_keys_masked(cast):
    content = cast.admin_a.client().get(reverse("orgs:api_keys")).content.decode()
    key = cast.dev_a.api_key
    assert f"cf_live_{key.prefix}_…{key.last_four}" in content
    assert cast.dev_a.api_secret not in content
    assert "dave@a.example" in content  # created by
    assert "Active" in content


def test_api_key_form_offers_own_capabilities_and_defaults_to_developer_set(cast):
    form = cast.admin_a.client().get(reverse("orgs:api_keys")).context["form"]
    offered = {value for value, _label in form.fields["scopes"].choices}
    assert "audit:read" in offered
    assert set(form.fields["scopes"].initial) == set(DEFAULT_API_KEY_SCOPES)


def test_create_api_key_shows_secret_once_and_the_key_works_until_revoked(cast):
    client = cast.admin_a.client()
    response = client.post(
        reverse("orgs:api_keys"), {"name": "CI", "scopes": sorted(DEFAULT_API_KEY_SCOPES), "expires_in_days": ""}
    )
    assert response.status_code == 200
    content = response.content.decode()
    secrets_shown = SECRET_RE.findall(content)
    assert len(set(secrets_shown)) == 1
    secret = secrets_shown[0]
    assert "will not be shown again" in content
    assert 'data-copy-target="new-api-key"' in content
    key = ApiKey.objects.get(name="CI", org=cast.org_a)
    assert key.expires_at is None
    assert sorted(key.scopes) == sorted(DEFAULT_API_KEY_SCOPES)
    assert secret not in client.get(reverse("orgs:api_keys")).content.decode()  # never again

    api = Client()
    first = api.get("/api/v1/org", HTTP_X_API_KEY=secret)
    api_exists = first.status_code != 404
    if api_exists:
        assert first.status_code == 200
        assert first.json()["id"] == str(cast.org_a.id)
    else:  # the REST API lands separately; prove the key at the lookup the API uses
        assert api_key_get_active_by_secret(secret=secret) == key

    response = client.post(reverse("orgs:api_key_revoke", kwargs={"api_key_id": key.id}))
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert api_key_get_active_by_secret(secret=secret) is None
    if api_exists:
        assert api.get("/api/v1/org", HTTP_X_API_KEY=secret).status_code == 401
    assert "Revoked" in client.get(reverse("orgs:api_keys")).content.decode()
    assert AuditEvent.objects.filter(event=AuditEvent.API_KEY_CREATED, target_id=str(key.id)).exists()
    assert AuditEvent.objects.filter(event=AuditEvent.API_KEY_REVOKED, target_id=str(key.id)).exists()


def test_create_api_key_with_expiry(cast):
    cast.admin_a.client().post(
        reverse("orgs:api_keys"), {"name": "Temp", "scopes": ["org:read"], "expires_in_days": 30}
    )
    key = ApiKey.objects.get(name="Temp")
    assert key.expires_at is not None
    assert timedelta(days=29) < key.expires_at - timezone.now() <= timedelta(days=30)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "", "scopes": ["org:read"]}, "name"),
        ({"name": "k", "scopes": []}, "scopes"),
        ({"name": "k", "scopes": ["root"]}, "scopes"),
        ({"name": "k", "scopes": ["org:read"], "expires_in_days": 0}, "expires_in_days"),
        ({"name": "k", "scopes": ["org:read"], "expires_in_days": 99999}, "expires_in_days"),
        ({"name": "k", "scopes": ["org:read"], "expires_in_days": "soon"}, "expires_in_days"),
    ],
)
def test_create_api_key_form_errors(cast, data, field):
    response = cast.admin_a.client().post(reverse("orgs:api_keys"), data)
    assert response.status_code == 200
    assert response.context["form"].errors[field]
    assert "new_secret" not in response.context
    assert not ApiKey.objects.filter(name="k").exists()


def test_revoked_api_key_has_no_revoke_button(cast):
    client = cast.admin_a.client()
    key = cast.dev_a.api_key
    client.post(reverse("orgs:api_key_revoke", kwargs={"api_key_id": key.id}))
    content = client.get(reverse("orgs:api_keys")).content.decode()
    assert reverse("orgs:api_key_revoke", kwargs={"api_key_id": key.id}) not in content


# --- No N+1 on list pages ---------------------------------------------------------------------------


def _queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


def test_team_and_api_key_pages_query_count_does_not_grow_with_rows(cast):
    client = cast.admin_a.client()
    team, keys = reverse("orgs:team"), reverse("orgs:api_keys")
    client.get(team)  # warm the session
    baseline = (_queries(client, team), _queries(client, keys))
    for i in range(5):
        user = User.objects.create_user(email=f"extra{i}@a.example", password=GOOD_PASSWORD)
        Membership.objects.create(user=user, org=cast.org_a, role=Role.DEVELOPER)
        invitation_create(org=cast.org_a, email=f"pending{i}@a.example", role=Role.DEVELOPER, actor=cast.admin_a.user)
        api_key_create(org=cast.org_a, name=f"extra {i}", actor=user, scopes=["org:read"])
    assert (_queries(client, team), _queries(client, keys)) == baseline


def test_logged_in_user_cannot_sign_up_again(cast):
    response = cast.admin_a.client().post(
        reverse("orgs:signup"), {"email": "second@example.com", "org_name": "Second", "password": GOOD_PASSWORD}
    )
    assert response.status_code == 302
    assert not User.objects.filter(email="second@example.com").exists()
