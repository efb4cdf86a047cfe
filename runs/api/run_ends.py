"""The gateway's writer of run ends: the ends of the calls one process finishes close together, written in one
transaction (``runs.services.runs_finish``) instead of one each.

A call's end is queued (``record_end``) once its last byte is out; the writer waits ``LINGER_S`` for others to
join it (at most ``MAX_BATCH``; not at all once an end that a response waits for is queued: an error's, a
disconnect's), then
writes them with one thread hop: the runs' rows locked in one statement, one
``UPDATE`` per budget row, one ``INSERT`` for the usage ledger, one ``UPDATE`` for the runs. Under load a batch holds
as many ends as calls finished in that time; alone, an end waits ``LINGER_S`` more than it would have, which no
client sees (the answer is out; the run's page hears ``run.finished`` that much later).

Nothing is lost that was not lost before: an end waits in this process's memory only as long as the linger and
the write (as a call's end always waited for its own write); the caller's task awaits it, so a graceful shutdown's
``drain_background`` waits for it too; a process that dies meanwhile leaves its runs ``running`` for the reaper
(``runs_reap_lost``: ``worker_lost``), as a death during the write always did. While the database is unreachable
or busy (a restart, SQLite's lock), a batch is written again with backoff (``runs.execution_common.record``, as an
executor records its runs' ends), the ends that come meanwhile waiting behind it; a batch that fails otherwise is
written again one end at a time, so one end the database refuses (its own failure, logged by its caller) does not
take the others with it.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Final

from cesaflow.lib.hops import db_hop
from runs.execution_common import record
from runs.models import Run
from runs.services import RunEnd, runs_finish

# How long the first end of a batch waits for others, and how many one transaction takes at most.
LINGER_S: Final = 0.02
MAX_BATCH: Final = 100


class _Writer:
    """The writer of one event loop (a server process has one)."""

    def __init__(self) -> None:
        # Each end, what its caller awaits, and whether a response waits for it (then the batch does not linger).
        self.queue: list[tuple[RunEnd, asyncio.Future[Run], bool]] = []
        self.task: asyncio.Task[None] | None = None
        self.lingering: asyncio.Future[None] | None = None

    def put(self, end: RunEnd, *, at_once: bool) -> asyncio.Future[Run]:
        written: asyncio.Future[Run] = asyncio.get_running_loop().create_future()
        self.queue.append((end, written, at_once))
        if at_once:
            _wake(self.lingering)
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._write())
        return written

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while self.queue:
            if len(self.queue) < MAX_BATCH and not any(at_once for *_, at_once in self.queue):
                self.lingering = loop.create_future()
                timer = loop.call_later(LINGER_S, _wake, self.lingering)
                try:
                    await self.lingering
                finally:
                    timer.cancel()
                    self.lingering = None
            batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
            try:
                runs = await record(runs_finish, hop=db_hop, ends=[end for end, *_ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], exc)
                    continue
                for end, written, _ in batch:
                    try:
                        _settle(written, (await db_hop(runs_finish)([end])).get(end.run_id))
                    except Exception as one:
                        _settle(written, one)
            else:
                for end, written, _ in batch:
                    _settle(written, runs.get(end.run_id))


def _wake(lingering: asyncio.Future[None] | None) -> None:
    if lingering is not None and not lingering.done():
        lingering.set_result(None)


def _settle(written: asyncio.Future[Run], outcome: Run | BaseException | None) -> None:
    if written.done():
        return
    if isinstance(outcome, Run):
        written.set_result(outcome)
    else:
        written.set_exception(outcome if outcome is not None else Run.DoesNotExist("the run is gone"))


_writers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Writer] = weakref.WeakKeyDictionary()


async def record_end(end: RunEnd, *, at_once: bool = False) -> Run:
    """Record ``end`` with the others of this process that come within ``LINGER_S``; the run as written. Raises
    what writing this end raised (``Run.DoesNotExist`` if its run is gone). Cancelling the caller does not cancel
    the write. ``at_once``: a response waits for this end (an error's, a disconnect's): the batch goes without
    lingering."""
    loop = asyncio.get_running_loop()
    writer = _writers.get(loop)
    if writer is None:
        writer = _writers[loop] = _Writer()
    return await asyncio.shield(writer.put(end, at_once=at_once))
