"""Logging in: one generic failure message, the per-account and per-IP temporary lock, and passwords."""

from __future__ import annotations

import re

import pytest
from django.conf import settings
from django.core import mail
from django.test import Client
from django.urls import reverse

from orgs.models import User
from orgs.sessions.store import session_store
from orgs.validators import MAX_PASSWORD_LENGTH
from runs.models import AuditEvent
from tests.conftest import PASSWORD
from tests.signin import session_of, sign_in

pytestmark = pytest.mark.django_db

GENERIC = "Email or password is incorrect."
LOCKED = "Too many failed sign-in attempts"


def _login(client: Client, email: str, password: str, ip: str = "10.0.0.1", **extra):
    return client.post(reverse("orgs:login"), {"email": email, "password": password, **extra}, REMOTE_ADDR=ip)


@pytest.fixture
def limits(settings):
    settings.LOGIN_FAILURE_LIMIT_ACCOUNT = 3
    settings.LOGIN_FAILURE_LIMIT_IP = 5
    settings.LOGIN_LOCKOUT_SECONDS = 600
    return settings


def test_correct_password_logs_in_rotates_session_and_is_audited(cast):
    client = Client()
    sign_in(client, cast.admin_a.user)  # an earlier session on this browser
    before = session_of(client)
    response = _login(client, "Alice@A.example", PASSWORD)
    assert response.status_code == 302
    assert response["Location"] == reverse("orgs:home")
    after = session_of(client)
    assert before is not None
    assert after is not None
    assert after.key != before.key
    assert session_store().get(before.key) is None  # the old session is gone, not just replaced in the cookie
    assert client.get(reverse("orgs:home")).status_code == 200
    assert AuditEvent.objects.filter(event=AuditEvent.LOGIN_SUCCEEDED, actor_user=cast.admin_a.user).exists()


def test_unknown_email_and_wrong_password_get_the_same_message(cast):
    unknown = _login(Client(), "nobody@nowhere.example", PASSWORD)
    wrong = _login(Client(), "alice@a.example", "not the password at all")
    for response in (unknown, wrong):
        assert response.status_code == 200
        assert response.context["form"].non_field_errors() == [GENERIC]
        assert response.wsgi_request.cf_session is None
        assert settings.SESSION_COOKIE_NAME not in response.cookies
    assert AuditEvent.objects.filter(event=AuditEvent.LOGIN_FAILED, org=cast.org_a).count() == 1
    failed = AuditEvent.objects.get(event=AuditEvent.LOGIN_FAILED, org=cast.org_a)
    assert failed.metadata == {"email": "alice@a.example"}
    assert failed.ip == "10.0.0.1"


def test_inactive_user_gets_the_generic_message(cast):
    User.objects.filter(pk=cast.admin_a.user.pk).update(is_active=False)
    response = _login(Client(), "alice@a.example", PASSWORD)
    assert response.context["form"].non_field_errors() == [GENERIC]


def test_login_redirects_to_safe_next_only(cast):
    response = _login(Client(), "alice@a.example", PASSWORD, next="/team/")
    assert response["Location"] == "/team/"
    response = _login(Client(), "alice@a.example", PASSWORD, next="https://evil.example/")
    assert response["Location"] == reverse("orgs:home")


def test_account_lockout_refuses_even_the_right_password_and_is_audited_once(cast, limits):
    client = Client()
    for _ in range(2):
        assert _login(client, "alice@a.example", "wrong password!").status_code == 200
    third = _login(client, "alice@a.example", "wrong password!")
    assert third.status_code == 429
    assert LOCKED in third.content.decode()
    assert 0 < int(third["Retry-After"]) <= 600

    refused = _login(client, "alice@a.example", PASSWORD)
    assert refused.status_code == 429
    assert refused.wsgi_request.cf_session is None
    assert settings.SESSION_COOKIE_NAME not in refused.cookies
    _login(client, "alice@a.example", "wrong password!")

    locks = AuditEvent.objects.filter(event=AuditEvent.LOGIN_LOCKED_OUT, org=cast.org_a)
    assert locks.count() == 1
    assert locks.get().metadata == {"email": "alice@a.example", "scope": "account"}
    # Attempts during the lock never reach the password check, so they are not login failures either.
    assert AuditEvent.objects.filter(event=AuditEvent.LOGIN_FAILED, org=cast.org_a).count() == 3
    # Another account is unaffected.
    assert _login(Client(), "bob@b.example", PASSWORD, ip="10.9.9.9").status_code == 302


def test_account_lock_does_not_lock_the_owner_out_from_an_address_that_never_failed(cast, limits):
    attacker = Client()
    for _ in range(3):
        _login(attacker, "alice@a.example", "wrong password!", ip="203.0.113.9")
    assert _login(attacker, "alice@a.example", PASSWORD, ip="203.0.113.9").status_code == 429
    # Alice, elsewhere, with her password: not a denial of service.
    assert _login(Client(), "alice@a.example", PASSWORD, ip="198.51.100.7").status_code == 302
    # A new address that guesses wrong joins the refused ones at once.
    assert _login(Client(), "alice@a.example", "still wrong!", ip="192.0.2.44").status_code in {200, 429}
    assert _login(Client(), "alice@a.example", PASSWORD, ip="192.0.2.44").status_code == 429


def test_unknown_email_locks_the_same_way(cast, limits):
    responses = [_login(Client(), "ghost@nowhere.example", "whatever pass") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert AuditEvent.objects.filter(event=AuditEvent.LOGIN_LOCKED_OUT, org=None).count() == 1


def test_ip_lock_blocks_that_ip_but_not_the_same_account_elsewhere(cast, limits):
    limits.LOGIN_FAILURE_LIMIT_ACCOUNT = 100
    # Spraying one wrong password over many accounts from one address.
    statuses = [_login(Client(), f"user{i}@spray.example", "Winter2026!", ip="10.6.6.6").status_code for i in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    assert _login(Client(), "alice@a.example", PASSWORD, ip="10.6.6.6").status_code == 429
    assert _login(Client(), "alice@a.example", PASSWORD, ip="10.7.7.7").status_code == 302
    event = AuditEvent.objects.get(event=AuditEvent.LOGIN_LOCKED_OUT)
    assert event.metadata["scope"] == "ip"


def test_successful_login_resets_the_account_count(cast, limits):
    for _ in range(2):
        _login(Client(), "alice@a.example", "wrong password!")
    assert _login(Client(), "alice@a.example", PASSWORD).status_code == 302
    for _ in range(2):
        assert _login(Client(), "alice@a.example", "wrong password!").status_code == 200
    assert not AuditEvent.objects.filter(event=AuditEvent.LOGIN_LOCKED_OUT).exists()


def test_login_form_errors_are_not_counted_as_failures(cast, limits):
    for _ in range(5):
        response = Client().post(reverse("orgs:login"), {"email": "alice@a.example", "password": ""})
        assert response.status_code == 200
        assert response.context["form"].errors["password"]
    assert _login(Client(), "alice@a.example", PASSWORD).status_code == 302


def test_authenticated_user_visiting_login_goes_home(cast):
    response = cast.admin_a.client().get(reverse("orgs:login"))
    assert response.status_code == 302
    assert response["Location"] == reverse("orgs:home")


# --- Passwords --------------------------------------------------------------------------------------


@pytest.mark.real_hasher
def test_100_character_emoji_password_signs_up_and_logs_in_with_bcrypt_sha256(django_capture_on_commit_callbacks):
    password = ("🔐 long passphrase with emoji 🚀 " * 4)[:100]
    assert len(password) == 100
    with django_capture_on_commit_callbacks(execute=True):
        response = Client().post(
            reverse("orgs:signup"), {"email": "long@example.com", "org_name": "Long", "password": password}
        )
    assert response.status_code == 200, response.context["form"].errors if response.context else response
    user = User.objects.get(email="long@example.com")
    assert user.password.startswith("bcrypt_sha256$")
    link = re.search(r"http://testserver(/signup/confirm/\S+/)", str(mail.outbox[0].body))
    assert link, "the confirmation link is mailed"
    assert Client().post(link.group(1), {"password": password}).status_code == 302
    assert _login(Client(), "long@example.com", password).status_code == 302
    # bcrypt alone would silently ignore everything past byte 72; bcrypt-SHA256 must not.
    assert _login(Client(), "long@example.com", password[:-1] + "x").status_code == 200


def test_5000_character_password_is_a_form_error_not_a_500(cast):
    huge = "p" * 5000
    response = Client().post(reverse("orgs:signup"), {"email": "huge@example.com", "org_name": "H", "password": huge})
    assert response.status_code == 200
    assert f"at most {MAX_PASSWORD_LENGTH} characters" in str(response.context["form"].errors["password"])
    assert not User.objects.filter(email="huge@example.com").exists()
    login = _login(Client(), "alice@a.example", huge)
    assert login.status_code == 200
    assert login.context["form"].errors["password"]
