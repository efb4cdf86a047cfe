"""Sign-up proves the address and never tells whether it already has an account.

A new address gets an inactive account and a single-use link (24 h); an unconfirmed one gets a fresh link; an
existing one gets nothing but a note to its holder (when SMTP is configured). All three answer with the same
bytes and do the same hashing work. Production without SMTP has no self-service sign-up at all.
"""

from __future__ import annotations

import re
from datetime import timedelta
from io import StringIO
from typing import Any, ClassVar

import pytest
from django.contrib.auth import authenticate
from django.contrib.auth.hashers import MD5PasswordHasher
from django.core import mail
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from freezegun import freeze_time

from orgs.models import Membership, Organization, SignupConfirmation, User
from orgs.services import SIGNUP_CLOSED_MESSAGE, signups_unconfirmed_purge
from runs.models import AuditEvent
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db

EMAIL = "sam@example.com"
NEW_PASSWORD = "a long and unusual passphrase 7"
GENERIC_LOGIN_FAILURE = "Email or password is incorrect."
CONFIRM_LINK_RE = re.compile(r"http://testserver(/signup/confirm/[A-Za-z0-9_\-]+/)")
CSRF_RE = re.compile(r'name="csrfmiddlewaretoken" value="[^"]*"')


class CountingHasher(MD5PasswordHasher):
    """Counts the passwords hashed, to prove every sign-up path does the same work."""

    calls: ClassVar[int] = 0

    def encode(self, password: str, salt: str) -> str:
        type(self).calls += 1
        return super().encode(password, salt)


def _signup(email: str = EMAIL, password: str = NEW_PASSWORD, org_name: str = "Acme") -> Any:
    data = {"email": email, "name": "Sam", "org_name": org_name, "password": password}
    return Client().post(reverse("orgs:signup"), data)


def _signup_mailed(capture: Any, **kwargs: Any) -> Any:
    with capture(execute=True):
        return _signup(**kwargs)


def _last_link() -> str:
    match = CONFIRM_LINK_RE.search(str(mail.outbox[-1].body))
    assert match, mail.outbox[-1].body
    return match.group(1)


def _comparable(response: Any) -> tuple[int, dict[str, str], list[str], str]:
    # Cookies and the request id differ on every response, whoever owns the address: the rest must not.
    headers = {
        name: value for name, value in response.headers.items() if name.lower() not in ("set-cookie", "x-request-id")
    }
    return response.status_code, headers, sorted(response.cookies), CSRF_RE.sub("", response.content.decode())


def _login(email: str, password: str) -> Any:
    return Client().post(reverse("orgs:login"), {"email": email, "password": password})


# --- One answer whoever owns the address ------------------------------------------------------------


def test_new_unconfirmed_and_existing_addresses_get_byte_identical_responses(
    django_capture_on_commit_callbacks, settings
):
    settings.EMAIL_ENABLED = True
    new = _signup_mailed(django_capture_on_commit_callbacks)
    unconfirmed = _signup_mailed(django_capture_on_commit_callbacks)
    assert Client().post(_last_link(), {"password": NEW_PASSWORD}).status_code == 302
    existing = _signup_mailed(django_capture_on_commit_callbacks)
    assert new.status_code == 200
    assert "Check your inbox" in new.content.decode()
    assert _comparable(new) == _comparable(unconfirmed) == _comparable(existing)
    # What differs is in the mailbox only: two links, then a note to the holder.
    assert [m.to for m in mail.outbox] == [[EMAIL]] * 3
    assert [bool(CONFIRM_LINK_RE.search(str(m.body))) for m in mail.outbox] == [True, True, False]
    assert "already has an account" in mail.outbox[2].body


@pytest.mark.parametrize("email", [EMAIL, "alice@a.example"], ids=["new", "existing"])
def test_every_path_hashes_exactly_one_password(cast, settings, email):
    settings.PASSWORD_HASHERS = [f"{__name__}.CountingHasher"]
    CountingHasher.calls = 0
    assert _signup(email=email).status_code == 200
    assert CountingHasher.calls == 1


@pytest.mark.parametrize("enabled", [True, False])
def test_the_holder_of_an_existing_address_is_mailed_only_when_smtp_is_configured(
    cast, settings, django_capture_on_commit_callbacks, enabled
):
    settings.EMAIL_ENABLED = enabled
    counts = (User.objects.count(), Organization.objects.count())
    response = _signup_mailed(django_capture_on_commit_callbacks, email="ALICE@a.example", org_name="Dup")
    assert response.status_code == 200
    assert (User.objects.count(), Organization.objects.count()) == counts
    if enabled:
        assert [m.to for m in mail.outbox] == [["alice@a.example"]]
        assert "http://testserver/login/" in mail.outbox[0].body
        assert not CONFIRM_LINK_RE.search(str(mail.outbox[0].body))
    else:
        assert mail.outbox == []
    assert User.objects.get(email="alice@a.example").check_password(PASSWORD)


# --- The account waits for its link -----------------------------------------------------------------


def test_an_unconfirmed_account_cannot_sign_in_and_hears_the_generic_failure(django_capture_on_commit_callbacks):
    _signup_mailed(django_capture_on_commit_callbacks)
    user = User.objects.get(email=EMAIL)
    assert not user.is_active
    assert authenticate(email=EMAIL, password=NEW_PASSWORD) is None
    right = _login(EMAIL, NEW_PASSWORD)
    wrong = _login(EMAIL, "not the password at all")
    assert right.status_code == wrong.status_code == 200
    assert right.context["form"].non_field_errors() == wrong.context["form"].non_field_errors()
    assert GENERIC_LOGIN_FAILURE in right.content.decode()
    assert Client().post(_last_link(), {"password": NEW_PASSWORD}).status_code == 302
    assert _login(EMAIL, NEW_PASSWORD).status_code == 302


def test_the_link_confirms_once_and_signs_in(django_capture_on_commit_callbacks):
    _signup_mailed(django_capture_on_commit_callbacks)
    link = _last_link()
    client = Client()
    page = client.get(link)
    assert page.status_code == 200
    assert "Confirm and sign in" in page.content.decode()
    assert not User.objects.get(email=EMAIL).is_active  # opening the link alone changes nothing
    wrong = client.post(link, {"password": "not the sign-up password"})
    assert wrong.status_code == 200
    assert wrong.context["form"].errors["password"]
    assert not User.objects.get(email=EMAIL).is_active  # and the link still works
    response = client.post(link, {"password": NEW_PASSWORD})
    assert response.status_code == 302
    assert response["Location"] == reverse("orgs:home")
    assert "Acme" in client.get(reverse("orgs:home")).content.decode()
    assert User.objects.get(email=EMAIL).is_active
    assert not SignupConfirmation.objects.exists()
    (event,) = AuditEvent.objects.filter(event=AuditEvent.USER_SIGNUP_CONFIRMED)
    assert event.actor_user == User.objects.get(email=EMAIL)
    for method in (Client().get, lambda url: Client().post(url, {"password": NEW_PASSWORD})):
        again = method(link)
        assert again.status_code == 410
        assert "invalid, has expired or has already been used" in again.content.decode()


def test_an_expired_link_is_refused(django_capture_on_commit_callbacks):
    start = timezone.now()
    with freeze_time(start):
        _signup_mailed(django_capture_on_commit_callbacks)
    link = _last_link()
    with freeze_time(start + timedelta(hours=23, minutes=59)):
        assert Client().get(link).status_code == 200
    with freeze_time(start + timedelta(hours=24, seconds=1)):
        assert Client().get(link).status_code == 410
        assert Client().post(link, {"password": NEW_PASSWORD}).status_code == 410
    assert not User.objects.get(email=EMAIL).is_active


@pytest.mark.parametrize("token", ["nope", "x" * 300, "%00"])
def test_a_malformed_link_gets_the_clear_page(token):
    response = Client().get(f"/signup/confirm/{token}/")
    assert response.status_code == 410
    assert Client().post(f"/signup/confirm/{token}/").status_code == 410


def test_signing_up_again_before_confirming_replaces_the_first_attempt(django_capture_on_commit_callbacks):
    _signup_mailed(django_capture_on_commit_callbacks, password="someone else's passphrase 1", org_name="First")
    first_link = _last_link()
    _signup_mailed(django_capture_on_commit_callbacks, org_name="Second")
    second_link = _last_link()
    assert first_link != second_link
    assert Client().post(first_link, {"password": NEW_PASSWORD}).status_code == 410
    assert Client().post(second_link, {"password": NEW_PASSWORD}).status_code == 302
    user = User.objects.get(email=EMAIL)
    assert user.check_password(NEW_PASSWORD)  # the password of whoever followed the link they were sent
    assert [m.org.name for m in Membership.objects.filter(user=user).select_related("org")] == ["Second"]
    assert not Organization.objects.filter(name="First").exists()


def test_someone_who_signed_up_with_anothers_address_cannot_take_the_account(django_capture_on_commit_callbacks):
    """The victim signs up, then an attacker signs up with the same address: the only live link goes to the
    victim's inbox, and it opens nothing without the attacker's password, which the victim does not have; the
    attacker, without the inbox, has no link at all. Nobody is signed in to an account they did not choose."""
    _signup_mailed(django_capture_on_commit_callbacks, org_name="Victim's")
    _signup_mailed(django_capture_on_commit_callbacks, password="the attacker's passphrase 9", org_name="Attacker's")
    link = _last_link()  # in the victim's inbox
    response = Client().post(link, {"password": NEW_PASSWORD})
    assert response.status_code == 200
    assert getattr(response.wsgi_request, "cf_session", None) is None
    assert not User.objects.get(email=EMAIL).is_active


def test_password_guesses_on_the_link_lock_like_sign_in(django_capture_on_commit_callbacks, settings):
    settings.LOGIN_FAILURE_LIMIT_ACCOUNT = 2
    _signup_mailed(django_capture_on_commit_callbacks)
    link = _last_link()
    statuses = [Client().post(link, {"password": f"guess {n}"}).status_code for n in range(3)]
    assert statuses[-1] == 429
    assert Client().post(link, {"password": NEW_PASSWORD}).status_code == 429  # locked, even with the right one
    assert not User.objects.get(email=EMAIL).is_active


def test_an_invitation_gives_way_to_an_unconfirmed_sign_up_of_its_address(cast, django_capture_on_commit_callbacks):
    _signup_mailed(django_capture_on_commit_callbacks, password="a squatter's passphrase 3", org_name="Squat")
    invite = cast.admin_a.client().post(reverse("orgs:team"), {"email": EMAIL, "role": "developer"})
    assert invite.status_code == 200
    link = re.search(r"/invite/[A-Za-z0-9_\-]+/", invite.content.decode())
    assert link
    response = Client().post(link.group(0), {"name": "Real Owner", "password": NEW_PASSWORD})
    assert response.status_code == 302
    user = User.objects.get(email=EMAIL)
    assert user.is_active
    assert user.check_password(NEW_PASSWORD)
    assert not Organization.objects.filter(name="Squat").exists()


# --- Production without SMTP ------------------------------------------------------------------------


def test_production_without_smtp_signs_up_by_invitation_only(settings):
    settings.PRODUCTION, settings.EMAIL_ENABLED = True, False
    page = Client().get(reverse("orgs:signup"))
    assert page.status_code == 200
    assert SIGNUP_CLOSED_MESSAGE in page.content.decode()
    assert "csrfmiddlewaretoken" not in page.content.decode()  # no form to fill in
    refused = _signup()
    assert refused.status_code == 403
    assert SIGNUP_CLOSED_MESSAGE in refused.content.decode()
    assert not User.objects.exists()


def test_production_with_smtp_signs_up(settings, django_capture_on_commit_callbacks):
    settings.PRODUCTION, settings.EMAIL_ENABLED = True, True
    assert 'name="org_name"' in Client().get(reverse("orgs:signup")).content.decode()
    assert _signup_mailed(django_capture_on_commit_callbacks).status_code == 200
    assert User.objects.filter(email=EMAIL, is_active=False).exists()


# --- Unconfirmed sign-ups are purged ----------------------------------------------------------------


def test_sign_ups_unconfirmed_past_their_link_are_purged_with_their_org(cast, django_capture_on_commit_callbacks):
    _signup_mailed(django_capture_on_commit_callbacks, email="stale@example.com", org_name="Stale")
    _signup_mailed(django_capture_on_commit_callbacks, email="fresh@example.com", org_name="Fresh")
    _signup_mailed(django_capture_on_commit_callbacks, email="byhand@example.com", org_name="By Hand")
    past = timezone.now() - timedelta(seconds=1)
    SignupConfirmation.objects.exclude(user__email="fresh@example.com").update(expires_at=past)
    User.objects.filter(email="byhand@example.com").update(is_active=True)  # an operator activated it
    out = StringIO()
    call_command("purge_unconfirmed_signups", stdout=out)
    assert out.getvalue().strip() == "Deleted 1 unconfirmed sign-up(s)."
    assert not User.objects.filter(email="stale@example.com").exists()
    assert not Organization.objects.filter(name="Stale").exists()
    assert set(
        User.objects.filter(email__in=["fresh@example.com", "byhand@example.com"]).values_list("email", flat=True)
    ) == {
        "fresh@example.com",
        "byhand@example.com",
    }
    assert Organization.objects.filter(name__in=["Fresh", "By Hand", "Org A", "Org B"]).count() == 4
    assert list(SignupConfirmation.objects.values_list("user__email", flat=True)) == ["fresh@example.com"]
    assert signups_unconfirmed_purge() == 0
