"""Provider-key cryptography: a keyring of AES-256 keys with key ids (kid).

Pure module: no ORM, no settings. Callers pass the keyring in. (Sealing and opening land with the
provider-key vault; this module starts with the keyring so settings can validate it at load time.)
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

KEY_BYTES = 32


class KeyringError(ValueError):
    """The keyring configuration is unusable. Messages never contain key material."""


@dataclass(frozen=True)
class Keyring:
    """AES-256 keys by kid; the first kid listed is the primary (used to seal)."""

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
