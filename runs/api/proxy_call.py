"""One proxied completion (``runs.api.proxy_views``): the opened key, the provider stream, the run's bookkeeping.

The provider call starts as soon as the request is authenticated and its key found (``begin``), concurrently with
the thread hop that writes the run row and the ``key.used`` audit row (``record_start``). The first byte does not
wait for that hop; the last one does (issue #13): the answer's first words go out as soon as the provider sends
them, and ``[DONE]`` (or the non-streaming answer) only once the run and its audit row are committed, so every
answer a client received whole has its run and audit rows, and a call whose run could not be written ends with an
error frame instead. A refusal known before the first byte (the monthly token cap, checked before the provider
call) is a real HTTP status. The run's end is recorded off the response path (``finish``): the last frames go out
at once and the run row, the usage ledger and the finished event follow in a background task of this process that
a client's hang-up cannot cancel, written with the ends of the process's other calls (``runs.api.run_ends``).

Nothing here logs a body, a prompt or an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from contextlib import AsyncExitStack
from typing import Any, TypeVar

from django.db import InterfaceError, OperationalError
from django.http import JsonResponse

from cesaflow.lib import request_context
from cesaflow.lib.http import get_http_client
from cesaflow.lib.metrics import ACTIVE_STREAMS
from keys.crypto import Secret
from keys.egress import egress_policy
from keys.models import ProviderKey
from orgs.tenancy import OrgContext
from runs import events as run_events
from runs.api.run_ends import record_end
from runs.models import Run, RunStatus
from runs.providers.base import CallLimits, StreamParser, read_to_end
from runs.providers.events import ErrorKind, Ping, ProviderError, ProviderEvent, ReadEnd, Retry, TurnEnd, Usage
from runs.proxy import (
    DONE_FRAME,
    ERROR_SUMMARIES,
    CompletionRequest,
    CompletionTranslator,
    ProxyAdapter,
    ProxyError,
    UsageTotals,
    database_unavailable,
    error_for_provider,
    proxy_adapter_for,
    sse,
    stream_error_frame,
)
from runs.services import RunEnd, UsageEntry

logger = logging.getLogger("cesaflow.proxy")

# Timeouts and the retry budget of one proxied call; read at call time, so a deployment or a test can tune it.
CALL_LIMITS = CallLimits()

# Run rows being written, run endings recorded off the response path, and clean-ups scheduled from finalizers:
# referenced here until they end (asyncio keeps only weak references to tasks). ``drain_background`` waits for them
# (graceful shutdown).
_background: set[asyncio.Task[Any]] = set()

T = TypeVar("T")


def log_failure(exc: BaseException, where: str) -> None:
    # The class and the innermost frame only: an exception's text could quote the request.
    frames = traceback.extract_tb(exc.__traceback__)
    at = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    logger.error("proxy failure in %s: %s at %s", where, type(exc).__name__, at)


def in_background(coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    task = asyncio.ensure_future(coroutine)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


async def drain_background(timeout_s: float) -> int:
    """Wait (bounded) for the run rows and run endings still being written; returns how many did not finish in
    time."""
    pending = set(_background)
    if not pending:
        return 0
    _done, left = await asyncio.wait(pending, timeout=timeout_s)
    return len(left)


def _unrecorded(exc: BaseException) -> ProxyError:
    """What a client is told when its run's row could not be written (the failure itself is logged)."""
    if isinstance(exc, OperationalError | InterfaceError):
        return database_unavailable()
    return ProxyError(500, "The proxy failed unexpectedly.", type="server_error", code="internal_error")


class ProxyCall:
    """One completion. ``finish`` runs exactly once, whatever ends the call (the turn's end, a provider error, the
    client hanging up); ``record_start`` writes its run, named in advance (``run_id``)."""

    def __init__(
        self, *, context: OrgContext, completion: CompletionRequest, key: ProviderKey, prompt_bytes: int = 0
    ) -> None:
        self.context = context
        self.prompt_bytes = prompt_bytes  # the request body's size: the prompt's upper bound in tokens
        self.completion = completion
        self.key = key
        # The run's id, chosen here: the completion, the response's header and the request's log lines are named
        # after it before its row is committed (a call refused before its row is written names a run that never
        # exists).
        self.run_id = uuid.uuid4()
        request_context.note(run_id=self.run_id)
        self.run: Run | None = None  # the row, once committed
        self.usage: list[UsageEntry] = []
        self.totals = UsageTotals()  # the client's usage figures
        self.translator = CompletionTranslator(
            completion_id=f"chatcmpl-{self.run_id.hex}",
            created=int(time.time()),
            model=completion.requested_model,
            streaming=completion.stream,
        )
        self.translator.usage = self.totals
        self.finished = False
        self._recording: asyncio.Task[Run] | None = None
        self._stack = AsyncExitStack()
        self._adapter: ProxyAdapter | None = None
        self._events: AsyncGenerator[ProviderEvent, None] | None = None
        self._parser_with_usage: StreamParser | None = None
        self._terminal_seen = False  # the adapter said its last word (TurnEnd or ProviderError)
        self._status_published: asyncio.Future[None] | None = None
        self._secret: Secret | None = None

    def __repr__(self) -> str:
        return f"<ProxyCall run={self.run_id} finished={self.finished}>"

    def record_start(self, writing: Coroutine[Any, Any, Run]) -> None:
        """Write the run row (``writing``: the thread hop that creates run ``run_id``; refusals raise
        ``ProxyError``) in a task nothing cancels, not even the client leaving: the call goes on meanwhile, and its
        last byte and its end wait for it (``recorded``)."""
        self._recording = in_background(writing)
        self._recording.add_done_callback(self._on_recorded)

    def _on_recorded(self, task: asyncio.Task[Run]) -> None:
        """The row is committed: publish the run's first status event (concurrently with the answer; the finished
        event waits for it, so live views see them in order). A write that failed is logged here, once."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self.run = task.result()
            self._status_published = asyncio.ensure_future(self._publish(run_events.status_event(self.run)))
        elif not isinstance(exc, ProxyError):
            log_failure(exc, "record_start")

    def refusal(self) -> ProxyError | None:
        """Why the run could not be written, if that is already known (None: written, or still being written)."""
        task = self._recording
        if task is None or not task.done() or task.cancelled():
            return None
        exc = task.exception()
        if exc is None:
            return None
        return exc if isinstance(exc, ProxyError) else _unrecorded(exc)

    async def recorded(self) -> Run | None:
        """The run row, once committed (waiting for it). Raises the ``ProxyError`` that refused it, or what the
        client is told of a write that failed (``_unrecorded``; the failure is logged). None only for a call that
        records nothing (a unit test's)."""
        if self._recording is None:
            return self.run
        try:
            return await asyncio.shield(self._recording)
        except ProxyError:
            raise
        except Exception as exc:
            raise _unrecorded(exc) from None

    def hold(self, secret: Secret) -> None:
        """The opened key, for ``begin``; dropped when the call ends, whichever way."""
        self._secret = secret
        self._stack.callback(secret.drop)

    async def begin(self) -> list[ProviderEvent]:
        """Start the provider call with the held key and read up to its first decisive event: content, the end of
        the turn or an error (retries, pings, usage and read marks are consumed on the way). That event decides the
        status code."""
        if self._secret is None:
            raise RuntimeError("no key held for the call")
        secret = self._secret
        self._adapter = proxy_adapter_for(
            self.key.provider,
            base_url=self.key.base_url or None,
            api_key=secret.reveal(),
            client=get_http_client(egress_policy()),
            options=self.completion.options,
            limits=CALL_LIMITS,
        )
        self._adapter.mark_reads = True
        self._events = self._adapter.stream_chat(self.completion.chat)
        while True:
            event = await self.next_event()
            if not isinstance(event, Usage | Ping | Retry | ReadEnd):
                return [event]
            refused = self.refusal()
            if refused is not None:  # the run cannot be written: no reason to wait for (and pay) the answer
                raise refused

    async def _publish(self, event: run_events.RunEvent) -> None:
        if self.run is None:
            return
        try:
            await run_events.apublish(self.run, event)
        except Exception as exc:  # live views miss one update; the run row is already right
            log_failure(exc, "publish")

    async def next_event(self) -> ProviderEvent:
        if self._events is None:
            raise RuntimeError("the provider call has not started")
        try:
            event = await anext(self._events)
        except StopAsyncIteration:
            # The adapters always end with TurnEnd or ProviderError; treat a silent end as what it would be.
            event = ProviderError(kind=ErrorKind.INCOMPLETE, retryable=False, message="The provider call ended early.")
        if isinstance(event, Usage):
            self._take_usage(event)
        elif isinstance(event, TurnEnd | ProviderError):
            self._terminal_seen = True
        return event

    def _take_usage(self, usage: Usage) -> None:
        """Usage is taken here, as it arrives (the callers skip Usage events): for the client's totals and for the
        ledger, one entry per attempt that reported any count."""
        self.totals.add(usage)
        if self._adapter is not None:
            self._parser_with_usage = self._adapter.current_parser
        if usage.input_tokens is not None or usage.output_tokens is not None:
            self.usage.append(
                UsageEntry(
                    provider=self.key.provider,
                    model=self.completion.model,
                    input_tokens=usage.input_tokens or 0,
                    output_tokens=usage.output_tokens or 0,
                    complete=usage.complete,
                )
            )

    async def _close_upstream(self) -> None:
        events, self._events = self._events, None
        try:
            if events is not None and self._terminal_seen:
                await read_to_end(events)  # the connection goes back to the pool for the next call
            elif events is not None:
                # Mid-call (the client left, or we failed): drop the connection, not drained, so the provider
                # stops generating and billing at once.
                await events.aclose()
        finally:
            await self._stack.aclose()  # the secret is dropped here
        parser = self._adapter.current_parser if self._adapter is not None else None
        if not self._terminal_seen and parser is not None and parser is not self._parser_with_usage:
            # The attempt in flight never reported usage; keep what it knew (Anthropic: the input tokens).
            partial = parser.partial_usage()
            if partial is not None:
                self._take_usage(partial)
        self._adapter = None

    async def finish(
        self,
        status: str,
        *,
        error: ProviderError | None = None,
        error_kind: str = "",
        error_message: str = "",
        wait: bool = True,
    ) -> None:
        """Close the upstream, drop the key, then record the run's end, in a background task that a cancellation
        of the caller cannot stop (the usage the provider bills for must not be lost). ``wait=False``: return at
        once (the end of a successful answer: its last frames need not wait for the database)."""
        if self.finished:
            return
        self.finished = True
        if error is not None:
            error_kind, error_message = error.kind.value, ERROR_SUMMARIES.get(error.kind, "")
        elif status == RunStatus.CANCELLED and not error_kind:
            error_kind, error_message = "cancelled", "The client disconnected."
        task = in_background(self._end(status, error_kind, error_message, at_once=wait))
        if wait:
            await asyncio.shield(task)

    async def _end(self, status: str, error_kind: str, error_message: str, *, at_once: bool) -> None:
        try:
            await self._close_upstream()
        finally:
            try:
                run = await self.recorded()
            except ProxyError:
                run = None  # never written (refused, or failed and logged): nothing to end
            if run is not None:
                try:
                    await self._record(run, status, error_kind, error_message, at_once=at_once)
                except Exception as exc:
                    log_failure(exc, "record")

    async def _record(self, run: Run, status: str, error_kind: str, error_message: str, *, at_once: bool) -> None:
        end = RunEnd(run.id, status, self.usage, None, error_kind, error_message, run)
        self.run = await record_end(end, at_once=at_once)
        if self._status_published is not None:
            await self._status_published  # never raises: ``_publish`` logs failures
        await self._publish(run_events.finished_event(self.run, seq=1))

    def finish_when_dropped(self, stream: AsyncIterator[bytes]) -> None:
        """If the response is dropped before its body is ever iterated (the client left right after the view
        returned), the generator's own ``finally`` never runs; this finalizer ends the call instead."""
        loop = asyncio.get_running_loop()

        def schedule() -> None:
            if not self.finished:
                in_background(self.finish(RunStatus.CANCELLED))

        weakref.finalize(stream, lambda: loop.call_soon_threadsafe(schedule) if not loop.is_closed() else None)

    async def stream(self, head: list[ProviderEvent]) -> AsyncIterator[bytes]:
        """The SSE body: role chunk, deltas, finish chunk, usage chunk (if asked for), ``[DONE]``. The frames of
        what the upstream sent meanwhile go out as one write, before a read that may wait (``ReadEnd``). ``[DONE]``
        waits for the run row; a run that could not be written ends the stream with an error frame instead, as soon
        as that is known. The run's end is recorded off the response path."""
        translator = self.translator
        ACTIVE_STREAMS.labels("gateway").inc()
        try:
            pending = [sse(translator.role_chunk())]
            queued = list(head)
            while True:
                event = queued.pop(0) if queued else await self.next_event()
                if isinstance(event, ProviderError):
                    await self.finish(RunStatus.FAILED, error=event)
                    pending.append(stream_error_frame(event, key_label=self.key.label))
                    yield b"".join(pending)
                    return
                if isinstance(event, ReadEnd):
                    refused = self.refusal()
                    if refused is not None:
                        await self.finish(RunStatus.FAILED)
                        yield sse(refused.body())
                        return
                    if pending:
                        yield b"".join(pending)
                        pending = []
                    continue
                if isinstance(event, Usage):
                    continue
                pending.extend(sse(frame) for frame in translator.feed(event))
                if isinstance(event, TurnEnd):
                    break
            await self.finish(RunStatus.SUCCEEDED, wait=False)
            if pending and self._recording is not None and not self._recording.done():
                yield b"".join(pending)  # the answer's last words need not wait for the run's row, [DONE] does
                pending = []
            try:
                await self.recorded()  # the last byte waits for the run row and its audit row
            except ProxyError as refused:
                yield sse(refused.body())
                return
            if self.completion.include_usage:
                pending.append(sse(translator.usage_chunk()))
            pending.append(DONE_FRAME)
            yield b"".join(pending)
        finally:
            ACTIVE_STREAMS.labels("gateway").dec()
            # Reached with the run still open only when the client went away (Django cancels or closes us).
            await self.finish(RunStatus.CANCELLED)

    async def collect(self, head: list[ProviderEvent]) -> JsonResponse:
        """The non-streaming answer: the whole turn as one ``chat.completion``."""
        translator = self.translator
        status: str = RunStatus.CANCELLED
        error: ProviderError | None = None
        try:
            queued = list(head)
            while True:
                event = queued.pop(0) if queued else await self.next_event()
                if isinstance(event, ProviderError):
                    status, error = RunStatus.FAILED, event
                    break
                if isinstance(event, ReadEnd) and (refused := self.refusal()) is not None:
                    status = RunStatus.FAILED
                    raise refused  # the run cannot be written: the rest of the answer is not read (nor paid)
                if not isinstance(event, Usage | ReadEnd):
                    translator.feed(event)
                if isinstance(event, TurnEnd):
                    status = RunStatus.SUCCEEDED
                    break
        finally:
            await self.finish(status, error=error, wait=status != RunStatus.SUCCEEDED)
        if error is not None:
            raise error_for_provider(error, key_label=self.key.label)
        await self.recorded()  # the answer waits for the run row and its audit row (a refusal: its HTTP status)
        response = JsonResponse(translator.completion())
        response["x-cesaflow-run-id"] = str(self.run_id)
        return response


@contextlib.asynccontextmanager
async def ended_on_failure(call: ProxyCall) -> AsyncIterator[None]:
    """End ``call`` (awaited) if the block fails or is cancelled before the call is handed to the response."""
    try:
        yield
    except asyncio.CancelledError:
        await call.finish(RunStatus.CANCELLED)
        raise
    except BaseException:
        await call.finish(RunStatus.FAILED, error_kind="internal", error_message="The proxy failed unexpectedly.")
        raise
