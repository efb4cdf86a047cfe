"""Whether one secret is the same as, or an obvious derivation of, another (settings refuse such pairs).

Pure standard library, no Django: ``cesaflow.settings`` calls it while it loads. What counts as obvious (issue #14
point 5) is what an operator might type to "make a second key" out of ``SECRET_KEY``:

* the same value, one containing the other (a prefix or suffix added, a substring kept), ignoring case;
* the hex (either case) or base64 (standard or URL-safe, with or without padding) of its SHA-256, SHA-512,
  SHA-512 cut to 32 bytes, SHA-1 or MD5;
* Django's ``salted_hmac(key_salt, value, secret)`` (SHA-1 and SHA-256) for the salts and values someone would
  pick for a channel layer (``""``, ``"channels"``, ``"channel_layer"``, ...), in the same encodings.

Anything cleverer stays the operator's responsibility: generate independent keys (README "Configuration").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Iterable
from typing import Final

_HASHES: Final[tuple[Callable[[bytes], bytes], ...]] = (
    lambda data: hashlib.sha256(data).digest(),
    lambda data: hashlib.sha512(data).digest(),
    lambda data: hashlib.sha512(data).digest()[:32],
    lambda data: hashlib.sha1(data).digest(),  # noqa: S324  # recognising a derivation, not hashing anything
    lambda data: hashlib.md5(data).digest(),  # noqa: S324  # idem
)
# Salts and values of Django's salted_hmac that name what the derived key is for.
_HMAC_WORDS: Final = (
    "",
    "channels",
    "channel_layer",
    "channel-layer",
    "channels_redis",
    "channel_layer_key",
    "CESAFLOW_CHANNEL_LAYER_KEY",
    "cesaflow",
    "django.core.signing",
)


def _encodings(digest: bytes) -> set[str]:
    forms = {digest.hex()}
    for encoded in (base64.b64encode(digest), base64.urlsafe_b64encode(digest)):
        text = encoded.decode("ascii")
        forms.update({text, text.rstrip("=")})
    return forms


def _salted_hmacs(secret: bytes) -> Iterable[bytes]:
    """``django.utils.crypto.salted_hmac(salt, value, secret)`` for the words above, SHA-1 and SHA-256."""
    for algorithm in (hashlib.sha1, hashlib.sha256):
        for salt in _HMAC_WORDS:
            key = algorithm(salt.encode() + secret).digest()
            for value in _HMAC_WORDS:
                yield hmac.new(key, value.encode(), algorithm).digest()


def derivations(secret: str) -> set[str]:
    """The obvious derived forms of ``secret`` (lower-cased: compare lower-cased)."""
    data = secret.encode()
    digests = [hash_(data) for hash_ in _HASHES]
    digests.extend(_salted_hmacs(data))
    return {form.lower() for digest in digests for form in _encodings(digest)}


def reuses_secret(candidate: str, secrets: Iterable[str]) -> bool:
    """Whether ``candidate`` equals, contains, is contained by or is an obvious derivation of one of ``secrets``."""
    mine = candidate.strip().lower()
    for secret in secrets:
        theirs = secret.strip().lower()
        if not mine or not theirs:
            continue
        if mine in theirs or theirs in mine or mine in derivations(secret.strip()):
            return True
    return False
