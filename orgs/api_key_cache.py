"""The in-process cache of verified org API keys, so the gateway does not build and run the same ORM query on every
request (issue #13). Keyed by the SHA-256 of the presented key (never the key); holds the key's and its org's
column values. Trust rules (generation, expiry, bounds) are ``cesaflow.lib.row_cache``'s: any change to an org API
key, an organization or a user takes effect on the next request, on any server; expiry (``expires_at``) is checked
on every hit against the current time by the caller (``ApiKey.is_active``).
"""

from __future__ import annotations

from typing import Final

from cesaflow.lib.row_cache import RowCache, invalidate_on_change
from orgs.models import ApiKey, Organization, User

TTL_SECONDS: Final = 30.0
MAX_ENTRIES: Final = 2048

cache = RowCache(ttl_s=TTL_SECONDS, max_entries=MAX_ENTRIES)
invalidate_on_change(ApiKey, Organization, User)


def remember(*, digest: str, api_key: ApiKey, token: str | None) -> None:
    cache.remember(digest, [api_key, api_key.org], token=token)


def recall(*, digest: str, token: str | None) -> ApiKey | None:
    """A fresh ``ApiKey`` (with its org) for a cached digest of the current generation, else None."""
    rows = cache.recall(digest, token=token)
    return None if rows is None else _key(rows)


def held(*, digest: str) -> tuple[str, ApiKey] | None:
    """The generation a cached digest's key was verified under and the key (with its org), not yet trusted: see
    ``RowCache.held``."""
    entry = cache.held(digest)
    if entry is None:
        return None
    generation, rows = entry
    api_key = _key(rows)
    return None if api_key is None else (generation, api_key)


def _key(rows: list[object]) -> ApiKey | None:
    api_key, org = rows
    if not isinstance(api_key, ApiKey) or not isinstance(org, Organization):
        return None
    api_key.org = org
    return api_key


def forget(*, digest: str) -> None:
    cache.forget(digest)


def touch(*, digest: str, api_key: ApiKey) -> None:
    """Keep the cached ``last_used_at`` current, so a hit does not write it again within the minute."""
    cache.update(digest, api_key)
