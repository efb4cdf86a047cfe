"""orgs.services: the write path for accounts, orgs, memberships, invitations and API keys, with its audit trail."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone
from freezegun import freeze_time

from cesaflow.lib import request_context
from orgs.models import ApiKey, Invitation, Membership, Organization, Role, User
from orgs.permissions import ADMIN_CAPABILITIES, DEFAULT_API_KEY_SCOPES
from orgs.services import (
    LAST_ADMIN,
    api_key_create,
    api_key_record_use,
    api_key_revoke,
    invitation_accept,
    invitation_create,
    invitation_get_pending,
    invitation_revoke,
    membership_change_role,
    membership_remove,
    org_update,
    organization_create,
    user_signup,
)
from orgs.tokens import API_KEY_RE, api_key_digest
from runs.models import AuditEvent

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple 42"
SIGNUP_LINKS = {"confirm_url_template": "http://testserver/signup/confirm/{token}/", "login_url": "http://testserver/"}


@pytest.fixture
def from_request():
    """Bind a request context as the middleware would, so the audit trail records IP and user agent."""
    token = request_context.bind(request_context.RequestContext(ip="198.51.100.23", user_agent="Browser/1.0"))
    yield "198.51.100.23"
    request_context.unbind(token)


def _membership(member) -> Membership:
    return Membership.objects.get(user=member.user, org=member.org)


def _only_event(name: str) -> AuditEvent:
    events = list(AuditEvent.objects.filter(event=name))
    assert len(events) == 1, [e.event for e in events]
    return events[0]


# --- Sign-up and organizations ----------------------------------------------------------------------


def test_signup_creates_an_inactive_user_their_org_admin_membership_and_audit_event(from_request):
    user_signup(email="New.Person@Example.COM", password=PASSWORD, org_name="  Acme  ", name="New", **SIGNUP_LINKS)
    user = User.objects.get(email="new.person@example.com")
    assert user.check_password(PASSWORD)
    assert not user.is_active  # until the link mailed to the address is opened
    membership = Membership.objects.get(user=user)
    org = membership.org
    assert (org.name, org.slug, membership.role) == ("Acme", "acme", Role.ADMIN)
    event = _only_event(AuditEvent.USER_SIGNED_UP)
    assert (event.org_id, event.actor_user_id, event.target_type, event.target_id) == (
        org.id,
        user.id,
        "user",
        str(user.id),
    )
    assert event.ip == from_request
    assert event.user_agent == "Browser/1.0"


def test_signup_with_an_existing_email_in_any_case_changes_nothing(cast):
    counts = (User.objects.count(), Organization.objects.count(), Membership.objects.count())
    user_signup(email="ALICE@a.example", password="another passphrase 99", org_name="Dup", **SIGNUP_LINKS)
    assert (User.objects.count(), Organization.objects.count(), Membership.objects.count()) == counts
    alice = User.objects.get(pk=cast.admin_a.user.pk)
    assert alice.is_active
    assert alice.check_password(PASSWORD)
    assert not AuditEvent.objects.filter(event=AuditEvent.USER_SIGNED_UP).exists()


def test_signup_gives_distinct_slugs_to_same_named_orgs():
    user_signup(email="one@example.com", password=PASSWORD, org_name="Same Name", **SIGNUP_LINKS)
    user_signup(email="two@example.com", password=PASSWORD, org_name="Same Name", **SIGNUP_LINKS)
    first = Organization.objects.get(memberships__user__email="one@example.com")
    second = Organization.objects.get(memberships__user__email="two@example.com")
    assert first.slug == "same-name"
    assert second.slug.startswith("same-name-")


def test_creating_another_org_is_audited_in_that_org(cast):
    org = organization_create(name="Side Project", admin=cast.admin_a.user)
    event = AuditEvent.objects.get(event=AuditEvent.ORG_CREATED, org=org)
    assert event.actor_user == cast.admin_a.user
    assert event.target_id == str(org.id)
    assert not AuditEvent.objects.filter(event=AuditEvent.ORG_CREATED, org=cast.org_b, target_id=str(org.id)).exists()


def test_org_needs_a_name():
    user = User.objects.create_user(email="x@example.com", password=PASSWORD)
    with pytest.raises(ValidationError):
        organization_create(name="   ", admin=user)
    assert not Organization.objects.exists()


def test_org_update_is_audited_with_the_change(cast, from_request):
    org_update(org=cast.org_a, actor=cast.admin_a.user, name="Renamed")
    event = _only_event(AuditEvent.ORG_SETTINGS_CHANGED)
    assert event.org_id == cast.org_a.id
    assert event.actor_user_id == cast.admin_a.user.id
    assert event.metadata == {"changes": {"name": ["Org A", "Renamed"]}}
    assert event.ip == from_request


# --- Memberships ------------------------------------------------------------------------------------


def test_last_admin_cannot_be_demoted(cast):
    with pytest.raises(ValidationError) as excinfo:
        membership_change_role(membership=_membership(cast.admin_a), role=Role.DEVELOPER, actor=cast.admin_a.user)
    assert excinfo.value.code == LAST_ADMIN
    assert _membership(cast.admin_a).role == Role.ADMIN
    assert not AuditEvent.objects.filter(event=AuditEvent.MEMBER_ROLE_CHANGED).exists()


def test_last_admin_cannot_be_removed(cast):
    with pytest.raises(ValidationError) as excinfo:
        membership_remove(membership=_membership(cast.admin_a), actor=cast.admin_a.user)
    assert excinfo.value.code == LAST_ADMIN
    assert Membership.objects.filter(user=cast.admin_a.user, org=cast.org_a).exists()


def test_a_stale_membership_object_cannot_dodge_the_last_admin_rule(cast):
    """The rule reads the database under a lock, not the caller's copy of the row."""
    dave = _membership(cast.dev_a)
    membership_change_role(membership=dave, role=Role.ADMIN, actor=cast.admin_a.user)
    stale_alice = _membership(cast.admin_a)
    membership_change_role(membership=dave, role=Role.DEVELOPER, actor=cast.admin_a.user)
    with pytest.raises(ValidationError):
        membership_remove(membership=stale_alice, actor=cast.admin_a.user)


def test_role_change_is_audited(cast, from_request):
    dave = _membership(cast.dev_a)
    membership_change_role(membership=dave, role=Role.ADMIN, actor=cast.admin_a.user)
    event = _only_event(AuditEvent.MEMBER_ROLE_CHANGED)
    assert (event.org_id, event.actor_user_id, event.target_type, event.target_id, event.ip) == (
        cast.org_a.id,
        cast.admin_a.user.id,
        "membership",
        str(dave.id),
        from_request,
    )
    assert event.metadata == {"email": "dave@a.example", "from": "developer", "to": "admin"}


def test_unchanged_role_writes_nothing(cast):
    membership_change_role(membership=_membership(cast.dev_a), role=Role.DEVELOPER, actor=cast.admin_a.user)
    assert not AuditEvent.objects.filter(event=AuditEvent.MEMBER_ROLE_CHANGED).exists()


def test_unknown_role_is_refused(cast):
    with pytest.raises(ValidationError):
        membership_change_role(membership=_membership(cast.dev_a), role="owner", actor=cast.admin_a.user)


def test_member_removal_is_audited(cast, from_request):
    dave = _membership(cast.dev_a)
    dave_id = dave.id  # delete() clears the instance's pk
    membership_remove(membership=dave, actor=cast.admin_a.api_key)
    assert not Membership.objects.filter(pk=dave_id).exists()
    event = _only_event(AuditEvent.MEMBER_REMOVED)
    assert (event.org_id, event.actor_api_key_id, event.target_id, event.ip) == (
        cast.org_a.id,
        cast.admin_a.api_key.id,
        str(dave_id),
        from_request,
    )
    assert event.metadata == {"email": "dave@a.example", "role": "developer"}


# --- Invitations ------------------------------------------------------------------------------------


def test_invitation_is_single_use_and_audited(cast, from_request):
    invitation, token = invitation_create(
        org=cast.org_a, email="New@Example.com", role=Role.ADMIN, actor=cast.admin_a.user
    )
    assert invitation.email == "new@example.com"
    assert token not in invitation.token_hash
    sent = _only_event(AuditEvent.INVITATION_SENT)
    assert (sent.org_id, sent.actor_user_id, sent.target_id, sent.ip) == (
        cast.org_a.id,
        cast.admin_a.user.id,
        str(invitation.id),
        from_request,
    )
    assert sent.metadata == {"email": "new@example.com", "role": "admin"}
    assert token not in str(sent.metadata)

    newcomer = User.objects.create_user(email="new@example.com", password=PASSWORD)
    membership = invitation_accept(token=token, user=newcomer)
    assert (membership.org_id, membership.role) == (cast.org_a.id, Role.ADMIN)
    accepted = _only_event(AuditEvent.INVITATION_ACCEPTED)
    assert (accepted.actor_user_id, accepted.target_type, accepted.target_id) == (
        newcomer.id,
        "membership",
        str(membership.id),
    )

    with pytest.raises(ValidationError):
        invitation_accept(token=token, user=newcomer)
    assert invitation_get_pending(token=token) is None


def test_invitation_expires_after_seven_days(cast):
    start = timezone.now()
    with freeze_time(start):
        _, token = invitation_create(
            org=cast.org_a, email="late@example.com", role=Role.DEVELOPER, actor=cast.admin_a.user
        )
    late = User.objects.create_user(email="late@example.com", password=PASSWORD)
    with freeze_time(start + timedelta(days=7, seconds=1)):
        assert invitation_get_pending(token=token) is None
        with pytest.raises(ValidationError):
            invitation_accept(token=token, user=late)
    assert not Membership.objects.filter(user=late).exists()


def test_invitation_still_works_just_before_seven_days(cast):
    start = timezone.now()
    with freeze_time(start):
        _, token = invitation_create(
            org=cast.org_a, email="ontime@example.com", role=Role.DEVELOPER, actor=cast.admin_a.user
        )
    user = User.objects.create_user(email="ontime@example.com", password=PASSWORD)
    with freeze_time(start + timedelta(days=6, hours=23)):
        assert invitation_accept(token=token, user=user).org_id == cast.org_a.id


def test_invitation_for_another_email_is_refused(cast):
    _, token = invitation_create(org=cast.org_a, email="invited@example.com", role=Role.ADMIN, actor=cast.admin_a.user)
    with pytest.raises(ValidationError, match="different email"):
        invitation_accept(token=token, user=cast.outsider.user)
    assert not Membership.objects.filter(user=cast.outsider.user).exists()
    assert invitation_get_pending(token=token) is not None  # still usable by the right person


def test_reinviting_revokes_the_old_link(cast):
    _, old = invitation_create(org=cast.org_a, email="twice@example.com", role=Role.ADMIN, actor=cast.admin_a.user)
    _, new = invitation_create(org=cast.org_a, email="TWICE@example.com", role=Role.DEVELOPER, actor=cast.admin_a.user)
    user = User.objects.create_user(email="twice@example.com", password=PASSWORD)
    with pytest.raises(ValidationError):
        invitation_accept(token=old, user=user)
    assert invitation_accept(token=new, user=user).role == Role.DEVELOPER
    assert Invitation.objects.filter(org=cast.org_a, email="twice@example.com").exclude(revoked_at=None).count() == 1


def test_inviting_an_existing_member_is_refused(cast):
    with pytest.raises(ValidationError):
        invitation_create(org=cast.org_a, email="DAVE@a.example", role=Role.ADMIN, actor=cast.admin_a.user)


def test_revoked_invitation_cannot_be_accepted_and_is_audited(cast):
    invitation, token = invitation_create(
        org=cast.org_a, email="r@example.com", role=Role.ADMIN, actor=cast.admin_a.user
    )
    invitation_revoke(invitation=invitation, actor=cast.admin_a.user)
    invitation_revoke(invitation=invitation, actor=cast.admin_a.user)  # idempotent
    assert _only_event(AuditEvent.INVITATION_REVOKED).target_id == str(invitation.id)
    with pytest.raises(ValidationError):
        invitation_accept(token=token, user=User.objects.create_user(email="r@example.com", password=PASSWORD))


# --- Org API keys -----------------------------------------------------------------------------------


def test_api_key_is_stored_as_a_digest_and_audited(cast, from_request):
    api_key, secret = api_key_create(org=cast.org_a, name="ci", actor=cast.admin_a.user)
    assert API_KEY_RE.match(secret)
    stored = ApiKey.objects.get(pk=api_key.pk)
    assert stored.digest == api_key_digest(secret)
    assert secret not in repr(stored)
    assert secret not in str(stored)
    assert sorted(stored.scopes) == sorted(DEFAULT_API_KEY_SCOPES)
    event = AuditEvent.objects.get(event=AuditEvent.API_KEY_CREATED, target_id=str(api_key.id))
    assert (event.org_id, event.actor_user_id, event.ip) == (cast.org_a.id, cast.admin_a.user.id, from_request)


def test_api_key_scopes_cannot_exceed_the_creators(cast):
    with pytest.raises(ValidationError) as excinfo:
        api_key_create(org=cast.org_a, name="x", actor=cast.dev_a.user, scopes=["audit:read"])
    assert "scopes" in excinfo.value.message_dict
    limited, _ = api_key_create(org=cast.org_a, name="l", actor=cast.admin_a.user, scopes=["api_keys:manage"])
    with pytest.raises(ValidationError):
        api_key_create(org=cast.org_a, name="y", actor=limited, scopes=["api_keys:manage", "org:read"])
    # A member of another org holds no capabilities in this one.
    with pytest.raises(ValidationError):
        api_key_create(org=cast.org_a, name="z", actor=cast.admin_b.user, scopes=["org:read"])
    with pytest.raises(ValidationError):
        api_key_create(org=cast.org_a, name="k", actor=cast.admin_b.api_key, scopes=["org:read"])
    assert not ApiKey.objects.filter(name__in=["x", "y", "z", "k"]).exists()


def test_operator_commands_may_grant_any_scope(cast):
    api_key, _ = api_key_create(org=cast.org_a, name="ops", actor=None, scopes=sorted(ADMIN_CAPABILITIES))
    assert set(api_key.scopes) == ADMIN_CAPABILITIES
    assert api_key.created_by is None


@pytest.mark.parametrize(
    "kwargs",
    [{"name": ""}, {"scopes": []}, {"scopes": ["root"]}, {"expires_at": "past"}],
)
def test_api_key_bad_input_is_refused(cast, kwargs):
    if kwargs.get("expires_at") == "past":
        kwargs = {"expires_at": timezone.now() - timedelta(seconds=1)}
    with pytest.raises(ValidationError):
        api_key_create(org=cast.org_a, actor=cast.admin_a.user, **{"name": "k", **kwargs})


def test_api_key_revoke_is_idempotent_and_audited_once(cast, from_request):
    api_key_revoke(api_key=cast.dev_a.api_key, actor=cast.admin_a.user)
    first = ApiKey.objects.get(pk=cast.dev_a.api_key.pk).revoked_at
    api_key_revoke(api_key=cast.dev_a.api_key, actor=cast.admin_a.user)
    assert ApiKey.objects.get(pk=cast.dev_a.api_key.pk).revoked_at == first
    event = _only_event(AuditEvent.API_KEY_REVOKED)
    assert (event.actor_user_id, event.target_id, event.ip) == (
        cast.admin_a.user.id,
        str(cast.dev_a.api_key.id),
        from_request,
    )


def test_api_key_record_use_writes_at_most_once_a_minute(cast, django_assert_num_queries):
    api_key = ApiKey.objects.get(pk=cast.dev_a.api_key.pk)
    start = timezone.now()
    with freeze_time(start), django_assert_num_queries(1):
        api_key_record_use(api_key=api_key)
    with freeze_time(start + timedelta(seconds=30)), django_assert_num_queries(0):
        api_key_record_use(api_key=api_key)
    # Another process holding a stale copy does not write again within the minute either.
    stale = ApiKey.objects.get(pk=api_key.pk)
    stale.last_used_at = None
    with freeze_time(start + timedelta(seconds=30)):
        api_key_record_use(api_key=stale)
    assert ApiKey.objects.get(pk=api_key.pk).last_used_at == start
