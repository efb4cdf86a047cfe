"""Hands queued runs to whatever executes them, and keeps every executing run accountable. The executor itself is
``runs.executor.core``; this module binds it to the server's loop (inline mode) and hands runs to it.

Two modes (``settings.RUN_EXECUTOR``, environment ``CESAFLOW_EXECUTOR``):

* ``inline`` (default): runs execute as asyncio tasks in the ASGI server's event loop. ``cesaflow.asgi`` wraps the
  application with :func:`asgi_wrapper`, which binds an :class:`Executor` to the server's loop at lifespan startup
  or on the first HTTP request. ``submit`` (called once the run's row is committed, from a sync view's thread
  or from the server's loop) hands the run to that loop. Where no server loop exists (management commands, tests)
  a background thread with its own loop executes runs; their events then reach clients only through a
  cross-process channel layer (Redis): the in-memory layer cannot cross event loops.
* ``worker``: ``submit`` only nudges the ``run_worker`` processes through the channel layer. They poll the queue
  too, so a lost nudge costs at most one poll interval. There is no broker: PostgreSQL row locks hand out runs.

Whatever the mode, an :class:`Executor`:

* claims runs with ``FOR UPDATE SKIP LOCKED`` (``run_claim``, ``runs_claim_queued``): a run executes exactly once;
* executes at most ``RUN_WORKER_CONCURRENCY`` runs at once, and never takes an org past ``RUN_ORG_MAX_RUNNING``
  slots; runs beyond either wait queued and are claimed round-robin across orgs, least loaded first, as slots free
  up (``runs.services.claiming``), so one org's backlog cannot hold up another's runs;
* heartbeats its running runs, and reaps runs whose executor stopped heart-beating (``worker_lost``);
* starts a watched run only once its stream is attached (the stream submits it, or nudges the workers), and
  cancels those nobody attached to within ``RUN_ATTACH_WINDOW_SECONDS`` (``not_watched``, no provider call);
* stops a run within a second of a cancel request: the ``run.cancel`` message on the run's control group, and a
  poll of ``cancel_requested_at`` (one query for all its runs) in case the message is lost;
* on shutdown stops its runs and records them failed. After a crash, the restarted executor (or any other) reaps
  them within ``RUN_STALE_AFTER_SECONDS`` plus one heartbeat, and claims runs left queued: after any restart,
  nothing stays ``running`` or ``queued`` forever.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers, get_channel_layer
from django.conf import settings

from cesaflow.lib import shutdown
from runs import events
from runs.executor.core import Executor as Executor
from runs.executor.core import ExecutorConfig as ExecutorConfig
from runs.executor.core import new_worker_id as new_worker_id

logger = logging.getLogger("cesaflow.runs")

# An inline executor looks at the queue only to recover runs left queued by a restart, and to claim the runs that
# waited for a free slot as slots free up: submit() is its fast path.
INLINE_QUEUE_POLL_SECONDS = 5.0

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


# --- Inline mode: the server's loop, or a background thread ---------------------------------------------------

_state_lock = threading.Lock()
_server: tuple[asyncio.AbstractEventLoop, Executor] | None = None
_background: _BackgroundLoop | None = None
_pending: set[asyncio.Task[Any]] = set()


class _BackgroundLoop:
    """A daemon thread running an event loop for runs submitted where no server loop exists."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        # Its own channel-layer instance: channels_redis binds receiving to one event loop per instance.
        layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER) if settings.CHANNEL_LAYERS else None
        self.executor = Executor(
            config=ExecutorConfig.from_settings(claim_queued=False, reap=False), label="inline", layer=layer
        )
        self.thread = threading.Thread(target=self._run, name="cesaflow-runs", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self.executor.start)
        self.loop.run_forever()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.loop.is_closed()


def submit(run_id: uuid.UUID) -> None:
    """Hand a queued run to the executor. Called after the run's row is committed; returns at once."""
    if settings.RUN_EXECUTOR == "worker":
        _nudge_workers(run_id)
        return
    loop, executor = _inline_executor()
    _call_in_loop(loop, executor.submit_run, run_id)


def local_executor() -> Executor | None:
    """The inline executor of the running loop (the server's), which services of this process may claim runs for
    (``run_attach(claim_for=…)``); None in worker mode, off the server's loop, or before it is bound."""
    if settings.RUN_EXECUTOR != "inline":
        return None
    server = _server
    if server is None or server[0] is not asyncio.get_running_loop():
        return None
    return server[1]


def _inline_executor() -> tuple[asyncio.AbstractEventLoop, Executor]:
    global _background
    with _state_lock:
        if _server is not None and _loop_usable(_server[0]):
            return _server
        if _background is None or not _background.alive:
            _background = _BackgroundLoop()
        return _background.loop, _background.executor


def _loop_usable(loop: asyncio.AbstractEventLoop) -> bool:
    return loop.is_running() and not loop.is_closed()


def _call_in_loop(loop: asyncio.AbstractEventLoop, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Run ``func(*args)`` as a task of ``loop``, in a fresh context: the caller's request state (request id,
    asgiref's per-request thread) must not leak into work that outlives the request."""

    def spawn() -> None:
        task = loop.create_task(_logged(func, *args))
        _pending.add(task)
        task.add_done_callback(_pending.discard)

    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        contextvars.Context().run(spawn)
    else:
        loop.call_soon_threadsafe(spawn, context=contextvars.Context())


async def _logged(func: Callable[..., Awaitable[Any]], *args: Any) -> None:
    try:
        await func(*args)
    except Exception as exc:
        logger.error("executor: %s failed (%s)", getattr(func, "__name__", "task"), type(exc).__name__)


def _nudge_workers(run_id: uuid.UUID) -> None:
    """Tell the workers a run may start: each with a free slot tries to claim it at once (the first wins), then looks
    at the queue as on its poll. From an event loop, sent by a task of its own: the caller does not wait."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        async_to_sync(_send_nudge)(layer, run_id)
    else:
        _call_in_loop(loop, _send_nudge, layer, run_id)


async def _send_nudge(layer: Any, run_id: uuid.UUID) -> None:
    try:
        await layer.group_send(events.WORKERS_GROUP, {"type": "run.nudge", "run_id": str(run_id)})
    except Exception as exc:  # workers poll the queue anyway
        logger.warning("run_worker nudge not sent (%s)", type(exc).__name__)


def bind_server_loop() -> Executor | None:
    """Make the running loop (the ASGI server's) the inline executor's. Idempotent; a no-op in worker mode."""
    global _server
    if settings.RUN_EXECUTOR != "inline":
        return None
    loop = asyncio.get_running_loop()
    with _state_lock:
        if _server is not None and _server[0] is loop:
            return _server[1]
        executor = Executor(
            config=ExecutorConfig.from_settings(
                claim_queued=True, reap=True, poll_s=max(settings.RUN_WORKER_POLL_SECONDS, INLINE_QUEUE_POLL_SECONDS)
            ),
            label="inline",
        )
        _server = (loop, executor)
    contextvars.Context().run(executor.start)
    return executor


async def unbind_server_loop(*, grace_s: float = 0.0) -> None:
    """Stop the server loop's executor (ASGI lifespan shutdown, tests)."""
    global _server
    with _state_lock:
        bound, _server = _server, None
    if bound is not None and bound[0] is asyncio.get_running_loop():
        await bound[1].stop(grace_s=grace_s)


def wait_for_background_runs(timeout: float = 10.0) -> bool:
    """Block until the background thread's executor has no run left (tests, management commands)."""
    background = _background
    if background is None or not background.alive:
        return True
    future = asyncio.run_coroutine_threadsafe(background.executor.wait_idle(timeout), background.loop)
    return bool(future.result(timeout + 1))


def asgi_wrapper(app: ASGIApp) -> ASGIApp:
    """The ASGI application with the inline executor bound to the server's loop, and lifespan handled (a server
    that speaks lifespan gets a graceful shutdown: running runs are recorded, not left to the reaper)."""

    async def application(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] == "http" and (_server is None or _server[0] is not asyncio.get_running_loop()):
            bind_server_loop()
        await app(scope, receive, send)

    return application


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            bind_server_loop()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await stop_server_runs(grace_s=float(settings.RUN_SHUTDOWN_GRACE_SECONDS))
            await send({"type": "lifespan.shutdown.complete"})
            return


async def stop_server_runs(
    *, grace_s: float, wait_connections: Callable[[float], Awaitable[None]] | None = None
) -> None:
    """A server process's graceful shutdown, within ``grace_s`` (the ASGI lifespan's, or ``cesaflow.serve``'s own
    once it stopped listening): ``/readyz`` turns 503; the inline executor's runs get the grace to end and are
    recorded either way (streams still deliver them); then open run streams close with a reason
    (``cesaflow.lib.shutdown``) so their clients reconnect elsewhere; ``wait_connections`` (the server's) waits for
    the requests still being answered, gateway completions included; last, the gateway's run endings still being
    written are waited for, so no run is left ``running`` and no usage is lost."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    shutdown.begin()
    await unbind_server_loop(grace_s=grace_s)
    shutdown.close_streams()
    if wait_connections is not None:
        await wait_connections(max(0.0, deadline - loop.time()))
    from runs.api.proxy_call import drain_background

    left = await drain_background(timeout_s=max(1.0, deadline - loop.time()))
    if left:
        logger.warning("shutdown: %d proxy run rows or endings not recorded in time", left)
