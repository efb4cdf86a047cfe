"""A web process's graceful shutdown, as its parts see it (the sequence is ``cesaflow.serve``'s).

Two moments: ``begin()`` (the process stops listening: ``/readyz`` answers 503 so balancers look elsewhere, and
what runs keeps running) and ``close_streams()`` (open run streams end with a reason — websockets close with 4503
("try again"), SSE streams send an ``error`` event of kind ``server_restarting`` — so their clients reconnect to
another process and carry on watching; runs are never stopped by this). Streams wait on ``streams_closing()``.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Final

# Websocket close code for "come back in a moment": the HTTP 503 of the 44xx codes the consumers use (4401, 4403, 4404).
# RFC 6455's own 1012/1013 would fit, but daphne's websocket library sends only 1000 and 3000-4999.
CLOSE_TRY_AGAIN_LATER: Final = 4503
RESTARTING_KIND: Final = "server_restarting"
RESTARTING_MESSAGE: Final = "This server is restarting; reconnect to keep watching. The run goes on."

_draining = False
_closing = False
_events: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Event] = weakref.WeakKeyDictionary()


def draining() -> bool:
    return _draining


def begin() -> None:
    global _draining
    _draining = True


def close_streams() -> None:
    """Wake every stream waiting in ``streams_closing`` (called on the loop that serves them)."""
    global _closing
    _closing = True
    for loop, event in list(_events.items()):
        if not loop.is_closed():
            loop.call_soon_threadsafe(event.set)


async def streams_closing() -> None:
    """Returns once the process closes its streams."""
    if _closing:
        return
    loop = asyncio.get_running_loop()
    event = _events.get(loop)
    if event is None:
        event = _events[loop] = asyncio.Event()
    await event.wait()


def reset() -> None:
    """Tests only: a process that shut down in a test goes on serving the next one."""
    global _draining, _closing
    _draining = _closing = False
    _events.clear()
