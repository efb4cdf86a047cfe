"""Operators' second factor: RFC 6238 TOTP (30-second steps, 6 digits, SHA-1: what every authenticator app and
``oathtool --totp`` speak), with pyotp.

The secret is generated at enrolment and stored sealed with the provider keyring (``keys.crypto``), its AAD bound
to the operator's id: a sealed secret copied onto another operator's row does not open. A code is accepted for the
current step and one step either side (clock drift), and only once: ``totp_accept`` moves ``totp_last_step``
forward with a conditional UPDATE, so a code replayed within its window, or two sign-ins racing with the same
code, fail.
"""

from __future__ import annotations

import hmac
import time
import uuid
from typing import Final

import pyotp
import segno
from django.conf import settings

from keys.crypto import canonical_aad, open_bytes, seal_bytes
from nexus.models import Operator

TOTP_PURPOSE: Final = "cesaflow/operator-totp/v1"
ISSUER: Final = "CesaFlow Nexus"
STEP_SECONDS: Final = 30
DIGITS: Final = 6
DRIFT_STEPS: Final = 1  # accept the previous and the next step too


def totp_generate_secret() -> str:
    """A fresh base32 secret of 160 bits (RFC 4226's recommended length)."""
    return pyotp.random_base32(length=32)


def totp_aad(operator_id: uuid.UUID | str) -> bytes:
    return canonical_aad(TOTP_PURPOSE, str(uuid.UUID(str(operator_id))))


def totp_seal(*, secret: str, operator_id: uuid.UUID | str) -> str:
    return seal_bytes(settings.KEYRING, secret.encode("ascii"), totp_aad(operator_id))


def totp_open(*, sealed: str, operator_id: uuid.UUID | str) -> str:
    """The plaintext secret. Raises ``keys.crypto.DecryptionError`` for a tampered, moved or unknown-kid value."""
    return open_bytes(settings.KEYRING, sealed, totp_aad(operator_id)).decode("ascii")


def totp_uri(*, secret: str, email: str) -> str:
    """The ``otpauth://totp/...`` URI an authenticator app enrols from."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(name=email, issuer_name=ISSUER)


def totp_qr_svg(uri: str) -> str:
    """The URI as an inline SVG QR code (markup only: no script, no external reference)."""
    svg: str = segno.make(uri, error="m").svg_inline(scale=4, border=4, dark="#000", light="#fff")
    return svg


def totp_code_at(secret: str, step: int) -> str:
    """The code of one time step (tests use it to play the authenticator)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).generate_otp(step)


def totp_matching_step(*, secret: str, code: str, now: float | None = None) -> int | None:
    """The time step whose code ``code`` is (current step ± 1), or None. Compares in constant time."""
    code = code.strip().replace(" ", "")
    if len(code) != DIGITS or not code.isdigit():
        return None
    current = int((time.time() if now is None else now) // STEP_SECONDS)
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        if hmac.compare_digest(totp_code_at(secret, step), code):
            return step
    return None


def totp_accept(*, operator: Operator, code: str, now: float | None = None) -> bool:
    """Whether ``code`` is a valid, never-used code of the operator's sealed secret. Consumes its step: the same
    code (or an older one) is refused afterwards. False if the operator has no sealed secret."""
    if not operator.totp_sealed:
        return False
    secret = totp_open(sealed=operator.totp_sealed, operator_id=operator.pk)
    step = totp_matching_step(secret=secret, code=code, now=now)
    if step is None:
        return False
    # Atomic: only one request can move the counter past ``step``; a replay (or a racing twin) updates no row.
    moved = Operator.objects.filter(pk=operator.pk, totp_last_step__lt=step).update(totp_last_step=step)
    if moved:
        operator.totp_last_step = step
    return bool(moved)
