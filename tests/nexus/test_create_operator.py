"""``manage.py create_operator`` and the one-time enrolment link: shown once, stored as a hash, single-use, 24 hours;
the enrolment page shows the otpauth URI and an inline QR code and needs a first code; only then can one sign in."""

from __future__ import annotations

import hashlib
import io
import re
import sys
from datetime import timedelta

import pytest
from django.contrib.auth.hashers import identify_hasher
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone
from freezegun import freeze_time

from nexus import audit
from nexus.models import InstallationEvent, Operator, OperatorRole
from nexus.totp import STEP_SECONDS, totp_code_at, totp_open
from tests.nexus.conftest import OPERATOR_PASSWORD, make_operator, nexus_url, post_sign_in

pytestmark = pytest.mark.django_db

LINK = re.compile(r"/nexus/enrol/([A-Za-z0-9_-]+)/")


def _create(*args: str, stdin: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> str:
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    out = io.StringIO()
    call_command("create_operator", *args, stdout=out)
    return out.getvalue()


def _token(output: str) -> str:
    match = LINK.search(output)
    assert match, output
    return match.group(1)


def _current_code(operator: Operator, *, offset: int = 0) -> str:
    secret = totp_open(sealed=operator.totp_sealed, operator_id=operator.pk)
    return totp_code_at(secret, int(timezone.now().timestamp() // STEP_SECONDS) + offset)


def _password(output: str) -> str:
    lines = output.splitlines()
    return lines[lines.index("Password (shown once; store it now):") + 1]


def _unlock(token: str, password: str, client: Client | None = None):
    """The enrolment page's first step: the password, answered with the secret page (or not)."""
    return (client or Client()).post(nexus_url(f"enrol/{token}/"), {"password": password})


def _enrol(token: str, code: str, password: str, client: Client | None = None):
    client = client or Client()
    page = _unlock(token, password, client)
    match = re.search(r'name="unlock" value="([^"]+)"', page.content.decode())
    unlock = match.group(1) if match else ""
    return client.post(nexus_url(f"enrol/{token}/"), {"code": code, "unlock": unlock})


def test_create_operator_prints_the_password_once_and_the_enrolment_link(monkeypatch):
    output = _create("--email", "Ops@Example.com", "--name", "Ops", "--role", "admin")
    operator = Operator.objects.get(email="ops@example.com")
    assert operator.role == OperatorRole.ADMIN
    token = _token(output)
    assert operator.enrolment_token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in operator.enrolment_token_hash
    assert operator.totp_enrolled_at is None
    assert operator.enrolment_expires_at is not None
    assert operator.enrolment_expires_at - timezone.now() <= timedelta(hours=24)
    lines = output.splitlines()
    password = lines[lines.index("Password (shown once; store it now):") + 1]
    assert operator.check_password(password)
    assert InstallationEvent.objects.filter(event=audit.CREATED, target_id=str(operator.pk)).exists()


def test_password_from_stdin_is_used_and_not_printed(monkeypatch):
    output = _create(
        "--email", "ops@example.com", "--password-stdin", stdin=OPERATOR_PASSWORD + "\n", monkeypatch=monkeypatch
    )
    assert OPERATOR_PASSWORD not in output
    assert Operator.objects.get(email="ops@example.com").check_password(OPERATOR_PASSWORD)


def test_a_weak_password_or_a_duplicate_email_is_refused(monkeypatch):
    with pytest.raises(CommandError):
        _create("--email", "ops@example.com", "--password-stdin", stdin="password\n", monkeypatch=monkeypatch)
    _create("--email", "ops@example.com")
    with pytest.raises(CommandError, match="already exists"):
        _create("--email", "OPS@example.com")


@pytest.mark.real_hasher
def test_operator_passwords_are_hashed_with_bcrypt(monkeypatch):
    _create("--email", "ops@example.com", "--password-stdin", stdin=OPERATOR_PASSWORD + "\n", monkeypatch=monkeypatch)
    operator = Operator.objects.get(email="ops@example.com")
    assert identify_hasher(operator.password).algorithm == "bcrypt_sha256"
    assert OPERATOR_PASSWORD not in operator.password


def test_the_enrolment_page_asks_for_the_password_before_showing_the_secret():
    output = _create("--email", "ops@example.com")
    token = _token(output)
    operator = Operator.objects.get(email="ops@example.com")
    secret = totp_open(sealed=operator.totp_sealed, operator_id=operator.pk)
    first = Client().get(nexus_url(f"enrol/{token}/"))
    assert first.status_code == 200
    assert secret not in first.content.decode()
    assert "otpauth://" not in first.content.decode()
    wrong = _unlock(token, "not the password")
    assert "otpauth://" not in wrong.content.decode()
    assert b"not your password" in wrong.content
    # A code posted with a forged or missing unlock value never reaches the check.
    forged = Client().post(nexus_url(f"enrol/{token}/"), {"code": "123456", "unlock": "forged"})
    assert b"Enter your password again" in forged.content
    operator.refresh_from_db()
    assert operator.totp_enrolled_at is None


def test_wrong_passwords_on_the_enrolment_page_lock_like_sign_in(settings):
    settings.LOGIN_FAILURE_LIMIT_ACCOUNT = 2
    output = _create("--email", "ops@example.com")
    token = _token(output)
    statuses = [_unlock(token, f"guess {n}").status_code for n in range(3)]
    assert statuses[-1] == 429
    locked = _unlock(token, _password(output))
    assert locked.status_code == 429
    assert "otpauth://" not in locked.content.decode()


def test_the_enrolment_page_shows_the_uri_and_an_inline_qr_code_without_script():
    output = _create("--email", "ops@example.com")
    token = _token(output)
    operator = Operator.objects.get(email="ops@example.com")
    response = _unlock(token, _password(output))
    assert response.status_code == 200
    body = response.content.decode()
    secret = totp_open(sealed=operator.totp_sealed, operator_id=operator.pk)
    assert f"otpauth://totp/CesaFlow%20Nexus:ops%40example.com?secret={secret}" in body
    assert "<svg" in body
    assert "<script>" not in body  # the page's only scripts are the admin's static files
    assert "no-store" in response["Cache-Control"]


def test_enrolment_needs_a_valid_first_code_then_the_link_is_used_up_and_sign_in_works(monkeypatch):
    output = _create(
        "--email", "ops@example.com", "--password-stdin", stdin=OPERATOR_PASSWORD + "\n", monkeypatch=monkeypatch
    )
    token = _token(output)
    operator = Operator.objects.get(email="ops@example.com")
    # Not enrolled yet: no sign-in.
    assert post_sign_in(Client(), operator.email, OPERATOR_PASSWORD, _current_code(operator)).status_code == 200
    wrong = _enrol(token, "000000" if _current_code(operator) != "000000" else "111111", OPERATOR_PASSWORD)
    assert wrong.status_code == 200
    assert b"does not match" in wrong.content
    assert _enrol(token, _current_code(operator), OPERATOR_PASSWORD).status_code == 200
    operator.refresh_from_db()
    assert operator.totp_enrolled_at is not None
    assert operator.enrolment_token_hash == ""
    assert InstallationEvent.objects.filter(event=audit.ENROLLED, operator=operator).count() == 1
    # Single use: the link is gone, for a look and for a second enrolment alike.
    assert Client().get(nexus_url(f"enrol/{token}/")).status_code == 404
    assert _enrol(token, _current_code(operator, offset=1), OPERATOR_PASSWORD).status_code == 404
    # The enrolment code's step is spent; the next one signs in.
    response = post_sign_in(Client(), operator.email, OPERATOR_PASSWORD, _current_code(operator, offset=1))
    assert response.status_code == 302


def test_the_enrolment_link_expires_after_24_hours():
    output = _create("--email", "ops@example.com")
    token = _token(output)
    operator = Operator.objects.get(email="ops@example.com")
    with freeze_time(timezone.now() + timedelta(hours=24, seconds=1)):
        assert Client().get(nexus_url(f"enrol/{token}/")).status_code == 404
        assert _enrol(token, _current_code(operator), _password(output)).status_code == 404
    operator.refresh_from_db()
    assert operator.totp_enrolled_at is None


def test_an_unknown_link_is_404():
    assert Client().get(nexus_url("enrol/not-a-token/")).status_code == 404


def test_reset_totp_issues_a_new_link_retires_the_old_secret_and_prints_no_secret(monkeypatch):
    other = make_operator("other@ops.example")
    created = _create("--email", "ops@example.com")
    first = _token(created)
    operator = Operator.objects.get(email="ops@example.com")
    _enrol(first, _current_code(operator), _password(created))
    old_secret = totp_open(sealed=Operator.objects.get(pk=operator.pk).totp_sealed, operator_id=operator.pk)
    output = _create("--email", "ops@example.com", "--reset-totp")
    second = _token(output)
    assert second != first
    operator.refresh_from_db()
    new_secret = totp_open(sealed=operator.totp_sealed, operator_id=operator.pk)
    assert new_secret != old_secret
    assert operator.totp_enrolled_at is None  # must enrol again before signing in
    for secret in (old_secret, new_secret, other.secret):
        assert secret not in output
    assert Client().get(nexus_url(f"enrol/{second}/")).status_code == 200
    assert InstallationEvent.objects.filter(event=audit.ENROLMENT_ISSUED, target_id=str(operator.pk)).exists()


def test_reset_totp_for_an_unknown_operator_fails():
    with pytest.raises(CommandError, match="No operator"):
        _create("--email", "ghost@example.com", "--reset-totp")


def test_the_enrolment_link_is_printed_with_a_base_url():
    output = _create("--email", "ops@example.com", "--base-url", "https://cesaflow.example.com/")
    assert re.search(r"https://cesaflow\.example\.com/nexus/enrol/[A-Za-z0-9_-]+/", output)
