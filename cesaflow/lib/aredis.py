"""An asyncio Redis client for reads on the gateway's hot path (issue #13), where a thread hop to Django's sync
cache client costs more than the read itself.

One client per event loop (redis-py's asyncio connections belong to the loop that opened them), on the same
``REDIS_URL`` as the cache, with short timeouts: a caller treats a failure as "cannot say" and falls back to the
database, never to trusting stale state. ``None`` when the deployment has no Redis (``make run``): callers then use
the in-process cache, which needs no I/O.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Final

from django.conf import settings
from redis.asyncio import Redis

# Seconds: a Redis that does not answer this fast is treated as down for this request (the caller falls back).
TIMEOUT_S: Final = 2.0

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Redis] = weakref.WeakKeyDictionary()


def client() -> Redis | None:
    """This event loop's client, or None without Redis."""
    url = settings.REDIS_URL
    if not url:
        return None
    loop = asyncio.get_running_loop()
    found = _clients.get(loop)
    if found is None:
        found = Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        _clients[loop] = found
    return found
