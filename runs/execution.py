"""Executing one chat run: open the key for one provider call, stream the answer to the run's channel-layer group,
then record the outcome and the usage. Nothing of the answer is kept: events go to whoever listens and are gone.

Events of one run, in order (schema: ``runs.events``), each with the run's next sequence number:

* ``run.status`` (running) when execution starts;
* ``text.delta``: the first one at once (time to first token is what a watcher feels), later ones coalesced for
  ``RUN_STREAM_COALESCE_SECONDS`` so the channel layer is not hit once per token;
* ``run.status`` with ``retrying_in_s`` / ``retry_reason`` while the adapter waits to retry a failed attempt;
* ``usage`` with the running token totals whenever the provider reports them;
* ``error`` when the run fails (our own words, never provider text), then ``run.finished``.

Logs carry the run id, kinds and counts only: never the objective, the answer or provider messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import traceback
import uuid
from contextlib import aclosing
from typing import Any

from django.conf import settings

from keys.services import (
    ProviderKeyDecryptionError,
    ProviderKeyUnavailable,
)
from runs import events
from runs.execution_agent import call_agent
from runs.execution_common import (
    FAILURE_MESSAGES,
    KEY_REVOKED,
    KEY_UNREADABLE,
    STOP_CANCELLED,
    STOP_LOST,
    STOP_SHUTDOWN,
    Outcome,
    RunControl,
    RunPublisher,
    Tally,
    call_limits,
    failure_message,
    mark_key_invalid,
    opened_adapter,
    record,
    retry_status,
    stopped_outcome,
    usage_event,
)
from runs.models import Run, RunKind, RunStatus
from runs.providers import CallLimits, ChatRequest, Message, ProviderAdapter, read_to_end
from runs.providers.events import ErrorKind, ProviderError, Retry, TextDelta, TurnEnd, Usage
from runs.services import run_finish
from runs.services.claiming import EXECUTABLE_KINDS, usable_key
from runs.services.tokens import CALL_MAX_OUTPUT_TOKENS

logger = logging.getLogger("cesaflow.runs")

__all__ = ["STOP_CANCELLED", "STOP_LOST", "STOP_SHUTDOWN", "RunControl", "execute_run"]

SYSTEM_PROMPT = (
    "You are a helpful assistant working for a CesaFlow user. Answer the request directly and clearly; "
    "use Markdown only where it helps."
)
# What a chat run's call may produce at most; the token cap reserves this much output for it.
MAX_OUTPUT_TOKENS = CALL_MAX_OUTPUT_TOKENS


async def execute_run(run: Run, *, control: RunControl, layer: Any = None, limits: CallLimits | None = None) -> Run:
    """Execute a run its executor has claimed (status ``running``), as the claim returned it (read as
    ``unscoped_run_for_execution`` reads it, its key's opening recorded: ``runs.services.claiming``), and record
    how it ended. Returns the finished run. Never raises for provider or channel-layer trouble: those end the
    run."""
    started = time.monotonic()
    publisher = RunPublisher(run, layer=layer, coalesce_s=settings.RUN_STREAM_COALESCE_SECONDS)
    tally = Tally()
    logger.info("run %s started provider=%s worker=%s", run.id, run.provider, run.worker_id)
    # ``running`` goes out while the key is opened: the publisher's order still puts it first.
    publisher.send_soon(lambda seq: events.status_event(run, seq=seq))
    try:
        if run.cancel_requested_at is not None:
            control.request_stop(STOP_CANCELLED)
        outcome = await _call_provider(run, control=control, publisher=publisher, tally=tally, limits=limits)
    except Exception as exc:
        _log_crash(run.id, exc)
        outcome = Outcome(RunStatus.FAILED, "internal", "CesaFlow failed while executing this run.")
    except BaseException:
        publisher.discard()  # torn down (the executor gave up waiting): the reaper records the end
        raise
    await publisher.close()

    succeeded = outcome.status == RunStatus.SUCCEEDED
    if outcome.status == RunStatus.FAILED and control.reason != STOP_LOST:
        kind, message, retryable = outcome.error_kind, outcome.error_message, outcome.retryable
        await publisher.send(
            lambda seq: {
                "type": "error",
                "run_id": str(run.id),
                "seq": seq,
                "kind": kind,
                "message": message,
                "retryable": retryable,
            }
        )
    finished: Run = await record(
        run_finish,
        run_id=run.id,
        status=outcome.status,
        usage=tally.ledger_entries(run, succeeded=succeeded),
        usage_complete=succeeded and tally.complete,
        error_kind=outcome.error_kind,
        error_message=outcome.error_message,
    )
    await publisher.send(lambda seq: events.finished_event(finished, seq=seq), run=finished)
    logger.info(
        "run %s finished status=%s kind=%s input_tokens=%d output_tokens=%d provider_deltas=%d text_events=%d "
        "dropped_events=%d seconds=%.2f",
        run.id,
        finished.status,
        finished.error_kind or "-",
        finished.input_tokens,
        finished.output_tokens,
        tally.provider_deltas,
        publisher.text_events,
        publisher.dropped,
        time.monotonic() - started,
    )
    return finished


async def _call_provider(
    run: Run, *, control: RunControl, publisher: RunPublisher, tally: Tally, limits: CallLimits | None
) -> Outcome:
    if control.stop.is_set():
        return stopped_outcome(control.reason)
    if run.kind not in EXECUTABLE_KINDS:
        return Outcome(RunStatus.FAILED, "unsupported", "This kind of run cannot be executed yet.")
    if run.kind == RunKind.AGENT:
        return await call_agent(run, control=control, publisher=publisher, tally=tally, limits=limits)
    key = usable_key(run)
    if key is None:
        return KEY_REVOKED
    try:
        # The key is open for this one call only; the adapter holding it is dropped with the block.
        async with opened_adapter(run, key, limits=limits or call_limits(), recorded=True) as adapter:
            request = ChatRequest(
                model=run.model,
                system=SYSTEM_PROMPT,
                messages=[Message(role="user", content=run.objective)],
                max_tokens=MAX_OUTPUT_TOKENS,
            )
            outcome = await _stream(adapter, request, control=control, publisher=publisher, tally=tally)
    except ProviderKeyUnavailable:
        return KEY_REVOKED
    except ProviderKeyDecryptionError:
        return KEY_UNREADABLE
    if outcome.provider_error is not None and outcome.provider_error.kind is ErrorKind.AUTH:
        await mark_key_invalid(key, run)
    return outcome


async def _stream(
    adapter: ProviderAdapter,
    request: ChatRequest,
    *,
    control: RunControl,
    publisher: RunPublisher,
    tally: Tally,
) -> Outcome:
    run_id = str(publisher.run.id)

    async def consume() -> Outcome:
        async with aclosing(adapter.stream_chat(request)) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    tally.provider_deltas += 1
                    tally.content_seen = True
                    await publisher.text(event.text)
                elif isinstance(event, Usage):
                    tally.usages.append(event)
                    await publisher.flush()
                    await publisher.send(usage_event(run_id, tally))
                elif isinstance(event, Retry):
                    await publisher.send(retry_status(publisher.run, event))
                elif isinstance(event, ProviderError):
                    return Outcome(
                        RunStatus.FAILED,
                        str(event.kind),
                        failure_message(event),
                        retryable=event.retryable,
                        provider_error=event,
                    )
                elif isinstance(event, TurnEnd):
                    tally.turn_ended = True
                    await read_to_end(stream)  # the connection goes back to the pool for the next run
                    return Outcome(RunStatus.SUCCEEDED)
                # Tool-call events (chat runs declare no tools) and pings carry nothing for a watcher.
        # The adapter contract ends every stream with a terminal event; this is the belt to those braces.
        return Outcome(RunStatus.FAILED, str(ErrorKind.INCOMPLETE), FAILURE_MESSAGES[ErrorKind.INCOMPLETE])

    consumer = asyncio.create_task(consume())
    stopper = asyncio.create_task(control.stop.wait())
    try:
        await asyncio.wait({consumer, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not consumer.done():
            # Cancelling the consumer closes the stream (aclosing), which drops the upstream connection at once:
            # the provider stops generating, and billing, for an answer nobody wants.
            consumer.cancel()
            await asyncio.wait({consumer})
    if not consumer.cancelled():
        return consumer.result()
    if tally.turn_ended:
        # Stopped while reading the last bytes after the answer's end (``read_to_end``): the answer was whole.
        return Outcome(RunStatus.SUCCEEDED)
    if adapter.abandoned_usage is not None:
        # What the provider had already counted when we hung up (e.g. Anthropic's input tokens): billed, so kept.
        tally.usages.append(dataclasses.replace(adapter.abandoned_usage, complete=False))
    return stopped_outcome(control.reason)


def _log_crash(run_id: uuid.UUID, exc: BaseException) -> None:
    # Where it broke, without exception messages or locals: those can hold provider text or the objective.
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames))
    logger.error("run %s: internal error %s at %s", run_id, type(exc).__name__, where or "?")
