"""The adapter interface and the machinery every dialect shares: one HTTP attempt, retries before the first token,
timeouts, and closing the upstream as soon as the consumer goes away.

Usage::

    adapter = adapter_for("openai", base_url=None, api_key=secret, client=get_http_client(policy))
    async with contextlib.aclosing(adapter.stream_chat(request)) as events:
        async for event in events:
            ...

``aclosing`` (or cancelling the consuming task) closes the upstream response at once: the connection is dropped,
not drained, so the provider stops generating (and billing) for a stream nobody reads. A consumer that got the
terminal event reads the stream to its end instead (``read_to_end``): the adapter then reads the body's last bytes
and the connection goes back to the client's pool, so the next call to that provider skips a new TCP and TLS
handshake.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import aclosing
from typing import Any, ClassVar, Literal, TypeVar

import httpx

from cesaflow.lib.http import body_bytes_received
from cesaflow.lib.metrics import PROVIDER_RESPONSE
from runs.providers.errors import classify_http_error, classify_transport_error
from runs.providers.events import CONTENT_EVENTS, ErrorKind, Ping, ProviderError, ProviderEvent, ReadEnd, Retry, Usage
from runs.providers.sse import SSEDecoder, SSEEvent, SSEProtocolError

logger = logging.getLogger("cesaflow.providers")

_T = TypeVar("_T")

# ``mark_reads``: at most this many upstream reads that brought events (HTTP chunks, an event or so each) between two
# ReadEnds, however many more arrived already: about half a millisecond of the gateway's work per batch.
MAX_READS_PER_MARK = 32

_jitter = random.SystemRandom()

# --- The neutral request ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ToolCall:
    call_id: str
    name: str
    arguments_json: str


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One conversation message. ``tool`` messages answer one call (``tool_call_id``); assistant messages carry
    the text and the tool calls of one model turn, as received."""

    role: Literal["user", "assistant", "tool"]
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    is_error: bool = False  # tool results only

    def __repr__(self) -> str:
        # Conversation text is customer content: keep it out of reprs (tracebacks, debug logs).
        return f"Message(role={self.role!r}, tool_calls={len(self.tool_calls)})"


@dataclasses.dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: Mapping[str, Any]  # JSON Schema of the arguments object


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: Sequence[Message]
    system: str | None = dataclasses.field(default=None, repr=False)
    tools: Sequence[ToolSpec] = ()
    max_tokens: int = 4096


@dataclasses.dataclass(frozen=True)
class CallLimits:
    """Timeouts and retry budget of one model call. The read timeout is the longest silence allowed between bytes;
    the deadline bounds the whole call, retries included (a stream of keep-alives must not run forever)."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0
    write_timeout_s: float = 30.0
    deadline_s: float = 300.0
    max_retries: int = 2
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    max_retry_after_s: float = 60.0  # a longer retry-after is not waited for: the error surfaces with its value
    error_body_max_bytes: int = 64 * 1024
    drain_timeout_s: float = 0.5  # after the terminal event, wait this long for the body's end (keep-alive reuse)
    # The longest wait for progress: an event other than a ping (content, usage, the turn's end). Bytes that never
    # complete an event, SSE comments and pings do not count, so an upstream that trickles (a tarpit) loses the call
    # here instead of holding a run slot until the deadline.
    idle_timeout_s: float = 90.0

    def httpx_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.connect_timeout_s,
            read=self.read_timeout_s,
            write=self.write_timeout_s,
            pool=self.connect_timeout_s,
        )


# --- Dialect parsers ----------------------------------------------------------------------------------------------


class StreamParser(ABC):
    """Turns one attempt's SSE events into normalized events. ``is_done()`` becomes true at the terminal marker or an
    in-stream error; after that the attempt stops reading."""

    _done: bool = False

    def is_done(self) -> bool:
        return self._done

    @abstractmethod
    def on_event(self, sse: SSEEvent) -> list[ProviderEvent]: ...

    @abstractmethod
    def partial_usage(self) -> Usage | None:
        """What is known of usage when the attempt ends early (None: nothing at all)."""

    def at_eof(self) -> list[ProviderEvent]:
        """The body ended without the terminal marker: the SDKs accept this silently, we must not (§1.8)."""
        events: list[ProviderEvent] = []
        usage = self.partial_usage()
        if usage is not None:
            events.append(usage)
        events.append(
            ProviderError(
                kind=ErrorKind.INCOMPLETE,
                retryable=True,
                message="The provider ended the stream before the end of the turn.",
            )
        )
        return events


# --- Adapters -----------------------------------------------------------------------------------------------------


class ProviderAdapter(ABC):
    """One provider call per ``stream_chat``. Instances are cheap and hold the key only for the call they make:
    create one per call and drop it."""

    provider: ClassVar[str]

    def __init__(
        self, *, base_url: str, api_key: str, client: httpx.AsyncClient, limits: CallLimits | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._client = client
        self.limits = limits or CallLimits()
        # Yield ``ReadEnd`` before a read that may wait for the network (consumers that batch their writes set this).
        self.mark_reads = False
        # Usage known when the consumer abandoned the stream mid-attempt (cancel, disconnect): the provider bills
        # what it already counted (Anthropic reports input tokens up front), so the caller can still record it.
        self.abandoned_usage: Usage | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    @abstractmethod
    def build_request(self, request: ChatRequest) -> tuple[str, dict[str, str], dict[str, Any]]:
        """(url, headers, json body) of the streaming call."""

    @abstractmethod
    def new_parser(self) -> StreamParser: ...

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        """Stream one model turn as normalized events (see ``runs.providers.events`` for the contract)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.deadline_s
        attempt = 0
        while True:
            content_seen = False
            failure: ProviderError | None = None
            async with aclosing(self._attempt(request, deadline)) as events:
                async for event in events:
                    if isinstance(event, ProviderError):
                        failure = event
                        break
                    if isinstance(event, CONTENT_EVENTS):
                        content_seen = True
                    yield event
            if failure is None:
                return
            delay = None if content_seen else self._retry_delay(failure, attempt)
            if delay is None or loop.time() + delay >= deadline:
                self._log_failure(failure, attempt)
                yield failure
                return
            attempt += 1
            logger.info(
                "provider retry provider=%s kind=%s status=%s attempt=%d delay=%.2fs request_id=%s",
                self.provider,
                failure.kind,
                failure.status,
                attempt,
                delay,
                failure.request_id,
            )
            yield Retry(attempt=attempt, delay_s=delay, error=failure)
            await asyncio.sleep(delay)

    def _retry_delay(self, error: ProviderError, attempt: int) -> float | None:
        """Seconds before the next attempt, or None for no retry. Follows the SDKs: a positive retry-after within
        the cap is obeyed; otherwise exponential backoff with jitter (longer for overloads)."""
        if not error.retryable or attempt >= self.limits.max_retries:
            return None
        if error.retry_after_s is not None:
            return error.retry_after_s if error.retry_after_s <= self.limits.max_retry_after_s else None
        base = self.limits.backoff_base_s * (2.0 if error.kind is ErrorKind.OVERLOADED else 1.0)
        return min(base * 2.0**attempt, self.limits.backoff_max_s) * _jitter.uniform(0.75, 1.0)

    def _log_failure(self, error: ProviderError, attempts: int) -> None:
        # Kind, status and request id only: the message may quote the request.
        logger.warning(
            "provider call failed provider=%s kind=%s status=%s retries=%d request_id=%s",
            self.provider,
            error.kind,
            error.status,
            attempts,
            error.request_id,
        )

    def _deadline_error(self) -> ProviderError:
        return ProviderError(
            kind=ErrorKind.DEADLINE,
            retryable=False,
            message=f"The model call exceeded its {self.limits.deadline_s:g} s deadline.",
        )

    def _idle_error(self) -> ProviderError:
        # Not retried: an upstream that stalls mid-answer would stall again, holding the slot once more.
        return ProviderError(
            kind=ErrorKind.TIMEOUT,
            retryable=False,
            message=f"The provider made no progress for {self.limits.idle_timeout_s:g} s.",
        )

    async def _attempt(self, request: ChatRequest, deadline: float) -> AsyncGenerator[ProviderEvent, None]:
        """One HTTP request. Yields normalized events; a ProviderError, if any, is the last one."""
        url, headers, body = self.build_request(request)
        http_request = self._client.build_request(
            "POST", url, json=body, headers=headers, timeout=self.limits.httpx_timeout()
        )
        parser = self.new_parser()
        response: httpx.Response | None = None
        watchdog: _ReadWatchdog | None = None
        error_body = b""
        try:
            sent = time.perf_counter()
            try:
                async with asyncio.timeout_at(deadline):
                    response = await self._client.send(http_request, stream=True)
                    PROVIDER_RESPONSE.labels(
                        self.provider, "ok" if 200 <= response.status_code < 300 else "error"
                    ).observe(time.perf_counter() - sent)
                    if not 200 <= response.status_code < 300:
                        error_body = await self._read_capped(response)
            except TimeoutError:
                if response is None:
                    PROVIDER_RESPONSE.labels(self.provider, "unreachable").observe(time.perf_counter() - sent)
                yield self._deadline_error()
                return
            except (httpx.HTTPError, OSError) as exc:
                if response is None:
                    PROVIDER_RESPONSE.labels(self.provider, "unreachable").observe(time.perf_counter() - sent)
                yield classify_transport_error(exc)
                return
            if not 200 <= response.status_code < 300:
                yield classify_http_error(response.status_code, response.headers, error_body, secret=self._api_key)
                return

            decoder = SSEDecoder()
            chunks = response.aiter_bytes()
            request_id = response.headers.get("x-request-id") or response.headers.get("request-id")
            loop = asyncio.get_running_loop()
            progress_by = loop.time() + self.limits.idle_timeout_s
            watchdog = _ReadWatchdog(loop)
            # ``mark_reads``: reads whose events no ReadEnd has followed yet, and whether content went out already.
            unmarked = 0
            content_marked = False
            while not parser.is_done():
                try:
                    chunk = await watchdog.read(anext(chunks, None), by=min(deadline, progress_by))
                    sse_events = decoder.feed(chunk) if chunk is not None else decoder.end()
                except TimeoutError:
                    for event in _partial(parser):
                        yield event
                    yield self._deadline_error() if loop.time() >= deadline else self._idle_error()
                    return
                except (httpx.HTTPError, OSError, SSEProtocolError) as exc:
                    for event in _partial(parser):
                        yield event
                    yield _with_request_id(classify_transport_error(exc), request_id)
                    return
                produced = content = False
                for sse in sse_events:
                    for event in parser.on_event(sse):
                        if isinstance(event, ProviderError):
                            event = _with_request_id(event, request_id)
                        elif not isinstance(event, Ping):
                            progress_by = loop.time() + self.limits.idle_timeout_s
                            content = content or isinstance(event, CONTENT_EVENTS)
                        produced = True
                        yield event
                    if parser.is_done():
                        break
                if self.mark_reads and not parser.is_done():  # after the terminal event there is nothing to batch
                    if produced:
                        unmarked += 1
                    # The first content goes out at once; after it, what the next reads return without waiting
                    # joins the batch, up to a bound (a consumer far behind still writes every few hundred µs).
                    if unmarked and (
                        not content_marked
                        or unmarked >= MAX_READS_PER_MARK
                        or chunk is None
                        or not body_bytes_received(response)
                    ):
                        yield ReadEnd()
                        unmarked, content_marked = 0, content_marked or content
                if chunk is None:
                    break
            if not parser.is_done():
                for event in parser.at_eof():
                    yield _with_request_id(event, request_id) if isinstance(event, ProviderError) else event
                return
            await self._drain(chunks, deadline)
        except (GeneratorExit, asyncio.CancelledError):
            if not parser.is_done():  # done: its usage was reported whole already (cut short in the drain)
                self.abandoned_usage = parser.partial_usage()
            raise
        finally:
            if watchdog is not None:
                watchdog.close()
            if response is not None:
                await response.aclose()

    async def _read_capped(self, response: httpx.Response) -> bytes:
        """An error body, at most ``error_body_max_bytes`` (it is parsed for type/code/message, never logged)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            parts.append(chunk)
            size += len(chunk)
            if size >= self.limits.error_body_max_bytes:
                break
        return b"".join(parts)[: self.limits.error_body_max_bytes]

    async def _drain(self, chunks: AsyncIterator[bytes], deadline: float) -> None:
        """Read the few bytes after the terminal event (the chunked-encoding end) so the connection can go back to
        the pool. Bounded: a server that keeps the body open just loses its connection."""
        loop = asyncio.get_running_loop()
        limit = min(deadline, loop.time() + self.limits.drain_timeout_s)
        size = 0
        try:
            async with asyncio.timeout_at(limit):
                async for chunk in chunks:
                    size += len(chunk)
                    if size > 64 * 1024:
                        return
        except (TimeoutError, httpx.HTTPError, OSError):
            return


async def read_to_end(events: AsyncIterator[ProviderEvent]) -> None:
    """After ``TurnEnd``, let the call finish: the adapter reads the response's last bytes (bounded by
    ``drain_timeout_s``) so its connection is reused; closing the stream there instead drops a connection that had
    nothing left to say. (After a ``ProviderError`` it simply ends.) Nothing follows a terminal event: the
    adapters' contract (``runs.providers.events``)."""
    async for _ in events:
        pass


def _partial(parser: StreamParser) -> list[ProviderEvent]:
    usage = parser.partial_usage()
    return [usage] if usage is not None else []


def _with_request_id(error: ProviderError, request_id: str | None) -> ProviderError:
    if error.request_id or not request_id:
        return error
    return dataclasses.replace(error, request_id=request_id[:200])


class _ReadWatchdog:
    """Time limits for the reads of one stream: ``read`` raises ``TimeoutError`` when a read is still waiting at its
    ``by`` (a loop time), like ``asyncio.timeout_at`` around each read. But one timer serves the whole stream, re-armed
    only when it finds the limit has moved on since (about once per idle timeout), where ``asyncio.timeout_at`` arms
    and cancels one per read: about 4.5 µs each, an eighth of the gateway's CPU per streamed chunk (issue #13)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None  # the task waiting in a read, if any
        self._by = 0.0
        self._expired = False

    async def read(self, awaitable: Awaitable[_T], *, by: float) -> _T:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - streams are read in tasks
        self._task, self._by, self._expired = task, by, False
        if self._timer is None or self._timer.when() > by:
            self._arm(by)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._expired and task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            self._task = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, when: float) -> None:
        self.close()
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._task is None:
            return  # between reads: the next read arms it again
        if self._loop.time() < self._by:
            self._arm(self._by)  # the reads made progress since it was armed
            return
        self._expired = True
        self._task.cancel()
