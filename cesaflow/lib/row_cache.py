"""In-process caches of rows the gateway reads on every request (issue #13): verified org API keys
(``orgs.api_key_cache``) and the provider keys they name (``runs.proxy.key_cache``). Correctness first:

* An entry holds column values, not shared model instances: each hit builds fresh instances (``Model.from_db``),
  so nothing a request changes leaks into the next one.
* Every entry records the **authorization generation**, a random token in the shared cache (Redis in production).
  Any change to what these caches hold (an org API key, an organization, a user, a provider key: ``post_save`` /
  ``post_delete`` at once and again after commit, see ``invalidate_on_change``) replaces the token, in every process
  at once: a revoked key, a clipped scope, a disabled creator, a suspended org take effect on the next request, on
  any server.
* If the shared cache cannot be read, or the token is missing (a flushed or restarted Redis), nothing cached is
  trusted: the database answers, as without a cache.
* Entries also expire after ``ttl_s`` and a cache holds at most ``max_entries``.

Changes made outside the application (SQL by hand) are not seen until an entry expires: revoke keys through the
dashboard, the API, Nexus or ``manage.py``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from django.conf import settings
from django.core.cache import cache
from django.db import models, transaction
from django.db.models.signals import post_delete, post_save
from redis.exceptions import RedisError

from cesaflow.lib import aredis
from cesaflow.lib.channel_layer import RedisChannelLayer, join_groups

logger = logging.getLogger("cesaflow.auth")

GENERATION_KEY: Final = "auth:generation"

Row = tuple[type[models.Model], tuple[str, ...], tuple[Any, ...]]


def generation() -> str | None:
    """The current authorization generation, or None if the shared cache cannot say (then nothing is trusted)."""
    try:
        token = cache.get(GENERATION_KEY)
        if token is None:
            cache.add(GENERATION_KEY, secrets.token_hex(8), timeout=None)
            token = cache.get(GENERATION_KEY)
    except Exception:
        logger.warning("authorization generation unreadable: the database answers", exc_info=True)
        return None
    return token if isinstance(token, str) else None


async def ageneration() -> str | None:
    """``generation()`` without a thread hop (the gateway's hot path): one asyncio Redis GET of the key the cache
    writes. A missing token is None here (the caller's database path creates it); failures mean "cannot say"."""
    client = aredis.client()
    if client is None:
        return generation()  # the in-process cache of `make run`: no I/O
    try:
        raw = await client.get(cache.make_key(GENERATION_KEY))
    except (RedisError, OSError):
        logger.warning("authorization generation unreadable: the database answers", exc_info=True)
        return None
    return _decoded_token(raw)


async def ajoin_then_generation(layer: Any, groups: Sequence[str], channel: str) -> str | None:
    """Join ``groups`` (``channel_layer.join_groups``), then ``ageneration()``: read after the join, never before (a
    change committed before the join is in the token read; one committed after it is heard on the groups joined).
    In the join's own round trip where the channel layer's one Redis is the shared cache's (as configured: both
    ``REDIS_URL``); otherwise in a round trip of its own once the join is done."""
    url = settings.REDIS_URL
    if isinstance(layer, RedisChannelLayer) and url and layer.is_at(url):
        return _decoded_token(await layer.group_add_many(groups, channel, then_get=cache.make_key(GENERATION_KEY)))
    await join_groups(layer, groups, channel)
    return await ageneration()


def _decoded_token(raw: Any) -> str | None:
    """The token in the raw value of ``GENERATION_KEY`` as Redis returns it (None: none, or undecodable)."""
    if raw is None:
        return None
    try:
        return token_of(cache.client.decode(raw))  # type: ignore[attr-defined]  # django-redis's
    except Exception:
        logger.warning("authorization generation undecodable: the database answers", exc_info=True)
        return None


def token_of(value: Any) -> str | None:
    """The authorization generation in the shared cache's value of ``GENERATION_KEY`` (decoded, as the cache or
    django-redis's ``decode`` gives it; read in a round trip of the caller's own, ``ratelimit.ahit_and_get``), None
    if there is none."""
    return value if isinstance(value, str) else None


def invalidate() -> None:
    """Every process's cached rows stop being trusted (a new random generation)."""
    try:
        cache.set(GENERATION_KEY, secrets.token_hex(8), timeout=None)
    except Exception:
        # The token cannot change, but then it cannot be read either: every process falls back to the database.
        logger.warning("authorization generation not replaced", exc_info=True)
    for row_cache in list(RowCache.instances):
        row_cache.clear()


def _on_change(sender: Any, **kwargs: Any) -> None:
    # Now (this process stops trusting its entries at once, also inside a transaction that has not committed yet)
    # and again after commit (an entry another process cached meanwhile from the old rows is dropped too).
    invalidate()
    transaction.on_commit(invalidate)


def invalidate_on_change(*model_classes: type[models.Model]) -> None:
    """Any save or delete of these models replaces the generation (call at import time of the cache's module)."""
    for model in model_classes:
        label = model._meta.label_lower
        post_save.connect(_on_change, sender=model, dispatch_uid=f"row_cache_saved_{label}", weak=False)
        post_delete.connect(_on_change, sender=model, dispatch_uid=f"row_cache_deleted_{label}", weak=False)


@dataclass(frozen=True)
class Entry:
    generation: str
    cached_at: float
    rows: tuple[Row, ...]


def row_of(instance: models.Model) -> Row:
    fields = tuple(field.attname for field in instance._meta.concrete_fields)
    return type(instance), fields, tuple(getattr(instance, name) for name in fields)


class RowCache:
    """A bounded, generation-checked map of keys to rows (an instance and the related ones it needs)."""

    instances: Final[list[RowCache]] = []

    def __init__(self, *, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self._lock = threading.Lock()
        RowCache.instances.append(self)

    def __repr__(self) -> str:
        return f"<RowCache entries={len(self.entries)}>"

    def remember(self, key: Hashable, instances: Sequence[models.Model], *, token: str | None) -> None:
        if token is None:
            return
        now = time.monotonic()
        entry = Entry(token, now, tuple(row_of(instance) for instance in instances))
        with self._lock:
            self.entries[key] = entry
            self.entries.move_to_end(key)
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
            # The oldest first: entries past their time go as new ones come, not only when the cache is full.
            while self.entries and now - next(iter(self.entries.values())).cached_at > self.ttl_s:
                self.entries.popitem(last=False)

    def recall(self, key: Hashable, *, token: str | None) -> list[Any] | None:
        """Fresh instances for a cached key of the current generation, else None."""
        entry = None if token is None else self._fresh(key)
        return None if entry is None or entry.generation != token else _instances(entry)

    def held(self, key: Hashable) -> tuple[str, list[Any]] | None:
        """The generation a fresh entry for ``key`` was cached under and fresh instances of its rows, whatever the
        current generation: *not to be trusted yet*. For a caller that reads the current generation in a round trip
        it makes anyway, after this, and trusts the rows only if the two are the same (as ``recall`` would have)."""
        entry = self._fresh(key)
        return None if entry is None else (entry.generation, _instances(entry))

    def _fresh(self, key: Hashable) -> Entry | None:
        with self._lock:
            entry = self.entries.get(key)
        return None if entry is None or time.monotonic() - entry.cached_at > self.ttl_s else entry

    def holds(self, key: Hashable) -> bool:
        """Whether a fresh entry is kept for ``key``, whatever its generation: for what no change anywhere can make
        wrong (that the row was read, and what it could not stop being)."""
        return self._fresh(key) is not None

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self.entries.pop(key, None)

    def update(self, key: Hashable, instance: models.Model) -> None:
        """Replace the cached values of ``instance``'s row in ``key``'s entry (same generation and age)."""
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                return
            rows = tuple(row_of(instance) if row[0] is type(instance) else row for row in entry.rows)
            self.entries[key] = Entry(entry.generation, entry.cached_at, rows)

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()


def _instances(entry: Entry) -> list[Any]:
    return [model.from_db("default", list(fields), list(values)) for model, fields, values in entry.rows]
