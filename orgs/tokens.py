"""Org API key format: ``cf_live_<prefix>_<body><checksum>``.

* prefix: 12 base62 characters, the public lookup id (unique column);
* body: 43 base62 characters from ``secrets`` (about 256 bits);
* checksum: CRC32 of ``prefix_body``, as 6 base62 characters, so scanners can validate a find offline.

Only SHA-256 of the whole key is stored. The key is high-entropy (256 bits), so a slow or peppered hash would
add nothing: no attacker holding the digest can search that space.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib
from dataclasses import dataclass, field

PREFIX = "cf_live_"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_PREFIX_LEN = 12
_BODY_LEN = 43
_CHECK_LEN = 6
API_KEY_RE = re.compile(rf"^cf_live_([0-9A-Za-z]{{{_PREFIX_LEN}}})_([0-9A-Za-z]{{{_BODY_LEN + _CHECK_LEN}}})$")
MAX_KEY_LENGTH = len(PREFIX) + _PREFIX_LEN + 1 + _BODY_LEN + _CHECK_LEN


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def _checksum(text: str) -> str:
    value = zlib.crc32(text.encode("ascii"))
    digits = []
    for _ in range(_CHECK_LEN):
        value, rem = divmod(value, 62)
        digits.append(_ALPHABET[rem])
    return "".join(reversed(digits))


@dataclass(frozen=True)
class GeneratedKey:
    prefix: str
    secret: str = field(repr=False)


def generate_api_key() -> GeneratedKey:
    prefix = _random_base62(_PREFIX_LEN)
    body = _random_base62(_BODY_LEN)
    return GeneratedKey(prefix=prefix, secret=f"{PREFIX}{prefix}_{body}{_checksum(f'{prefix}_{body}')}")


def parse_api_key(raw: str) -> str | None:
    """The lookup prefix of a well-formed key with a valid checksum, else None (no exception, no detail)."""
    if len(raw) != MAX_KEY_LENGTH:
        return None
    match = API_KEY_RE.match(raw)
    if match is None:
        return None
    prefix, rest = match.group(1), match.group(2)
    body, check = rest[:_BODY_LEN], rest[_BODY_LEN:]
    if not secrets.compare_digest(_checksum(f"{prefix}_{body}"), check):
        return None
    return prefix


def api_key_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()
