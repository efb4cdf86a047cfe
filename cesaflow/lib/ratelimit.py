"""Rate limits: fixed windows counted in the shared cache, one mechanism for the dashboard, DRF and the gateway.

A *bucket* is what one limit counts (a scope such as ``api-key`` and a subject such as the key's id) at a *rate*
(``requests`` per ``seconds``). Windows are aligned to the epoch, so every server process agrees on the current one
without asking, and ``Retry-After`` is the time to the window's end, with no extra read. A request counts in every
bucket it belongs to and is refused when one of them is over; a *peeked* bucket is read, not counted (an IP whose
failed API calls used up their budget is refused even with a valid key). The counter of a window is one key,
``INCR``ed, with an expiry to the window's end; with Redis (production) all buckets of a request are one pipelined
round trip, through the cache's own connection pool (sync) or ``cesaflow.lib.aredis`` (async: no thread hop on the
gateway's hot path). Without Redis (``make run``) the local-memory cache counts, without I/O, for both.

Written here rather than with the ``limits`` library (evaluated, 5.8, whose ``limits.aio`` Redis storage can run on
redis-py): its storages open their own connection pools beside the cache's and ``aredis``'s, its sync and async
memory storages would count apart in ``make run``, and a hit answers allowed-or-not only, so ``Retry-After`` costs a
second round trip (``get_window_stats``) on every refusal. The fixed window is its simplest strategy anyway: a client
can send up to twice a limit across a window's edge, which is fine for abuse limits.

When the cache cannot count, the caller decides (``fail_open``): the API and the gateway serve on with a log line
(their keys and orgs are still checked against the database), while sign-up, sign-in and invitations refuse with
``RateLimitUnavailable`` (they cannot work without Redis in production anyway: sessions live there).

Cache keys hold a digest of the subject, never an address or id in clear; log lines name the scope, the rate and
the subject (an IP or an object's id, never a credential).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from django.conf import settings
from django.core.cache import cache
from django_redis import get_redis_connection
from redis.exceptions import RedisError
from rest_framework import status

from cesaflow.lib import aredis
from cesaflow.lib.api import ApiError

logger = logging.getLogger("cesaflow.ratelimit")

KEY_PREFIX: Final = "rl"


@dataclass(frozen=True)
class Rate:
    requests: int
    seconds: int

    @classmethod
    def from_setting(cls, value: tuple[int, int] | None) -> Rate | None:
        return None if value is None else cls(*value)

    def per(self) -> str:
        """``"per minute"``, ``"per 10 seconds"``: the window in words."""
        for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
            if self.seconds % length == 0:
                count = self.seconds // length
                return f"per {unit}" if count == 1 else f"per {count} {unit}s"
        return f"per {self.seconds} seconds"  # pragma: no cover - every whole number of seconds matches "second"

    def __str__(self) -> str:
        return f"{self.requests} {'request' if self.requests == 1 else 'requests'} {self.per()}"


@dataclass(frozen=True)
class Bucket:
    """One limit applied to one subject: ``Bucket("api-key", str(key.id), rate)``."""

    scope: str
    subject: str
    rate: Rate

    def key(self, window: int) -> str:
        # A digest: keys stay short and Redis does not collect client addresses.
        digest = hashlib.sha256(self.subject.encode("utf-8", "surrogatepass")).hexdigest()[:24]
        return f"{KEY_PREFIX}:{self.scope}:{self.rate.seconds}:{window}:{digest}"


@dataclass(frozen=True)
class Exceeded:
    """A refused request: which limit, and in how many seconds its window ends."""

    scope: str
    rate: Rate
    retry_after: int

    def details(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "limit": self.rate.requests,
            "window": self.rate.seconds,
            "retry_after": self.retry_after,
        }


class RateLimitUnavailable(Exception):
    """The shared cache could not count (Redis down or too slow) for a limit that fails closed."""


class RateLimited(ApiError):
    """The REST API's 429 in the one error shape; DRF's handler turns ``wait`` into ``Retry-After``."""

    def __init__(self, exceeded: Exceeded, message: str) -> None:
        super().__init__(status.HTTP_429_TOO_MANY_REQUESTS, "rate_limited", message, exceeded.details())
        self.wait = exceeded.retry_after


def _window(rate: Rate, now: float) -> tuple[int, int]:
    """(the current window's number, whole seconds until it ends, at least 1)."""
    window = int(now // rate.seconds)
    return window, max(1, math.ceil((window + 1) * rate.seconds - now))


def _verdict(
    counted: Sequence[Bucket], counts: Sequence[int], peeked: Sequence[Bucket], seen: Sequence[int], now: float
) -> Exceeded | None:
    worst: Exceeded | None = None
    over = [(bucket, count, count > bucket.rate.requests) for bucket, count in zip(counted, counts, strict=True)]
    over += [(bucket, count, count >= bucket.rate.requests) for bucket, count in zip(peeked, seen, strict=True)]
    for bucket, count, refused in over:
        if not refused:
            continue
        exceeded = Exceeded(bucket.scope, bucket.rate, _window(bucket.rate, now)[1])
        if count == bucket.rate.requests + 1:  # the first refusal of the window, so a flood logs one line
            logger.warning(
                "rate limit %s reached (%s) by %s; refused for %d s",
                bucket.scope,
                bucket.rate,
                bucket.subject,
                exceeded.retry_after,
            )
        if worst is None or exceeded.retry_after > worst.retry_after:
            worst = exceeded
    return worst


def _plan(counted: Sequence[Bucket], peeked: Sequence[Bucket], now: float) -> tuple[list[tuple[str, int]], list[str]]:
    """(cache key and seconds to keep it, for each counted bucket; cache key of each peeked bucket)."""
    increments = []
    for bucket in counted:
        window, remaining = _window(bucket.rate, now)
        increments.append((bucket.key(window), remaining + 1))
    return increments, [bucket.key(_window(bucket.rate, now)[0]) for bucket in peeked]


def _count_locally(increments: Sequence[tuple[str, int]], reads: Sequence[str]) -> tuple[list[int], list[int]]:
    """The local-memory cache of ``make run`` (no I/O, so also fine on the event loop)."""
    counts = []
    for key, ttl in increments:
        cache.add(key, 0, timeout=ttl)
        try:
            counts.append(int(cache.incr(key)))
        except ValueError:  # expired between add() and incr(): this request opens the window
            cache.set(key, 1, timeout=ttl)
            counts.append(1)
    return counts, [int(cache.get(key) or 0) for key in reads]


def _split(results: Sequence[Any], increments: int) -> tuple[list[int], list[int]]:
    # The pipeline answers INCR, EXPIRE per counted bucket, then GET per peeked one.
    counts = [int(results[2 * index]) for index in range(increments)]
    return counts, [int(value or 0) for value in results[2 * increments :]]


def _failed(scopes: Sequence[Bucket], fail_open: bool) -> None:
    names = ", ".join(sorted({bucket.scope for bucket in scopes}))
    if fail_open:
        logger.warning("rate limits %s not counted (the cache failed): serving anyway", names, exc_info=True)
        return
    logger.warning("rate limits %s not counted (the cache failed): refusing", names, exc_info=True)
    raise RateLimitUnavailable(names)


def _queued(pipe: Any, increments: Sequence[tuple[str, int]], reads: Sequence[str], key: str | None = None) -> Any:
    """The one round trip's commands, on a sync or an asyncio Redis pipeline: INCR with the window's expiry per
    counted bucket, GET per peeked one, then GET of ``key`` if asked."""
    for counter, ttl in increments:
        full = cache.make_key(counter)
        pipe.incr(full)
        pipe.expire(full, ttl)
    for counter in [*reads, *([key] if key is not None else [])]:
        pipe.get(cache.make_key(counter))
    return pipe


def hit(counted: Sequence[Bucket], *, peeked: Sequence[Bucket] = (), fail_open: bool) -> Exceeded | None:
    """Count one request in ``counted`` and read ``peeked``: the limit it exceeds (the longest wait), or None.
    When the cache fails: None if ``fail_open``, else ``RateLimitUnavailable``."""
    if not counted and not peeked:
        return None
    return hit_and_get(counted, peeked=peeked, fail_open=fail_open)[0]


def hit_and_get(
    counted: Sequence[Bucket], *, peeked: Sequence[Bucket] = (), fail_open: bool, key: str | None = None
) -> tuple[Exceeded | None, Any]:
    """``hit``, and the shared cache's value of ``key`` read in the same round trip (None when it has none, or when
    the cache failed: then ``fail_open`` applies to the limits as in ``hit``)."""
    now = time.time()
    increments, reads = _plan(counted, peeked, now)
    try:
        if not settings.REDIS_URL:
            counts, seen = _count_locally(increments, reads)
            return _verdict(counted, counts, peeked, seen, now), None if key is None else cache.get(key)
        pipe = _queued(get_redis_connection("default").pipeline(transaction=False), increments, reads, key)
        results = pipe.execute()
    except (RedisError, OSError):
        _cache_failed(counted, peeked, fail_open, key)
        return None, None
    return _answered(counted, peeked, increments, results, now, key)


async def ahit(counted: Sequence[Bucket], *, peeked: Sequence[Bucket] = (), fail_open: bool) -> Exceeded | None:
    """``hit`` on the event loop: one asyncio Redis round trip (no thread hop), or the local cache without I/O."""
    if not counted and not peeked:
        return None
    return (await ahit_and_get(counted, peeked=peeked, fail_open=fail_open))[0]


async def ahit_and_get(
    counted: Sequence[Bucket], *, peeked: Sequence[Bucket] = (), fail_open: bool, key: str | None = None
) -> tuple[Exceeded | None, Any]:
    """``ahit``, and the shared cache's value of ``key`` read in the same round trip (None when it has none, or when
    the cache failed: then ``fail_open`` applies to the limits as in ``hit``)."""
    client = aredis.client()
    if client is None:
        return hit_and_get(counted, peeked=peeked, fail_open=fail_open, key=key)  # the local-memory cache: no I/O
    now = time.time()
    increments, reads = _plan(counted, peeked, now)
    try:
        async with client.pipeline(transaction=False) as pipe:
            results = await _queued(pipe, increments, reads, key).execute()
    except (RedisError, OSError):
        _cache_failed(counted, peeked, fail_open, key)
        return None, None
    return _answered(counted, peeked, increments, results, now, key)


def _cache_failed(counted: Sequence[Bucket], peeked: Sequence[Bucket], fail_open: bool, key: str | None) -> None:
    if counted or peeked:
        _failed([*counted, *peeked], fail_open)
    else:
        logger.warning("%s not read (the cache failed)", key, exc_info=True)


def _answered(
    counted: Sequence[Bucket],
    peeked: Sequence[Bucket],
    increments: Sequence[tuple[str, int]],
    results: list[Any],
    now: float,
    key: str | None,
) -> tuple[Exceeded | None, Any]:
    """The verdict and ``key``'s decoded value from a pipeline's answers (``_queued``)."""
    value = None
    if key is not None:
        raw = results.pop()
        try:
            value = None if raw is None else cache.client.decode(raw)  # type: ignore[attr-defined]  # django-redis's
        except Exception:  # a value this cache cannot decode is no value: the caller's database path answers
            logger.warning("%s unreadable in the cache", key, exc_info=True)
    counts, seen = _split(results, len(increments))
    return _verdict(counted, counts, peeked, seen, now), value
