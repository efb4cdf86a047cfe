"""Executing one agent run: a workspace on disk, the agent loop in memory, the org's key opened for each model call,
and every step published live (``agent.step``, ``text.delta``, ``tool.call``, ``tool.result``, ``command.output``,
``file.changed``, ``usage``).

The workspace is ``live`` while the run executes and ``available`` for ``WORKSPACE_TTL_SECONDS`` after it ends
(whatever the outcome: partial work can be worth downloading); the first complete download, the end of the window
or the retention sweep (``runs.services.workspaces_purge``) deletes it. The conversation is never stored: it lives
in ``run_agent``'s locals and is gone when the run ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from keys.services import ProviderKeyDecryptionError, ProviderKeyUnavailable
from runs import events
from runs.agent import AgentLimits, run_agent
from runs.execution_common import (
    KEY_REVOKED,
    KEY_UNREADABLE,
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
    usage_entry,
    usage_event,
)
from runs.models import Run, RunKind, RunStatus
from runs.projects.services import project_record_run
from runs.providers import CallLimits, ChatRequest
from runs.providers.events import ErrorKind, ProviderEvent, Retry, Usage
from runs.services import run_usage_add
from runs.services.claiming import usable_key
from runs.services.tokens import (
    CALL_MAX_OUTPUT_TOKENS,
    TOKEN_CAP_REACHED,
    agent_step_estimate,
    run_first_call_estimate,
    run_tokens_top_up,
)
from runs.services.workspaces import run_workspace_closed, run_workspace_opened
from runs.workspaces import FileChange, project_workspace_create, sandbox_status, tree, workspace_create

logger = logging.getLogger("cesaflow.runs")

MAX_OUTPUT_TOKENS = CALL_MAX_OUTPUT_TOKENS
# Command output after this much per run is no longer forwarded live (the model still gets its truncated copy).
COMMAND_OUTPUT_LIVE_MAX_CHARS = 1_000_000


class _LiveSink:
    """The loop's live reports, as run events. Command output is coalesced like text deltas; any other event
    first flushes what is buffered, so a watcher sees things in the order they happened."""

    def __init__(self, run: Run, *, publisher: RunPublisher, tally: Tally, root: Path, coalesce_s: float) -> None:
        self.run = run
        self.run_id = str(run.id)
        self.publisher = publisher
        self.tally = tally
        self.root = root
        self.coalesce_s = coalesce_s
        self._output: list[str] = []
        self._output_chars = 0
        self._flusher: asyncio.Task[None] | None = None
        self._files: dict[str, int] = {}

    # Text and command output ---------------------------------------------------------------------------------

    async def text(self, text: str) -> None:
        await self._flush_output()
        self.tally.content_seen = True
        await self.publisher.text(text)

    async def command_output(self, text: str) -> None:
        if self._output_chars >= COMMAND_OUTPUT_LIVE_MAX_CHARS:
            return
        self._output_chars += len(text)
        self._output.append(text)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.coalesce_s)
        self._flusher = None
        await self._flush_output()

    async def _flush_output(self) -> None:
        if self._flusher is not None and self._flusher is not asyncio.current_task():
            self._flusher.cancel()
            self._flusher = None
        if not self._output:
            return
        text, self._output = "".join(self._output), []
        await self._send({"type": "command.output", "stream": "output", "text": text})

    async def close(self) -> None:
        await self._flush_output()

    # Steps, tools, files ---------------------------------------------------------------------------------------

    async def turn_started(self, step: int, max_steps: int, input_tokens: int, output_tokens: int) -> None:
        await self._flush_output()
        await self.publisher.flush()
        max_tokens = int(self.run.limits.get("max_tokens", 0))
        await self._send(
            {
                "type": "agent.step",
                "step": step,
                "max_steps": max_steps,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "max_tokens": max_tokens,
            }
        )

    async def tool_call(self, call_id: str, name: str, arguments: dict[str, Any]) -> None:
        await self._flush_output()
        await self.publisher.flush()
        await self._send({"type": "tool.call", "call_id": call_id, "name": name, "arguments": arguments})

    async def tool_result(self, call_id: str, name: str, ok: bool, summary: str) -> None:
        await self._flush_output()
        await self._send({"type": "tool.result", "call_id": call_id, "name": name, "ok": ok, "summary": summary})
        if name == "run_command":
            # A command can create, change or delete anything: show what it did to the tree.
            await self._diff_tree()

    async def file_changed(self, change: FileChange) -> None:
        if change.op == "deleted":
            self._files.pop(change.path, None)
        else:
            self._files[change.path] = change.bytes
        await self._send({"type": "file.changed", "path": change.path, "op": change.op, "bytes": change.bytes})

    async def _diff_tree(self) -> None:
        now = dict(await asyncio.to_thread(tree, self.root))
        for path, size in sorted(now.items()):
            before = self._files.get(path)
            if before is None or before != size:
                op = "created" if before is None else "modified"
                await self._send({"type": "file.changed", "path": path, "op": op, "bytes": size})
        for path in sorted(set(self._files) - set(now)):
            await self._send({"type": "file.changed", "path": path, "op": "deleted", "bytes": 0})
        self._files = now

    # Provider bookkeeping ----------------------------------------------------------------------------------------

    async def usage(self, usage: Usage) -> None:
        self.tally.usages.append(usage)
        # Into the ledger at once: a crash later in the run must not lose what the provider already bills.
        entry = usage_entry(self.run, usage, complete=usage.complete)
        await record(run_usage_add, run_id=self.run.id, entry=entry)
        self.tally.recorded = len(self.tally.usages)
        await self.publisher.send(usage_event(self.run_id, self.tally))

    async def retry(self, retry: Retry) -> None:
        await self.publisher.send(retry_status(self.run, retry))

    async def _send(self, fields: dict[str, Any]) -> None:
        run_id = self.run_id

        def build(seq: int) -> events.RunEvent:
            event: Any = {**fields, "run_id": run_id, "seq": seq}  # one of the agent events of runs.events
            return event  # type: ignore[no-any-return]

        await self.publisher.send(build)


async def call_agent(
    run: Run, *, control: RunControl, publisher: RunPublisher, tally: Tally, limits: CallLimits | None
) -> Outcome:
    """Run the agent for ``run`` (claimed, ``running``) and say how it ended. The workspace is left ``available``."""
    key = usable_key(run)
    if key is None:
        return KEY_REVOKED
    call = limits or call_limits()
    mode = str(settings.SANDBOX_MODE)
    project_id = run.project_id
    if project_id is not None:
        # A named project's persistent workspace: left in place when the run ends, never downloaded-and-deleted.
        await database_sync_to_async(run_workspace_opened)(run_id=run.id, sandbox_mode=mode, project=True)
        root = await asyncio.to_thread(project_workspace_create, project_id)
    else:
        await database_sync_to_async(run_workspace_opened)(run_id=run.id, sandbox_mode=mode)
        root = await asyncio.to_thread(workspace_create, run.id)
    run.sandbox_mode = mode
    sink = _LiveSink(
        run, publisher=publisher, tally=tally, root=root, coalesce_s=float(settings.RUN_STREAM_COALESCE_SECONDS)
    )
    # The sandbox self-test is cached per process; run it off the loop once so the first command does not stall it.
    await asyncio.to_thread(sandbox_status, mode)

    async def stream_turn(request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        # The key is open for this one model call only, and every opening is audited (key.used).
        async with opened_adapter(run, key, limits=call) as adapter:
            reported = False
            try:
                async with aclosing(adapter.stream_chat(request)) as stream:
                    async for event in stream:
                        reported = reported or isinstance(event, Usage)
                        yield event
            finally:
                if not reported and adapter.abandoned_usage is not None:
                    # What the provider had counted when we hung up is billed, so it is kept (flagged incomplete).
                    tally.usages.append(dataclasses.replace(adapter.abandoned_usage, complete=False))

    async def between_steps() -> str | None:
        # Each model call reserves what it can cost against the org's monthly cap before it starts
        # (runs.services.tokens): no room, no call.
        if tally.usages:
            last = tally.usages[-1]
            estimate = agent_step_estimate(
                last_input_tokens=last.input_tokens or 0, last_output_tokens=last.output_tokens or 0
            )
        else:  # what run_create reserved
            estimate = run_first_call_estimate(kind=RunKind.AGENT, objective=run.objective)
        reserved: bool = await database_sync_to_async(run_tokens_top_up)(run_id=run.id, estimate=estimate)
        return None if reserved else TOKEN_CAP_REACHED

    try:
        outcome = await run_agent(
            stream_turn=stream_turn,
            model=run.model,
            objective=run.objective,
            root=root,
            limits=AgentLimits().merged(run.limits),
            sink=sink,
            stop=control.stop,
            allow_commands=run.org.agents_may_run_commands,
            max_output_tokens=MAX_OUTPUT_TOKENS,
            between_steps=between_steps,
        )
    except ProviderKeyUnavailable:
        return KEY_REVOKED
    except ProviderKeyDecryptionError:
        return KEY_UNREADABLE
    finally:
        await sink.close()
        if project_id is not None:
            await database_sync_to_async(project_record_run)(project_id=project_id, root=root)
        else:
            await database_sync_to_async(run_workspace_closed)(run_id=run.id)
    tally.turn_ended = outcome.steps > 0
    if outcome.status == "succeeded":
        return Outcome(RunStatus.SUCCEEDED)
    if outcome.status == "cancelled":
        return stopped_outcome(control.reason or "cancelled")
    if outcome.provider_error is not None:
        if outcome.provider_error.kind is ErrorKind.AUTH:
            await mark_key_invalid(key, run)
        return Outcome(
            RunStatus.FAILED,
            str(outcome.provider_error.kind),
            failure_message(outcome.provider_error),
            retryable=outcome.provider_error.retryable,
            provider_error=outcome.provider_error,
        )
    return Outcome(RunStatus.FAILED, outcome.error_kind, outcome.error_message)
