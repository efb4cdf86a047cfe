"""An in-process cache of verified org API keys, so the gateway does not build and run the same ORM query on every
request (issue #13). Correctness first:

* An entry is keyed by the SHA-256 of the presented key (never the key) and holds the key's and its org's column
  values, not shared model instances: each hit builds fresh instances (``Model.from_db``), so nothing a request
  changes leaks into the next one.
* Every entry records the **authorization generation**, a random token in the shared cache (Redis in production).
  Any change to an org API key, an organization or a user (``post_save``/``post_delete``, at once and again after
  commit) replaces the token, in every process at once: a revoked key, a demoted creator's clipped scopes, a
  disabled creator or a suspended org take effect on the next request, on any server.
* If the shared cache cannot be read, or the token is missing (a flushed or restarted Redis), nothing cached is
  trusted: the database answers, as without a cache.
* Entries also expire after ``TTL_SECONDS`` and the cache holds at most ``MAX_ENTRIES``; expiry (``expires_at``) is
  checked on every hit against the current time.

Changes made outside the application (SQL by hand) are not seen until an entry expires: revoke keys through the
dashboard, the API, Nexus or ``manage.py``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from django.core.cache import cache
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from orgs.models import ApiKey, Organization, User

logger = logging.getLogger("cesaflow.auth")

GENERATION_KEY: Final = "auth:generation"
TTL_SECONDS: Final = 30.0
MAX_ENTRIES: Final = 2048


@dataclass(frozen=True)
class _Entry:
    generation: str
    cached_at: float
    key_fields: tuple[str, ...]
    key_values: tuple[Any, ...]
    org_fields: tuple[str, ...]
    org_values: tuple[Any, ...]


_entries: OrderedDict[str, _Entry] = OrderedDict()
_lock = threading.Lock()


def generation() -> str | None:
    """The current authorization generation, or None if the shared cache cannot say (then nothing is trusted)."""
    try:
        token = cache.get(GENERATION_KEY)
        if token is None:
            cache.add(GENERATION_KEY, secrets.token_hex(8), timeout=None)
            token = cache.get(GENERATION_KEY)
    except Exception:
        logger.warning("authorization generation unreadable: API keys are checked in the database", exc_info=True)
        return None
    return token if isinstance(token, str) else None


def invalidate() -> None:
    """Every process's cached keys stop being trusted (a new random generation)."""
    try:
        cache.set(GENERATION_KEY, secrets.token_hex(8), timeout=None)
    except Exception:
        # The token cannot change, but then it cannot be read either: every process falls back to the database.
        logger.warning("authorization generation not replaced", exc_info=True)
    with _lock:
        _entries.clear()


def _values(instance: Any) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    fields = tuple(field.attname for field in instance._meta.concrete_fields)
    return fields, tuple(getattr(instance, name) for name in fields)


def remember(*, digest: str, api_key: ApiKey, token: str | None) -> None:
    if token is None:
        return
    key_fields, key_values = _values(api_key)
    org_fields, org_values = _values(api_key.org)
    entry = _Entry(token, time.monotonic(), key_fields, key_values, org_fields, org_values)
    with _lock:
        _entries[digest] = entry
        _entries.move_to_end(digest)
        while len(_entries) > MAX_ENTRIES:
            _entries.popitem(last=False)


def recall(*, digest: str, token: str | None) -> ApiKey | None:
    """A fresh ``ApiKey`` (with its org) for a cached digest of the current generation, else None."""
    if token is None:
        return None
    with _lock:
        entry = _entries.get(digest)
    if entry is None or entry.generation != token or time.monotonic() - entry.cached_at > TTL_SECONDS:
        return None
    api_key = ApiKey.from_db("default", list(entry.key_fields), list(entry.key_values))
    api_key.org = Organization.from_db("default", list(entry.org_fields), list(entry.org_values))
    return api_key


def touch(*, digest: str, api_key: ApiKey) -> None:
    """Keep the cached ``last_used_at`` current, so a hit does not write it again within the minute."""
    with _lock:
        entry = _entries.get(digest)
        if entry is None:
            return
        values = list(entry.key_values)
        values[entry.key_fields.index("last_used_at")] = api_key.last_used_at
        _entries[digest] = _Entry(
            entry.generation, entry.cached_at, entry.key_fields, tuple(values), entry.org_fields, entry.org_values
        )


@receiver(post_save, sender=ApiKey, dispatch_uid="api_key_cache_key_saved")
@receiver(post_delete, sender=ApiKey, dispatch_uid="api_key_cache_key_deleted")
@receiver(post_save, sender=Organization, dispatch_uid="api_key_cache_org_saved")
@receiver(post_delete, sender=Organization, dispatch_uid="api_key_cache_org_deleted")
@receiver(post_save, sender=User, dispatch_uid="api_key_cache_user_saved")
@receiver(post_delete, sender=User, dispatch_uid="api_key_cache_user_deleted")
def _on_change(sender: Any, **kwargs: Any) -> None:
    # Now (this process stops trusting its entries at once, also inside a transaction that has not committed yet)
    # and again after commit (an entry another process cached meanwhile from the old rows is dropped too).
    invalidate()
    transaction.on_commit(invalidate)
