"""What every kind of run execution shares: the stop handle, outcomes, token tallies, the event publisher, and
our own words for failures. ``runs.execution`` (chat) and ``runs.execution_agent`` (agent runs) build on it."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError

from cesaflow.lib.http import get_http_client
from keys.crypto import Secret
from keys.egress import egress_policy
from keys.models import KeyStatus, ProviderKey
from keys.services import (
    ProviderKeyUnavailable,
    aprovider_key_open,
    provider_key_record_check,
    provider_key_unseal,
)
from runs import events
from runs.models import Run, RunStatus
from runs.providers import CallLimits, ProviderAdapter, adapter_for
from runs.providers.events import ErrorKind, ProviderError, Retry, Usage
from runs.services import UsageEntry

logger = logging.getLogger("cesaflow.runs")

# Why an executor stops a run from outside.
STOP_CANCELLED = "cancelled"  # someone asked (API, dashboard, websocket)
STOP_SHUTDOWN = "shutdown"  # the executor is shutting down
STOP_LOST = "lost"  # the run already ended elsewhere (reaped after a stalled heartbeat)

# How long recording what already happened (a run's end, a provider call's usage) waits for a database that went
# away: PostgreSQL restarting must not lose what the provider bills (found by the deployment drill, deploy/drill.py).
RECORD_RETRY_SECONDS = 300.0
RECORD_RETRY_MAX_DELAY_SECONDS = 5.0
# How a write reaches its database thread (``record``).
Hop: TypeAlias = Callable[[Callable[..., Any]], Callable[..., Awaitable[Any]]]

# Our own explanation per failure kind. Provider messages are never shown or stored: they can quote the request.
FAILURE_MESSAGES: dict[str, str] = {
    ErrorKind.AUTH: "The provider rejected the key; it is now marked invalid.",
    ErrorKind.PERMISSION: "The key is not allowed to use this model or endpoint.",
    ErrorKind.BILLING_QUOTA: "The provider account is out of credit or over its spending limit.",
    ErrorKind.RATE_LIMIT: "The provider kept rate-limiting the key, even after retrying.",
    ErrorKind.OVERLOADED: "The provider was overloaded, even after retrying.",
    ErrorKind.SERVER: "The provider had an internal error, even after retrying.",
    ErrorKind.BAD_REQUEST: "The provider refused the request as invalid.",
    ErrorKind.MODEL_TOOL_ERROR: "The model produced a malformed tool call.",
    ErrorKind.NOT_FOUND: "The provider does not know this model.",
    ErrorKind.TOO_LARGE: "The request is too large for this model.",
    ErrorKind.INCOMPLETE: "The provider ended the answer before it was complete.",
    ErrorKind.TIMEOUT: "The provider stopped sending data.",
    ErrorKind.DEADLINE: "The provider call took longer than allowed.",
    ErrorKind.NETWORK: "The connection to the provider broke.",
    ErrorKind.PROTOCOL: "The provider sent something that is not an answer stream.",
    ErrorKind.BLOCKED: "The egress policy does not allow the key's base URL.",
}
RETRY_REASONS: dict[str, str] = {
    ErrorKind.RATE_LIMIT: "rate limited",
    ErrorKind.OVERLOADED: "the provider is overloaded",
    ErrorKind.SERVER: "the provider had an error",
    ErrorKind.TIMEOUT: "the provider stopped responding",
    ErrorKind.NETWORK: "the connection to the provider failed",
    ErrorKind.INCOMPLETE: "the provider's answer broke off",
}


def call_limits() -> CallLimits:
    """The provider-call limits of runs: the defaults, with ``settings.RUN_CALL_LIMITS`` applied (tests)."""
    return dataclasses.replace(CallLimits(), **settings.RUN_CALL_LIMITS)


def failure_message(error: ProviderError) -> str:
    text = FAILURE_MESSAGES.get(error.kind, "The provider call failed.")
    return f"{text} (HTTP {error.status})" if error.status else text


def retry_reason(retry: Retry) -> str:
    """ "rate limited, retrying in 2 s": for the run page while the adapter waits."""
    reason = RETRY_REASONS.get(retry.error.kind, "the provider call failed")
    if retry.delay_s >= 1:
        return f"{reason}, retrying in {round(retry.delay_s)} s"
    if retry.delay_s >= 0.1:
        return f"{reason}, retrying in {retry.delay_s:.1f} s"
    return f"{reason}, retrying now"


@dataclass
class RunControl:
    """The executor's handle on a running run: set ``stop`` (with a reason) and the provider call ends within
    moments, its upstream connection closed."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""

    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.reason = reason
            self.stop.set()


@dataclass(frozen=True)
class Outcome:
    status: str
    error_kind: str = ""
    error_message: str = ""
    retryable: bool = False
    provider_error: ProviderError | None = None


@dataclass
class Tally:
    """What the provider call produced, in counts (never content)."""

    usages: list[Usage] = field(default_factory=list)
    provider_deltas: int = 0
    content_seen: bool = False
    turn_ended: bool = False
    # How many of ``usages`` (the first ones) are already in the ledger: an agent run records each model call as it
    # happens, so a crash mid-run loses none of what the provider bills.
    recorded: int = 0

    @property
    def input_tokens(self) -> int:
        return sum(u.input_tokens or 0 for u in self.usages)

    @property
    def output_tokens(self) -> int:
        return sum(u.output_tokens or 0 for u in self.usages)

    @property
    def complete(self) -> bool:
        return bool(self.usages) and all(u.complete for u in self.usages)

    def ledger_entries(self, run: Run, *, succeeded: bool) -> list[UsageEntry]:
        """One entry per provider response (what the provider bills). A response that never reported usage (a
        cancelled or broken stream) still gets an entry, flagged incomplete: the call happened."""
        entries = [usage_entry(run, u, complete=u.complete and succeeded) for u in self.usages[self.recorded :]]
        if not entries and not self.recorded and (self.content_seen or self.turn_ended):
            entries.append(
                UsageEntry(provider=run.provider, model=run.model, input_tokens=0, output_tokens=0, complete=False)
            )
        return entries


def usage_entry(run: Run, usage: Usage, *, complete: bool) -> UsageEntry:
    return UsageEntry(
        provider=run.provider,
        model=run.model,
        input_tokens=usage.input_tokens or 0,
        output_tokens=usage.output_tokens or 0,
        complete=complete,
    )


class RunPublisher:
    """Numbers one run's events and sends them in order; batches text deltas after the first.

    One lock serializes numbering and sending, so sequence numbers reach the channel layer in order. A channel
    layer failure never fails the run: the event is dropped (nobody would have seen it anyway) and counted.
    """

    def __init__(self, run: Run, *, layer: Any = None, coalesce_s: float = 0.04) -> None:
        self.run = run
        self._layer = layer
        self._coalesce_s = coalesce_s
        self._seq = 0
        self._lock = asyncio.Lock()
        self._pending: asyncio.Future[None] | None = None  # a ``send_soon`` not yet known to be out
        self._buffer: list[str] = []
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._last_text_at: float | None = None
        self.text_events = 0
        self.dropped = 0

    def send_soon(self, build: Callable[[int], events.RunEvent]) -> None:
        """``send`` without waiting for it (the caller goes on with slower work meanwhile); every later event still
        goes out after this one."""
        previous = self._pending

        async def in_order() -> None:
            if previous is not None:
                await previous
            await self._send_now(build)

        self._pending = asyncio.ensure_future(in_order())

    async def send(self, build: Callable[[int], events.RunEvent], *, run: Run | None = None) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await asyncio.shield(pending)  # never raises: ``_send_now`` counts failures instead
        await self._send_now(build, run=run)

    async def _send_now(self, build: Callable[[int], events.RunEvent], *, run: Run | None = None) -> None:
        async with self._lock:
            self._seq += 1
            event = build(self._seq)
            try:
                await events.apublish(run or self.run, event, layer=self._layer)
            except Exception as exc:  # the layer being down must not fail the run
                self.dropped += 1
                if self.dropped == 1:
                    logger.warning(
                        "run %s: %s event not published (%s)", self.run.id, event["type"], type(exc).__name__
                    )

    async def text(self, text: str) -> None:
        if not text:
            return
        loop = asyncio.get_running_loop()
        if self._last_text_at is None:
            self._last_text_at = loop.time()
            await self._send_text(text)
            return
        self._buffer.append(text)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_later())
        self._wake.set()

    async def flush(self) -> None:
        """Send buffered text now (before any other event, so the order is what the provider sent)."""
        if not self._buffer:
            return
        text = "".join(self._buffer)
        self._buffer.clear()
        self._last_text_at = asyncio.get_running_loop().time()
        await self._send_text(text)

    async def close(self) -> None:
        """Send what is buffered and stop the flusher (without cancelling a send in flight: that text would be
        lost)."""
        self._closing.set()
        self._wake.set()
        if self._flusher is not None:
            await self._flusher
            self._flusher = None
        await self.flush()

    def discard(self) -> None:
        """Stop at once (the run is being torn down): buffered text is dropped."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None

    async def _flush_later(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing.is_set():
            await self._wake.wait()
            self._wake.clear()
            delay = (self._last_text_at or 0.0) + self._coalesce_s - loop.time()
            if delay > 0 and not self._closing.is_set():
                with suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._closing.wait()
            await self.flush()

    async def _send_text(self, text: str) -> None:
        self.text_events += 1
        run_id = str(self.run.id)
        await self.send(lambda seq: {"type": "text.delta", "run_id": run_id, "seq": seq, "text": text})


def usage_event(run_id: str, tally: Tally) -> Callable[[int], events.RunEvent]:
    input_tokens, output_tokens, complete = tally.input_tokens, tally.output_tokens, tally.complete

    def build(seq: int) -> events.RunEvent:
        return {
            "type": "usage",
            "run_id": run_id,
            "seq": seq,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "complete": complete,
        }

    return build


def retry_status(run: Run, retry: Retry) -> Callable[[int], events.RunEvent]:
    def build(seq: int) -> events.RunEvent:
        event = events.status_event(run, seq=seq)
        event["retrying_in_s"] = round(retry.delay_s, 3)
        event["retry_reason"] = retry_reason(retry)
        return event

    return build


def stopped_outcome(reason: str) -> Outcome:
    if reason == STOP_CANCELLED:
        return Outcome(RunStatus.CANCELLED, "cancelled", "Cancelled while running.")
    if reason == STOP_SHUTDOWN:
        return Outcome(RunStatus.FAILED, "worker_lost", "The server shut down while this run was in progress.")
    # Lost: the run already has its outcome; run_finish keeps it and only adds the usage of this call.
    return Outcome(RunStatus.FAILED, "worker_lost", "The process executing this run stopped.")


async def mark_key_invalid(key: ProviderKey, run: Run) -> None:
    try:
        await database_sync_to_async(provider_key_record_check)(
            key=key, actor=None, status=KeyStatus.INVALID, detail=f"the provider answered 401 to run {run.id}"
        )
    except ProviderKeyUnavailable:
        pass  # revoked meanwhile: nothing left to mark
    except Exception as exc:
        logger.warning("run %s: could not mark the key invalid (%s)", run.id, type(exc).__name__)


KEY_REVOKED = Outcome(RunStatus.FAILED, "key_unavailable", "The provider key was revoked or deleted.")
KEY_UNREADABLE = Outcome(RunStatus.FAILED, "key_unavailable", "The provider key could not be decrypted.")


@asynccontextmanager
async def opened_adapter(
    run: Run, key: ProviderKey, *, limits: CallLimits, recorded: bool = False
) -> AsyncIterator[ProviderAdapter]:
    """The org's key opened for one provider call (audited ``key.used``) and an adapter holding it; both are
    dropped with the block. Raises ``ProviderKeyUnavailable`` / ``ProviderKeyDecryptionError`` (see ``KEY_*``).
    ``recorded``: the run's claim already recorded this opening (a chat run's one call:
    ``runs.services.claiming.record_key_openings``), so the key is opened in memory from the row the claim read,
    with no database hop."""
    if recorded:
        secret = provider_key_unseal(key=key)
        try:
            yield _adapter(run, key, secret, limits)
        finally:
            secret.drop()
        return
    actor = run.created_by_user or run.created_by_api_key
    async with aprovider_key_open(key=key, actor=actor, purpose="run", reference=str(run.id)) as secret:
        yield _adapter(run, key, secret, limits)


def _adapter(run: Run, key: ProviderKey, secret: Secret, limits: CallLimits) -> ProviderAdapter:
    return adapter_for(
        run.provider,
        base_url=key.base_url or None,
        api_key=secret.reveal(),
        client=get_http_client(egress_policy()),
        limits=limits,
    )


async def record(func: Callable[..., Any], /, *, hop: Hop = database_sync_to_async, **kwargs: Any) -> Any:
    """``func(**kwargs)`` in a database thread (``hop(func)``: Channels' by default, ``cesaflow.lib.hops.db_hop`` on
    the gateway), retried with backoff while the database is unreachable or busy, for up to
    ``RECORD_RETRY_SECONDS``: for writes of what already happened, which must land once the database is back. The
    run keeps its executor slot (and its heartbeat) meanwhile; if it is reaped before, ``run_finish`` keeps the
    reaper's outcome and still adds the usage."""
    deadline = time.monotonic() + RECORD_RETRY_SECONDS
    delay = 0.25
    while True:
        try:
            return await hop(func)(**kwargs)
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning(
                "%s: database unavailable (%s), retrying in %.2f s", func.__name__, type(exc).__name__, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECORD_RETRY_MAX_DELAY_SECONDS)
