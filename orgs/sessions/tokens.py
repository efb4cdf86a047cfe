"""Session access tokens: short-lived JWTs (PyJWT, HS256) signed with the session keyring.

A token proves only "this browser signed in as ``sub`` in session ``sid`` a few minutes ago"; it is accepted
only together with a live session record (``orgs.sessions.store``). RFC 8725: the algorithm is pinned (never
read from the header), the type is explicit (``typ``), ``iss`` and ``aud`` are checked, ``kid`` is attacker input
and only ever used to pick one of our own keys. Nothing secret is in the payload.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

import jwt
from django.conf import settings

from keys.crypto import Keyring

ALGORITHM: Final = "HS256"
TOKEN_TYPE: Final = "cf-session+jwt"  # noqa: S105 (a JWT "typ", not a secret)
ISSUER: Final = "cesaflow"
AUDIENCE: Final = "cesaflow:dashboard"
# Anything longer is not one of ours: refused before any parsing.
MAX_TOKEN_LENGTH: Final = 2048
KID_RE: Final = re.compile(r"[0-9]{1,10}")
REQUIRED_CLAIMS: Final = ["sub", "sid", "iat", "nbf", "exp", "jti", "iss", "aud"]


class TokenExpired(Exception):
    """A token that can no longer be used but may be renewed from the refresh cookie: its lifetime is over, or it
    names a signing key that is no longer in use (after a rotation). The refresh cookie is checked on its own."""


class TokenInvalid(Exception):
    """Not a token we issued, or one that was tampered with. One type, no detail: nothing to learn from it."""


@dataclass(frozen=True)
class AccessClaims:
    sub: str
    sid: str
    iat: int
    exp: int
    jti: str


def _keyring() -> Keyring:
    keyring: Keyring = settings.SESSION_KEYRING
    return keyring


def token_issue(*, user_id: str, sid: str, now: float | None = None) -> tuple[str, AccessClaims]:
    issued = int(now if now is not None else time.time())
    claims = AccessClaims(
        sub=user_id,
        sid=sid,
        iat=issued,
        exp=issued + int(settings.SESSION_TOKEN_SECONDS),
        jti=secrets.token_urlsafe(12),
    )
    keyring = _keyring()
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": claims.sub,
        "sid": claims.sid,
        "iat": claims.iat,
        "nbf": claims.iat,
        "exp": claims.exp,
        "jti": claims.jti,
    }
    token = jwt.encode(
        payload,
        keyring.keys[keyring.primary_kid],
        algorithm=ALGORITHM,
        headers={"kid": str(keyring.primary_kid), "typ": TOKEN_TYPE},
    )
    return token, claims


def token_decode(token: str) -> AccessClaims:
    """The claims of a valid token. Raises ``TokenExpired`` (ours, over) or ``TokenInvalid`` (anything else)."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise TokenInvalid
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenInvalid from None
    kid = header.get("kid")
    keyring = _keyring()
    # kid is attacker input: only a plain decimal naming a live key of ours selects anything.
    if header.get("typ") != TOKEN_TYPE or header.get("alg") != ALGORITHM or not isinstance(kid, str):
        raise TokenInvalid
    if not KID_RE.fullmatch(kid):  # ASCII digits only: "²".isdigit() is True but int("²") fails
        raise TokenInvalid
    if int(kid) not in keyring.keys or int(kid) < keyring.min_kid:
        raise TokenExpired  # a retired signing key: nothing is read from this token, the refresh cookie decides
    try:
        payload = jwt.decode(
            token,
            keyring.keys[int(kid)],
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.ExpiredSignatureError:
        raise TokenExpired from None
    except jwt.PyJWTError:
        raise TokenInvalid from None
    for name in ("sub", "sid", "jti"):
        if not isinstance(payload[name], str) or not payload[name]:
            raise TokenInvalid
    if not all(isinstance(payload[name], int) for name in ("iat", "nbf", "exp")):
        raise TokenInvalid
    return AccessClaims(
        sub=payload["sub"], sid=payload["sid"], iat=payload["iat"], exp=payload["exp"], jti=payload["jti"]
    )
