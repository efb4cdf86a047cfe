"""Thread hops for async request paths that keep no per-request thread (the gateway, ``cesaflow.gateway``).

``db_hop(func)`` runs ``func`` in the event loop's reusable thread pool (``thread_sensitive=False``: no thread
affinity, so no thread started per request) and hands the thread's database connection back to the pool when it
returns. Each hop must therefore be whole: its own transaction, nothing left open for a later hop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import connection

P = ParamSpec("P")
R = TypeVar("R")


def release_connection() -> None:
    """Hand this thread's database connection back to the pool: a pool thread may serve a stream's hops for seconds
    or minutes and must not hold one of the pool's bounded connections meanwhile. Not inside a transaction (a test
    wrapping the request), and not without a pool (nothing to hand back)."""
    if connection.settings_dict.get("OPTIONS", {}).get("pool") and not connection.in_atomic_block:
        connection.close()


def db_hop(func: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(func)
    def whole(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        finally:
            release_connection()

    return sync_to_async(whole, thread_sensitive=False)
