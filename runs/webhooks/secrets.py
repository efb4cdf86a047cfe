"""A project's GitHub webhook secret: generated, sealed with the vault keyring, opened, and used to check a signature.

The secret is sealed like a provider key (AES-256-GCM, key id in the header). Its associated data binds it to its
purpose, org and project, so a sealed value copied onto another project's or another org's row does not open.
Plaintext only ever lives in a ``keys.crypto.Secret`` (masked ``repr``, refuses pickling) and is never logged or put
in an exception message.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from typing import Final

from django.conf import settings

from keys.crypto import DecryptionError, Keyring, Secret, canonical_aad, open_sealed, seal

__all__ = [
    "SIGNATURE_PREFIX",
    "DecryptionError",
    "signature_for",
    "signature_matches",
    "signature_well_formed",
    "webhook_secret_aad",
    "webhook_secret_generate",
    "webhook_secret_open",
    "webhook_secret_seal",
]

SIGNATURE_PREFIX: Final = "sha256="
_PURPOSE: Final = "webhook-secret"
# ``sha256=`` + 64 hex digits: anything else is refused before any HMAC is computed (GitHub sends lowercase hex).
_SIGNATURE_RE: Final = re.compile(r"sha256=([0-9a-fA-F]{64})")


def _keyring() -> Keyring:
    # Read at call time (STYLE rule 14): the keyring is a setting, never captured at import.
    keyring: Keyring = settings.KEYRING
    return keyring


def webhook_secret_aad(*, org_id: uuid.UUID | str, project_id: uuid.UUID | str) -> bytes:
    """The associated data of a project's webhook secret (UUIDs in their canonical lowercase form)."""
    return canonical_aad(_PURPOSE, str(uuid.UUID(str(org_id))), str(uuid.UUID(str(project_id))))


def webhook_secret_generate() -> Secret:
    """A fresh high-entropy secret (256 bits, URL-safe text: what GitHub's "Secret" field takes)."""
    return Secret(secrets.token_urlsafe(32))


def webhook_secret_seal(*, org_id: uuid.UUID | str, project_id: uuid.UUID | str, secret: Secret) -> str:
    """The stored form of ``secret`` for this project, sealed under the keyring's primary kid."""
    return seal(_keyring(), secret, webhook_secret_aad(org_id=org_id, project_id=project_id))


def webhook_secret_open(*, org_id: uuid.UUID | str, project_id: uuid.UUID | str, sealed: str) -> Secret:
    """Open a sealed secret of this project. Raises the generic ``DecryptionError`` on any failure (tampered value,
    unknown or retired kid, a value sealed for another project or org)."""
    return Secret(open_sealed(_keyring(), sealed, webhook_secret_aad(org_id=org_id, project_id=project_id)))


def signature_for(*, secret: Secret, body: bytes) -> str:
    """``sha256=`` + hex HMAC-SHA256 of ``body``: the ``X-Hub-Signature-256`` GitHub computes."""
    digest = hmac.new(secret.reveal().encode("utf-8"), body, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def signature_well_formed(header: str) -> bool:
    """Whether ``header`` has the shape of an ``X-Hub-Signature-256`` value (says nothing about its validity)."""
    return _SIGNATURE_RE.fullmatch(header) is not None


def signature_matches(*, candidates: list[Secret], body: bytes, header: str) -> bool:
    """Whether ``header`` is a valid signature of the raw ``body`` under any of ``candidates``.

    Every candidate is compared, in constant time, even after a match: how long this takes does not say which
    secret (current or previous) signed the delivery. An empty secret never verifies anything."""
    match = _SIGNATURE_RE.fullmatch(header)
    if match is None:
        return False
    presented = match.group(1).lower()
    verified = False
    for secret in candidates:
        if not secret.reveal():
            continue
        expected = signature_for(secret=secret, body=body)[len(SIGNATURE_PREFIX) :]
        verified = hmac.compare_digest(expected, presented) or verified
    return verified
