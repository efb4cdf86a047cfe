"""Thread hops for async request paths.

``db_hop(func)`` runs ``func`` in the event loop's reusable thread pool (``thread_sensitive=False``: no thread
affinity, so no thread started per request) and hands the thread's database connection back to the pool when it
returns. Each hop must therefore be whole: its own transaction, nothing left open for a later hop. The gateway's
views (``cesaflow.gateway``) make only such hops.

``REQUEST_THREADS.request_thread()``: for every other request, the one thread its sync code shares, lent from a
pool of threads kept from request to request (``RequestThreads``) rather than started for it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connection, connections

logger = logging.getLogger("cesaflow.requests")

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


class RequestThreads:
    """Threads lent to requests, one each for the request's thread-sensitive work, and kept for the next request.

    Django runs every request in a ``ThreadSensitiveContext`` so that its sync code (the view, ``request_finished``'s
    receivers closing its database connection) shares one thread. Without an executor, asgiref starts a thread for
    each request and another to join it when the request ends: about 0.47 ms of CPU a request on these VMs, a
    sixth of a plain API request's (issue #13). ``request_thread`` lends a request one of these single-thread
    executors instead (asgiref's ``ThreadSensitiveContext(executor=...)``: the caller owns it, nothing shuts it down).
    The affinity is the same; the thread simply serves one request after another, as a threaded WSGI server's do.

    An executor comes back only once the work already queued on it has run (``give_back`` queues a marker behind
    it): a view whose request was cancelled (its client left) still runs to its end in that thread, and the next
    request must not wait behind it. At most ``keep`` idle executors are kept; the rest are shut down."""

    def __init__(self, *, keep: int) -> None:
        self.keep = keep
        self._idle: list[ThreadPoolExecutor] = []

    def borrow(self) -> ThreadPoolExecutor:
        try:
            return self._idle.pop()
        except IndexError:
            return ThreadPoolExecutor(max_workers=1, thread_name_prefix="request")

    def give_back(self, executor: ThreadPoolExecutor) -> None:
        def idle() -> None:  # in the executor's thread, once everything queued before it has run
            # As a fresh thread would: no database connection carried into the next request. ``request_finished``
            # closes the view's; this catches any opened after it (work outliving its request), which the next
            # request would otherwise use unchecked (Django checks connections at a request's start only in the
            # thread that sends ``request_started``: the loop's, here).
            try:
                connections.close_all()
            except Exception as exc:  # its thread's state is in doubt: retired, not lent again
                logger.warning("a request thread's database connection did not close (%s)", type(exc).__name__)
                executor.shutdown(wait=False)
                return
            if len(self._idle) < self.keep:
                self._idle.append(executor)
            else:
                executor.shutdown(wait=False)

        executor.submit(idle)

    @asynccontextmanager
    async def request_thread(self) -> AsyncIterator[None]:
        """The block's thread-sensitive ``sync_to_async`` calls run in one thread of this pool (see the class)."""
        executor = self.borrow()
        try:
            async with ThreadSensitiveContext(executor=executor):
                yield
        finally:
            self.give_back(executor)


# Idle request threads kept per process: as many as requests were answered at once lately, up to this.
REQUEST_THREADS = RequestThreads(keep=64)
