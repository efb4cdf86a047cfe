"""Writes for operator accounts: creation, the one-time enrolment link, its confirmation, sign-in bookkeeping.

Enrolment: ``operator_enrolment_issue`` seals a fresh TOTP secret onto the operator and returns a one-time token
(only its SHA-256 is stored; it works for 24 hours). The enrolment page shows the secret's ``otpauth://`` URI and
QR code; ``operator_enrol_confirm`` takes a first code, and only then is the operator enrolled and the link used
up. An operator without enrolment cannot sign in (``operator_authenticate``).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, cast

from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from nexus import audit
from nexus.models import Operator, OperatorRole
from nexus.totp import totp_accept, totp_generate_secret, totp_seal

ENROLMENT_TTL: Final = timedelta(hours=24)
COMMAND_LABEL: Final = "manage.py create_operator"

# Why a sign-in failed, for the installation trail only (the person signing in always sees one generic message).
FAILED_CREDENTIALS: Final = "credentials"  # unknown email, inactive operator or wrong password
FAILED_NOT_ENROLLED: Final = "not_enrolled"
FAILED_CODE: Final = "code"  # wrong, expired or replayed TOTP code
FAILED_LOCKED_OUT: Final = "locked_out"  # refused by the lockout before any factor was checked
FAILED_CODES_LOCKED: Final = "codes_locked"  # the right password, but too many wrong codes: the second factor is shut

# Wrong TOTP codes after a correct password, per operator and whatever the client address: after this many the
# second factor is locked for LOGIN_LOCKOUT_SECONDS (guessing codes from many addresses would otherwise be free).
# Only someone holding the password can cause it, so strangers cannot lock an operator out.
TOTP_FAILURE_LIMIT: Final = 5


def enrolment_token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@transaction.atomic
def operator_enrolment_issue(*, operator: Operator, now: datetime | None = None) -> str:
    """A new TOTP secret (sealed onto the row) and a one-time enrolment token (returned once). Any earlier secret
    and link stop working: the operator must enrol again before signing in."""
    now = now or timezone.now()
    token = secrets.token_urlsafe(32)
    operator.totp_sealed = totp_seal(secret=totp_generate_secret(), operator_id=operator.pk)
    operator.totp_enrolled_at = None
    operator.enrolment_token_hash = enrolment_token_digest(token)
    operator.enrolment_expires_at = now + ENROLMENT_TTL
    operator.save(update_fields=["totp_sealed", "totp_enrolled_at", "enrolment_token_hash", "enrolment_expires_at"])
    return token


@transaction.atomic
def operator_create(*, email: str, name: str, role: str, password: str) -> tuple[Operator, str]:
    """A new operator with a validated password and an enrolment link; returns (operator, enrolment token)."""
    operator = Operator(email=email.strip().lower(), name=name.strip(), role=OperatorRole(role))
    # The validators read .email/.name off the account (similarity check); an Operator has both, the stubs want a User.
    validate_password(password, user=cast(Any, operator))
    operator.set_password(password)
    operator.full_clean(exclude=["password"])
    operator.save()
    token = operator_enrolment_issue(operator=operator)
    audit.installation_record(event=audit.CREATED, operator=None, operator_label=COMMAND_LABEL, target=operator)
    return operator, token


@transaction.atomic
def operator_enrolment_reset(*, operator: Operator) -> str:
    """``create_operator --reset-totp``: a lost authenticator. Returns the new enrolment token."""
    token = operator_enrolment_issue(operator=operator)
    audit.installation_record(
        event=audit.ENROLMENT_ISSUED, operator=None, operator_label=COMMAND_LABEL, target=operator
    )
    return token


def operator_enrol_confirm(*, operator: Operator, token: str, code: str, now: datetime | None = None) -> bool:
    """Finishes enrolment if ``token`` is still this operator's live link and ``code`` is a first valid code.
    The link is used up in the same transaction."""
    now = now or timezone.now()
    with transaction.atomic():
        locked = Operator.objects.select_for_update().filter(pk=operator.pk, is_active=True).first()
        if (
            locked is None
            or not locked.enrolment_token_hash
            or not secrets.compare_digest(locked.enrolment_token_hash, enrolment_token_digest(token))
            or locked.enrolment_expires_at is None
            or locked.enrolment_expires_at <= now
        ):
            return False
        if not totp_accept(operator=locked, code=code, now=now.timestamp()):
            return False
        locked.totp_enrolled_at = now
        locked.enrolment_token_hash = ""
        locked.enrolment_expires_at = None
        locked.save(update_fields=["totp_enrolled_at", "enrolment_token_hash", "enrolment_expires_at"])
        audit.installation_record(event=audit.ENROLLED, operator=locked)
    return True


@dataclass(frozen=True)
class Authentication:
    """The outcome of one sign-in attempt: ``operator`` when every factor matched, else ``failure`` says why and
    ``known`` is the operator the email named (if any), for the audit trail."""

    operator: Operator | None
    known: Operator | None = None
    failure: str = ""


def operator_authenticate(*, email: str, password: str, code: str) -> Authentication:
    """Password, then TOTP code (consumed if valid). The password is hashed even for an unknown email, so
    timing does not tell which addresses are operators."""
    known = Operator.objects.filter(email__iexact=email.strip()).first()
    if known is None or not known.is_active:
        Operator().set_password(password)  # the same work as a real check (Django's ModelBackend does this too)
        return Authentication(operator=None, known=known, failure=FAILED_CREDENTIALS)
    if not known.check_password(password):
        return Authentication(operator=None, known=known, failure=FAILED_CREDENTIALS)
    if known.totp_enrolled_at is None:
        return Authentication(operator=None, known=known, failure=FAILED_NOT_ENROLLED)
    if cache.get(_codes_lock_key(known)) is not None:
        return Authentication(operator=None, known=known, failure=FAILED_CODES_LOCKED)
    if not totp_accept(operator=known, code=code):
        _code_failure_record(known)
        return Authentication(operator=None, known=known, failure=FAILED_CODE)
    cache.delete(_codes_failures_key(known))
    return Authentication(operator=known, known=known)


def _codes_failures_key(operator: Operator) -> str:
    return f"nexus:totp-failures:{operator.pk}"


def _codes_lock_key(operator: Operator) -> str:
    return f"nexus:totp-lock:{operator.pk}"


def _code_failure_record(operator: Operator) -> None:
    seconds = int(settings.LOGIN_LOCKOUT_SECONDS)
    key = _codes_failures_key(operator)
    cache.add(key, 0, timeout=seconds)
    try:
        failures = cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.set(key, 1, timeout=seconds)
        failures = 1
    if failures >= TOTP_FAILURE_LIMIT and cache.add(_codes_lock_key(operator), 1, timeout=seconds):
        audit.installation_record(
            event=audit.LOCKED_OUT, operator=operator, metadata={"scope": "totp", "failures": failures}
        )


@transaction.atomic
def operator_signed_in(*, operator: Operator) -> None:
    operator.last_login = timezone.now()
    operator.save(update_fields=["last_login"])
    audit.installation_record(event=audit.SIGNED_IN, operator=operator)


def operator_sign_in_failed(*, email: str, authentication: Authentication) -> None:
    audit.installation_record(
        event=audit.SIGN_IN_FAILED,
        operator=authentication.known,
        operator_label=email[:254],
        metadata={"reason": authentication.failure},
    )


def operator_locked_out(*, email: str, scope: str, known: Operator | None) -> None:
    audit.installation_record(
        event=audit.LOCKED_OUT, operator=known, operator_label=email[:254], metadata={"scope": scope}
    )


def operator_signed_out(*, operator: Operator) -> None:
    audit.installation_record(event=audit.SIGNED_OUT, operator=operator)
