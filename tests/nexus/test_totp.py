"""The operators' second factor: sealed secret bound to its operator, ±1 step, one use per code; and sign-in
requires it (wrong code, replayed code, no enrolment), with the dashboard-style lockout, all audited."""

from __future__ import annotations

import time

import pytest
from django.test import Client

from keys.crypto import DecryptionError
from nexus import audit
from nexus.models import InstallationEvent
from nexus.services import FAILED_CODE, FAILED_CREDENTIALS, FAILED_NOT_ENROLLED
from nexus.totp import STEP_SECONDS, totp_accept, totp_matching_step, totp_open, totp_seal
from tests.nexus.conftest import OPERATOR_PASSWORD, make_operator, nexus_url, post_sign_in

pytestmark = pytest.mark.django_db

GENERIC = b"Email, password or code is incorrect."


def _failures(reason: str) -> int:
    return InstallationEvent.objects.filter(event=audit.SIGN_IN_FAILED, metadata__reason=reason).count()


# --- The secret ------------------------------------------------------------------------------------------------------


def test_the_sealed_secret_opens_only_for_its_own_operator(operator, admin_operator):
    sealed = operator.operator.totp_sealed
    assert operator.secret not in sealed
    assert totp_open(sealed=sealed, operator_id=operator.operator.pk) == operator.secret
    with pytest.raises(DecryptionError):
        totp_open(sealed=sealed, operator_id=admin_operator.operator.pk)  # copied onto another row: refused


def test_the_seal_is_fresh_each_time():
    secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    operator_id = "00000000-0000-4000-8000-000000000001"
    assert totp_seal(secret=secret, operator_id=operator_id) != totp_seal(secret=secret, operator_id=operator_id)


# --- Codes -----------------------------------------------------------------------------------------------------------


def test_codes_of_the_current_step_and_one_either_side_are_accepted_and_no_further(operator):
    now = time.time()
    step = int(now // STEP_SECONDS)
    for offset in (-1, 0, 1):
        assert totp_matching_step(secret=operator.secret, code=operator.code(now=now, offset=offset), now=now) == (
            step + offset
        )
    for offset in (-2, 2):
        code = operator.code(now=now, offset=offset)
        if code not in {operator.code(now=now, offset=o) for o in (-1, 0, 1)}:  # a 1-in-10^6 collision
            assert totp_matching_step(secret=operator.secret, code=code, now=now) is None
    assert totp_matching_step(secret=operator.secret, code="12345", now=now) is None
    assert totp_matching_step(secret=operator.secret, code="abcdef", now=now) is None


def test_a_code_is_accepted_once_and_an_older_step_never_after_a_newer_one(operator):
    now = time.time()
    assert totp_accept(operator=operator.operator, code=operator.code(now=now), now=now)
    assert not totp_accept(operator=operator.operator, code=operator.code(now=now), now=now)  # replay
    assert not totp_accept(operator=operator.operator, code=operator.code(now=now, offset=-1), now=now)  # older
    assert totp_accept(operator=operator.operator, code=operator.code(now=now, offset=1), now=now)
    operator.operator.refresh_from_db()
    assert operator.operator.totp_last_step == int(now // STEP_SECONDS) + 1


def test_the_step_counter_is_checked_in_the_database_not_on_a_stale_instance(operator):
    now = time.time()
    stale = type(operator.operator).objects.get(pk=operator.operator.pk)  # read before the first use
    assert totp_accept(operator=operator.operator, code=operator.code(now=now), now=now)
    assert not totp_accept(operator=stale, code=operator.code(now=now), now=now)  # a racing twin request


# --- Sign-in needs the code ------------------------------------------------------------------------------------------


def test_right_password_with_a_wrong_code_fails_generically_and_is_audited(operator):
    wrong = "000000" if operator.code() != "000000" else "111111"
    response = post_sign_in(Client(), operator.operator.email, OPERATOR_PASSWORD, wrong)
    assert response.status_code == 200
    assert GENERIC in response.content
    assert _failures(FAILED_CODE) == 1


def test_a_replayed_code_within_its_window_is_refused(operator):
    code = operator.code()
    assert post_sign_in(Client(), operator.operator.email, OPERATOR_PASSWORD, code).status_code == 302
    replay = post_sign_in(Client(), operator.operator.email, OPERATOR_PASSWORD, code)
    assert replay.status_code == 200
    assert GENERIC in replay.content
    assert _failures(FAILED_CODE) == 1


def test_an_operator_without_enrolment_cannot_sign_in(db):
    pending = make_operator("new@ops.example", enrolled=False)
    response = post_sign_in(Client(), pending.operator.email, OPERATOR_PASSWORD, pending.code())
    assert response.status_code == 200
    assert GENERIC in response.content
    assert _failures(FAILED_NOT_ENROLLED) == 1


def test_wrong_password_and_unknown_email_look_the_same(operator):
    wrong = post_sign_in(Client(), operator.operator.email, "not the passphrase", operator.code())
    unknown = post_sign_in(Client(), "nobody@ops.example", OPERATOR_PASSWORD, operator.code())
    for response in (wrong, unknown):
        assert response.status_code == 200
        assert GENERIC in response.content
    assert _failures(FAILED_CREDENTIALS) == 2
    operator.operator.refresh_from_db()
    assert operator.operator.totp_last_step == 0  # a wrong password never uses up the code


# --- Lockout ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def limits(settings):
    settings.LOGIN_FAILURE_LIMIT_ACCOUNT = 3
    settings.LOGIN_FAILURE_LIMIT_IP = 10
    settings.LOGIN_LOCKOUT_SECONDS = 600
    return settings


def test_repeated_failures_lock_the_account_with_429_and_retry_after_and_are_audited(operator, limits):
    client = Client()
    for _ in range(2):
        assert post_sign_in(client, operator.operator.email, OPERATOR_PASSWORD, "000000").status_code == 200
    locked = post_sign_in(client, operator.operator.email, OPERATOR_PASSWORD, "000000")
    assert locked.status_code == 429
    assert 0 < int(locked["Retry-After"]) <= 600
    # While locked, even every right factor is refused from this address, before any is checked.
    right = post_sign_in(client, operator.operator.email, OPERATOR_PASSWORD, operator.code())
    assert right.status_code == 429
    operator.operator.refresh_from_db()
    assert operator.operator.totp_last_step == 0
    assert InstallationEvent.objects.filter(event=audit.LOCKED_OUT, operator=operator.operator).count() == 1
    assert InstallationEvent.objects.filter(event=audit.SIGN_IN_FAILED, operator=operator.operator).count() == 4
    # Another address that never failed against the account still gets its attempt checked (no lockout DoS).
    other = post_sign_in(Client(), operator.operator.email, OPERATOR_PASSWORD, operator.code(), REMOTE_ADDR="10.9.9.9")
    assert other.status_code == 302


def test_nexus_failures_do_not_lock_the_dashboard_door(cast, limits):
    for _ in range(3):
        post_sign_in(Client(), cast.admin_a.user.email, "wrong", "000000")
    from orgs import login_guard

    assert login_guard.login_lockout(email=cast.admin_a.user.email, ip="127.0.0.1") is None
    assert login_guard.login_lockout(email=cast.admin_a.user.email, ip="127.0.0.1", namespace=login_guard.NEXUS)


def test_the_sign_in_page_redirects_an_operator_already_signed_in(nexus_client):
    response = nexus_client.get(nexus_url("login/"))
    assert response.status_code == 302
    assert response["Location"] == nexus_url()


def test_next_is_followed_inside_nexus_only(operator):
    def sign_in_with_next(target: str, code: str) -> str:
        data = {"email": operator.operator.email, "password": OPERATOR_PASSWORD, "code": code, "next": target}
        return str(Client().post(nexus_url("login/"), data)["Location"])

    assert sign_in_with_next(nexus_url("orgs/"), operator.code()) == nexus_url("orgs/")
    assert sign_in_with_next("https://evil.example/", operator.code(offset=1)) == nexus_url()


def test_guessing_codes_from_many_addresses_shuts_the_second_factor(operator, settings):
    """With the password known, one code guess per fresh address would dodge every per-address lock: after
    TOTP_FAILURE_LIMIT wrong codes the second factor is shut for the lockout period, wherever the guess comes
    from, and the right code from yet another address is refused too."""
    from nexus.services import TOTP_FAILURE_LIMIT

    settings.LOGIN_FAILURE_LIMIT_ACCOUNT = 1000  # only the code counter may stop this
    for n in range(TOTP_FAILURE_LIMIT):
        guess = post_sign_in(Client(), operator.operator.email, OPERATOR_PASSWORD, "000000", REMOTE_ADDR=f"10.1.0.{n}")
        assert guess.status_code == 200
    shut = post_sign_in(Client(), operator.operator.email, OPERATOR_PASSWORD, operator.code(), REMOTE_ADDR="10.2.0.1")
    assert shut.status_code == 429
    assert shut["Retry-After"]
    operator.operator.refresh_from_db()
    assert operator.operator.totp_last_step == 0  # the right code was not even checked, so not used up
    assert InstallationEvent.objects.filter(event=audit.LOCKED_OUT, operator=operator.operator).exists()


def test_wrong_codes_without_the_password_cannot_lock_an_operator_out(operator, settings):
    from nexus.services import TOTP_FAILURE_LIMIT

    settings.LOGIN_FAILURE_LIMIT_ACCOUNT = 1000
    for n in range(TOTP_FAILURE_LIMIT + 2):
        post_sign_in(Client(), operator.operator.email, "not the password", "000000", REMOTE_ADDR=f"10.3.0.{n}")
    right = post_sign_in(Client(), operator.operator.email, OPERATOR_PASSWORD, operator.code(), REMOTE_ADDR="10.4.0.1")
    assert right.status_code == 302
