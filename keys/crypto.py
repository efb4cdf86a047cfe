"""Provider-key cryptography: a keyring of AES-256 keys with key ids (kid), and sealing with AES-256-GCM.

Pure module: no ORM, no settings. Callers pass the keyring in (``django.conf.settings.KEYRING``, read at call
time by the services).

Stored format (security.md §1.2)::

    cf1.<kid>.<b64url nonce (12 bytes)>.<b64url ciphertext || tag (16 bytes)>

The associated data (AAD) binds a sealed value to its place: for provider keys it is the canonical,
length-prefixed encoding of (purpose, org id, key id, provider, destination), so a ciphertext copied onto another
org's row, another key's row or another provider does not open, and neither does a key whose ``base_url`` was
changed behind the application's back (the destination is where the plaintext is sent). Every failure to open
raises one generic ``DecryptionError``; there is no "return the value as it is" path.

AAD versions of provider keys: 1 = (purpose v1, org, key, provider), before the destination joined; 2 = the
current one. Version 1 remains only so that ``keys.services.provider_key_rewrap`` can re-seal old rows.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Final, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12  # 96-bit random nonce (NIST SP 800-38D §8.2.2)
TAG_BYTES: Final = 16  # 128-bit tag (SP 800-38D §5.2.1.2); cryptography's AESGCM always uses 16
FORMAT_VERSION: Final = "cf1"
PROVIDER_KEY_PURPOSE: Final = "cesaflow/provider-key/v2"
PROVIDER_KEY_PURPOSE_V1: Final = "cesaflow/provider-key/v1"
# The AAD version new provider keys are sealed with (``ProviderKey.aad_version`` records each row's).
PROVIDER_KEY_AAD_VERSION: Final = 2
# A sealed secret stays far below this; anything longer is not ours and is refused before any base64 work.
MAX_STORED_LENGTH: Final = 16_384

_KID_RE = re.compile(r"[1-9][0-9]{0,9}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")


class KeyringError(ValueError):
    """The keyring configuration is unusable. Messages never contain key material."""


class DecryptionError(Exception):
    """A stored secret could not be opened: bad format, unknown kid, retired kid or failed authentication.

    Deliberately one type with one message, so nothing downstream (API error, log line, audit record) can tell
    an attacker which check failed. ``retired_kid`` is for operators' logs only: the value names a kid the
    keyring still has but refuses (below ``min_kid``), which means a row was missed by ``keys_rewrap``.
    """

    MESSAGE: Final = "The stored secret could not be decrypted."

    def __init__(self, *, retired_kid: bool = False) -> None:
        super().__init__(self.MESSAGE)
        self.retired_kid = retired_kid


class Secret:
    """A plaintext secret that never shows itself: ``repr``/``str``/``format`` print a mask, pickling refuses.

    Python cannot scrub a ``str`` from memory; ``drop()`` removes this wrapper's reference so nothing holding
    the wrapper after the provider call can read it again.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value: str | None = value

    def reveal(self) -> str:
        """The plaintext, for the one place that needs it (an HTTP header for one provider call)."""
        if self._value is None:
            raise RuntimeError("This secret was dropped after its provider call.")
        return self._value

    def drop(self) -> None:
        self._value = None

    @property
    def dropped(self) -> bool:
        return self._value is None

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> NoReturn:
        # Pickling is how values reach caches, sessions and queues: a Secret must never travel that way.
        raise TypeError("A Secret cannot be pickled.")

    def __eq__(self, other: object) -> bool:
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Keyring:
    """AES-256 keys by kid; the first kid listed is the primary (used to seal). Kids below ``min_kid`` are
    retired: kept to name them in errors, refused for opening."""

    keys: dict[int, bytes] = field(repr=False)
    primary_kid: int
    min_kid: int = 0

    def __repr__(self) -> str:
        return f"Keyring(kids={sorted(self.keys)}, primary_kid={self.primary_kid}, min_kid={self.min_kid})"

    @classmethod
    def parse(cls, source: str, *, min_kid: int = 0) -> Keyring:
        """Parse ``"2:<base64 32 bytes>,1:<base64 32 bytes>"`` (first entry = primary)."""
        keys: dict[int, bytes] = {}
        order: list[int] = []
        for position, entry in enumerate(part.strip() for part in source.split(",")):
            if not entry:
                continue
            kid_text, sep, material = entry.partition(":")
            if not sep or not kid_text.strip().isdigit():
                raise KeyringError(f"entry {position + 1} must look like '<kid>:<base64 key>'")
            kid = int(kid_text)
            if not 1 <= kid <= 2**31 - 1:
                raise KeyringError(f"entry {position + 1}: kid must be between 1 and 2147483647")
            if kid in keys:
                raise KeyringError(f"kid {kid} appears twice")
            try:
                raw = base64.b64decode(material.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise KeyringError(f"kid {kid}: key is not valid base64") from None
            if len(raw) != KEY_BYTES:
                raise KeyringError(f"kid {kid}: key must be {KEY_BYTES} bytes, got {len(raw)}")
            keys[kid] = raw
            order.append(kid)
        if not order:
            raise KeyringError("no keys configured")
        if order[0] < min_kid:
            raise KeyringError(f"primary kid {order[0]} is below the minimum decryption kid {min_kid}")
        return cls(keys=keys, primary_kid=order[0], min_kid=min_kid)

    @property
    def kids(self) -> frozenset[int]:
        return frozenset(self.keys)

    def can_open(self, kid: int) -> bool:
        """Whether a value sealed under ``kid`` can be opened with this ring (present and not retired)."""
        return kid in self.keys and kid >= self.min_kid


def generate_key() -> str:
    """A fresh keyring key, base64: what an operator puts after ``<kid>:`` in ``CESAFLOW_KEYRING``."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


# --- Associated data ----------------------------------------------------------------------------------------


def canonical_aad(*fields: str) -> bytes:
    """Unambiguous bytes for a tuple of strings: a field count, then each field as 4-byte length + UTF-8.

    Plain concatenation would let ``("ab", "c")`` and ``("a", "bc")`` collide; length prefixes cannot.
    """
    out = bytearray(len(fields).to_bytes(4, "big"))
    for value in fields:
        encoded = value.encode("utf-8")
        out += len(encoded).to_bytes(4, "big")
        out += encoded
    return bytes(out)


def provider_key_aad(*, org_id: uuid.UUID | str, key_id: uuid.UUID | str, provider: str, destination: str) -> bytes:
    """The AAD of a provider key: purpose, org, key, provider and destination (UUIDs in their canonical lowercase
    form; ``destination`` is the normalized base URL calls go to, ``keys.providers.provider_destination``)."""
    return canonical_aad(
        PROVIDER_KEY_PURPOSE, str(uuid.UUID(str(org_id))), str(uuid.UUID(str(key_id))), provider, destination
    )


def provider_key_aad_v1(*, org_id: uuid.UUID | str, key_id: uuid.UUID | str, provider: str) -> bytes:
    """The AAD of a provider key sealed before the destination joined it (version 1). Only for re-sealing such
    keys under the current AAD: a key is never opened for a call with it."""
    return canonical_aad(PROVIDER_KEY_PURPOSE_V1, str(uuid.UUID(str(org_id))), str(uuid.UUID(str(key_id))), provider)


# --- Sealing and opening ------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    """Strict base64url without padding. The canonical re-encoding must match, otherwise the unused low bits
    of the last character could be flipped without changing the bytes (a tamper that would go unnoticed)."""
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64url(data) != text:
        raise ValueError("not canonical base64url")
    return data


@dataclass(frozen=True)
class _Parsed:
    kid: int
    nonce: bytes
    ciphertext: bytes  # includes the 16-byte tag


def _parse(stored: str) -> _Parsed:
    if not isinstance(stored, str) or not stored.isascii() or len(stored) > MAX_STORED_LENGTH:
        raise DecryptionError
    parts = stored.split(".")
    if len(parts) != 4 or parts[0] != FORMAT_VERSION or not _KID_RE.fullmatch(parts[1]):
        raise DecryptionError
    try:
        nonce = _unb64url(parts[2])
        ciphertext = _unb64url(parts[3])
    except (ValueError, binascii.Error):
        raise DecryptionError from None
    if len(nonce) != NONCE_BYTES or len(ciphertext) < TAG_BYTES:
        raise DecryptionError
    return _Parsed(kid=int(parts[1]), nonce=nonce, ciphertext=ciphertext)


def stored_kid(stored: str) -> int:
    """The kid named in a stored value's header. Raises ``DecryptionError`` if the value is malformed."""
    return _parse(stored).kid


def needs_rewrap(keyring: Keyring, stored: str) -> bool:
    """Whether a stored value is sealed under a kid other than the ring's primary (malformed: DecryptionError)."""
    return stored_kid(stored) != keyring.primary_kid


def seal_bytes(keyring: Keyring, plaintext: bytes, aad: bytes) -> str:
    """Encrypt under the primary kid with a fresh random nonce; returns the stored format."""
    kid = keyring.primary_kid
    nonce = os.urandom(NONCE_BYTES)
    # Never reuse a nonce under one key: os.urandom per call, and no caller can pass a nonce in.
    ciphertext = AESGCM(keyring.keys[kid]).encrypt(nonce, plaintext, aad)
    return f"{FORMAT_VERSION}.{kid}.{_b64url(nonce)}.{_b64url(ciphertext)}"


def open_bytes(keyring: Keyring, stored: str, aad: bytes) -> bytes:
    """Decrypt a stored value; any failure raises the one generic ``DecryptionError`` (fail closed)."""
    parsed = _parse(stored)
    key = keyring.keys.get(parsed.kid)
    if key is None:
        raise DecryptionError
    if parsed.kid < keyring.min_kid:
        raise DecryptionError(retired_kid=True)
    try:
        return AESGCM(key).decrypt(parsed.nonce, parsed.ciphertext, aad)
    except InvalidTag:
        raise DecryptionError from None


def seal(keyring: Keyring, plaintext: str | Secret, aad: bytes) -> str:
    """Seal a text secret (a ``Secret`` or a ``str``) under the primary kid."""
    text = plaintext.reveal() if isinstance(plaintext, Secret) else plaintext
    return seal_bytes(keyring, text.encode("utf-8"), aad)


def open_sealed(keyring: Keyring, stored: str, aad: bytes) -> str:
    """Open a value sealed by ``seal``. Raises ``DecryptionError`` for any failure, never returns ``stored``."""
    data = open_bytes(keyring, stored, aad)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise DecryptionError from None


def reseal(keyring: Keyring, stored: str, aad: bytes, *, new_aad: bytes | None = None) -> str:
    """Open with whatever kid sealed the value and seal again under the primary (the rewrap step), bound to
    ``new_aad`` if given (moving a value to a new AAD version), else to the same ``aad``."""
    return seal_bytes(keyring, open_bytes(keyring, stored, aad), aad if new_aad is None else new_aad)
