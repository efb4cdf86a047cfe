"""The agent loop (providers.md §2.2): stream a model turn, run its tool calls in the workspace, feed the results
back, until the model calls ``finish`` or a budget runs out.

The conversation lives in this function's locals only: nothing of it is written to disk, the database, Redis or the
logs, and it is gone when ``run_agent`` returns. What a watcher sees goes through the ``AgentSink`` (text deltas,
summarised tool calls, one-line results, command output); logs carry kinds and counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from runs.agent.actions import ToolResult, commands_off, execute_tool, failure
from runs.agent.limits import AgentLimits
from runs.agent.prompt import CUT_OFF_CALL, NUDGE, NUDGE_CUT_OFF, system_prompt
from runs.agent.stuck import STUCK_WARNING, StuckDetector, Verdict
from runs.agent.tools import (
    FINISH,
    FINISH_SUMMARY_MAX_CHARS,
    RUN_COMMAND,
    TOOLS_BY_NAME,
    ArgumentError,
    parse_arguments,
    summarise_arguments,
    tool_specs,
    truncate,
)
from runs.providers import ChatRequest, Message, ToolCall, read_to_end
from runs.providers.events import (
    ErrorKind,
    ProviderError,
    ProviderEvent,
    Retry,
    StopReason,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    TurnEnd,
    Usage,
)
from runs.workspaces import FileChange

logger = logging.getLogger("cesaflow.agent")

T = TypeVar("T")


class AgentSink(Protocol):
    """What the loop reports live; the executor implements it and publishes run events."""

    async def text(self, text: str) -> None:
        """A delta of the model's text, as it streams."""

    async def turn_started(self, step: int, max_steps: int, input_tokens: int, output_tokens: int) -> None:
        """A model call starts (step is 1-based; the token counts are the run's totals so far)."""

    async def tool_call(self, call_id: str, name: str, arguments: dict[str, Any]) -> None:
        """A call is about to run. ``arguments`` is a summary: file content only as sizes, strings cut short."""

    async def tool_result(self, call_id: str, name: str, ok: bool, summary: str) -> None:
        """A call's outcome in one short line ("wrote 12 bytes", "exit 1", the refusal's text)."""

    async def command_output(self, text: str) -> None:
        """A piece of a running command's output."""

    async def file_changed(self, change: FileChange) -> None:
        """A file tool created, modified or deleted a file."""

    async def usage(self, usage: Usage) -> None:
        """One Usage event of one model call (the executor records the ledger)."""

    async def retry(self, retry: Retry) -> None:
        """The adapter is about to retry a failed attempt of the current model call."""


StreamTurn = Callable[[ChatRequest], AsyncGenerator[ProviderEvent, None]]
"""One model call: the executor opens the org's key for it, builds the adapter and yields the adapter's events."""

BetweenSteps = Callable[[], Awaitable[str | None]]
"""Awaited before each model call; a non-None return is an error kind that stops the run (e.g. a spent token cap)."""


@dataclass(frozen=True)
class AgentOutcome:
    status: Literal["succeeded", "failed", "cancelled"]
    error_kind: str = ""  # limit_* | stuck | tool_errors | no_progress | an ErrorKind | a between_steps kind
    error_message: str = ""  # our own words, never provider or model text
    summary: str = field(default="", repr=False)  # the model's finish summary: for the live UI only, never stored
    steps: int = 0
    provider_error: ProviderError | None = None


ERROR_MESSAGES = {
    "limit_steps": "The agent reached its limit of {max_steps} steps before finishing.",
    "limit_tokens": "The agent reached its limit of {max_tokens} tokens before finishing.",
    "limit_time": "The agent reached its time limit of {minutes:g} minutes before finishing.",
    "stuck": "The agent was stopped because it kept repeating the same actions without making progress.",
    "tool_errors": "The agent was stopped after {max_errors} steps in a row in which every tool call failed.",
    "no_progress": "The model stopped calling tools without finishing the task.",
    "token_cap_reached": "The organization's monthly token cap was reached.",
    "cancelled": "The run was cancelled.",
}


@dataclass
class _PendingCall:
    call_id: str
    name: str
    fragments: list[str] = field(default_factory=list)
    arguments_json: str | None = None

    def as_tool_call(self) -> ToolCall:
        arguments = self.arguments_json if self.arguments_json is not None else "".join(self.fragments)
        return ToolCall(call_id=self.call_id, name=self.name, arguments_json=arguments)


@dataclass
class _Turn:
    text: list[str] = field(default_factory=list)
    calls: dict[int, _PendingCall] = field(default_factory=dict)
    stop: StopReason | None = None
    error: ProviderError | None = None

    def tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(self.calls[position].as_tool_call() for position in sorted(self.calls))


@dataclass
class _Run:
    """The loop's counters (numbers only: this is also what the closing log line reports)."""

    limits: AgentLimits
    input_tokens: int = 0
    output_tokens: int = 0
    steps: int = 0
    tool_calls: int = 0
    tool_failures: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def failed(self, kind: str, provider_error: ProviderError | None = None) -> AgentOutcome:
        template = ERROR_MESSAGES.get(kind)
        if template is not None:
            message = template.format(
                max_steps=self.limits.max_steps,
                max_tokens=self.limits.max_tokens,
                minutes=round(self.limits.wall_clock_s / 60, 2),
                max_errors=self.limits.max_consecutive_errors,
            )
        elif provider_error is not None:
            message = f"The model provider returned an error ({kind})."
        else:
            message = f"The run was stopped ({kind[:50]})."
        status: Literal["failed", "cancelled"] = "cancelled" if kind == "cancelled" else "failed"
        return AgentOutcome(
            status=status, error_kind=kind, error_message=message, steps=self.steps, provider_error=provider_error
        )


async def run_agent(
    *,
    stream_turn: StreamTurn,
    model: str,
    objective: str,
    root: Path,
    limits: AgentLimits,
    sink: AgentSink,
    stop: asyncio.Event,
    allow_commands: bool,
    max_output_tokens: int = 4096,
    between_steps: BetweenSteps | None = None,
) -> AgentOutcome:
    """Run the agent on ``objective`` in the workspace ``root`` until it finishes, fails or ``stop`` is set.

    Never raises for what the model or the provider does: tool failures go back to the model, provider errors and
    exhausted budgets become a failed outcome. Exceptions from ``stream_turn``, ``sink`` or ``between_steps``
    themselves propagate (they are the executor's). Setting ``stop`` ends the run within about a second, closing
    the model stream or killing the running command.
    """
    run = _Run(limits=limits)
    outcome: AgentOutcome | None = None
    try:
        outcome = await _loop(
            run,
            stream_turn=stream_turn,
            model=model,
            objective=objective,
            root=root,
            sink=sink,
            stop=stop,
            allow_commands=allow_commands,
            max_output_tokens=max_output_tokens,
            between_steps=between_steps,
        )
        return outcome
    finally:
        logger.info(
            "agent ended status=%s kind=%s steps=%d tool_calls=%d tool_failures=%d input_tokens=%d output_tokens=%d",
            outcome.status if outcome else "crashed",
            outcome.error_kind if outcome else "",
            run.steps,
            run.tool_calls,
            run.tool_failures,
            run.input_tokens,
            run.output_tokens,
        )


async def _loop(
    run: _Run,
    *,
    stream_turn: StreamTurn,
    model: str,
    objective: str,
    root: Path,
    sink: AgentSink,
    stop: asyncio.Event,
    allow_commands: bool,
    max_output_tokens: int,
    between_steps: BetweenSteps | None,
) -> AgentOutcome:
    limits = run.limits
    clock = asyncio.get_running_loop()
    deadline = clock.time() + limits.wall_clock_s
    system = system_prompt(limits, allow_commands=allow_commands)
    tools = tool_specs(allow_commands=allow_commands)
    messages: list[Message] = [Message(role="user", content=objective)]
    stuck = StuckDetector()
    consecutive_errors = 0
    nudged = False

    while True:
        if stop.is_set():
            return run.failed("cancelled")
        if run.steps >= limits.max_steps:
            return run.failed("limit_steps")
        if run.tokens >= limits.max_tokens:
            return run.failed("limit_tokens")
        if clock.time() >= deadline:
            return run.failed("limit_time")
        if between_steps is not None:
            refused = await between_steps()
            if refused:
                return run.failed(refused)

        run.steps += 1
        await sink.turn_started(run.steps, limits.max_steps, run.input_tokens, run.output_tokens)
        request = ChatRequest(
            model=model, messages=tuple(messages), system=system, tools=tools, max_tokens=max_output_tokens
        )
        status, turn = await _race(_stream(stream_turn, request, sink, run), stop=stop, deadline=deadline)
        if status == "stopped":
            return run.failed("cancelled")
        if status == "timeout" or turn is None:
            return run.failed("limit_time")
        if turn.error is not None:
            return run.failed(str(turn.error.kind), turn.error)

        text = "".join(turn.text)
        calls = turn.tool_calls()
        if not calls:
            if nudged:
                return run.failed("no_progress")
            nudged = True
            if text:
                messages.append(Message(role="assistant", content=text))
            # An empty reply is left out: the APIs refuse an assistant message without content.
            messages.append(
                Message(role="user", content=NUDGE_CUT_OFF if turn.stop is StopReason.MAX_TOKENS else NUDGE)
            )
            continue
        nudged = False
        messages.append(Message(role="assistant", content=text or None, tool_calls=_replayable(calls)))

        if turn.stop is StopReason.MAX_TOKENS:
            # The arguments of at least the last call are incomplete: nothing of this turn runs.
            for call in calls:
                await _announce(sink, call)
                messages.append(Message(role="tool", tool_call_id=call.call_id, content=CUT_OFF_CALL, is_error=True))
                await sink.tool_result(call.call_id, call.name, False, "cut off at the output token limit; not run")
            run.tool_calls += len(calls)
            run.tool_failures += len(calls)
            consecutive_errors += 1
            if consecutive_errors >= limits.max_consecutive_errors:
                return run.failed("tool_errors")
            continue

        observed: list[tuple[str, str, str]] = []
        any_ok = False
        finished: str | None = None
        for call in calls:
            await _announce(sink, call)
            if finished is not None:
                # The run is over; the answer is never sent, but watchers see every call settled.
                await sink.tool_result(call.call_id, call.name, False, "skipped: the run had finished")
                continue
            result, finish_summary = await _dispatch(
                call, root=root, run=run, sink=sink, stop=stop, allow_commands=allow_commands, deadline=deadline
            )
            if result.cancelled:
                await sink.tool_result(call.call_id, call.name, False, "cancelled")
                return run.failed("cancelled")
            run.tool_calls += 1
            run.tool_failures += 0 if result.ok else 1
            any_ok = any_ok or result.ok
            messages.append(
                Message(role="tool", tool_call_id=call.call_id, content=result.content, is_error=not result.ok)
            )
            await sink.tool_result(call.call_id, call.name, result.ok, result.summary)
            if result.change is not None:
                await sink.file_changed(result.change)
            observed.append((call.name, call.arguments_json, result.content))
            finished = finish_summary
            if stop.is_set() and finished is None:
                return run.failed("cancelled")  # the call that was running when stop came is reported as it ended

        if finished is not None:
            return AgentOutcome(status="succeeded", summary=finished, steps=run.steps)

        consecutive_errors = 0 if any_ok else consecutive_errors + 1
        if consecutive_errors >= limits.max_consecutive_errors:
            return run.failed("tool_errors")
        verdict = stuck.observe(observed)
        if verdict is Verdict.STUCK:
            return run.failed("stuck")
        if verdict is Verdict.WARN:
            messages.append(Message(role="user", content=STUCK_WARNING.format(count=stuck.repeats())))


def _replayable(calls: tuple[ToolCall, ...]) -> tuple[ToolCall, ...]:
    """The calls as they go back in the history. Arguments that are not a JSON object (broken, cut off, empty) are
    replaced by ``{}``: several OpenAI-compatible servers parse historical arguments and answer 400 otherwise, which
    would poison every later turn. The model learns what was wrong from the call's tool result."""
    replayed = []
    for call in calls:
        try:
            valid = isinstance(json.loads(call.arguments_json), dict)
        except ValueError:
            valid = False
        replayed.append(call if valid else dataclasses.replace(call, arguments_json="{}"))
    return tuple(replayed)


async def _announce(sink: AgentSink, call: ToolCall) -> None:
    await sink.tool_call(call.call_id, call.name, summarise_arguments(call.name, call.arguments_json))


async def _dispatch(
    call: ToolCall,
    *,
    root: Path,
    run: _Run,
    sink: AgentSink,
    stop: asyncio.Event,
    allow_commands: bool,
    deadline: float,
) -> tuple[ToolResult, str | None]:
    """One call's result, and the finish summary if it was a valid ``finish``."""
    spec = TOOLS_BY_NAME.get(call.name)
    if call.name == RUN_COMMAND and not allow_commands:
        # Not offered, but a model may still try (a script, a hallucination): an observation, never a command.
        return commands_off(), None
    if spec is None:
        available = ", ".join(t.name for t in tool_specs(allow_commands=allow_commands))
        message = f"Unknown tool {truncate(call.name, 100)!r}. The available tools are: {available}."
        return failure(message, "unknown tool"), None
    try:
        arguments = parse_arguments(spec, call.arguments_json)
    except ArgumentError as exc:
        return failure(str(exc)), None
    if call.name == FINISH:
        summary = truncate(arguments["summary"].strip(), FINISH_SUMMARY_MAX_CHARS)
        return ToolResult(ok=True, content="Finished.", summary="finished"), summary
    time_left = deadline - asyncio.get_running_loop().time()
    if time_left <= 0:
        return failure("Not executed: the run's time limit was reached.", "time limit reached"), None
    result = await execute_tool(
        call.name,
        arguments,
        root=root,
        limits=run.limits,
        allow_commands=allow_commands,
        stop=stop,
        time_left_s=time_left,
        on_output=sink.command_output,
    )
    return result, None


async def _stream(stream_turn: StreamTurn, request: ChatRequest, sink: AgentSink, run: _Run) -> _Turn:
    """One model turn, assembled from the adapter's events; text, usage and retries are reported as they come."""
    turn = _Turn()
    async with aclosing(stream_turn(request)) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                turn.text.append(event.text)
                await sink.text(event.text)
            elif isinstance(event, ToolCallStart):
                turn.calls[event.position] = _PendingCall(call_id=event.call_id, name=event.name)
            elif isinstance(event, ToolCallArgsDelta):
                pending = turn.calls.get(event.position)
                if pending is not None:
                    pending.fragments.append(event.fragment)
            elif isinstance(event, ToolCallEnd):
                pending = turn.calls.get(event.position)
                if pending is not None:
                    pending.arguments_json = event.arguments_json
            elif isinstance(event, Usage):
                run.input_tokens += event.input_tokens or 0
                run.output_tokens += event.output_tokens or 0
                await sink.usage(event)
            elif isinstance(event, Retry):
                await sink.retry(event)
            elif isinstance(event, TurnEnd):
                turn.stop = event.stop
                await read_to_end(events)  # the connection goes back to the pool for the next turn
                return turn
            elif isinstance(event, ProviderError):
                turn.error = event
                return turn
    # The adapter contract ends every stream with a terminal event; this is the belt to those braces.
    turn.error = ProviderError(
        kind=ErrorKind.INCOMPLETE, retryable=False, message="The model stream ended without the end of the turn."
    )
    return turn


async def _race(
    work: Coroutine[Any, Any, T], *, stop: asyncio.Event, deadline: float
) -> tuple[Literal["done", "stopped", "timeout"], T | None]:
    """Run ``work`` until it finishes, ``stop`` is set or the run's deadline passes. Whatever wins, ``work`` is not
    left running: cancelling it closes the model stream (``aclosing``), which drops the upstream connection at once,
    so the provider stops generating, and billing, for a turn nobody will read."""
    task = asyncio.create_task(work)
    stopper = asyncio.create_task(stop.wait())
    clock = asyncio.get_running_loop()
    try:
        await asyncio.wait(
            {task, stopper}, timeout=max(deadline - clock.time(), 0), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if not task.cancelled():
        # A finished turn wins over a stop that came at the same moment; its exception, if any, propagates. (A stop
        # or the deadline that comes while the turn reads its answer's last bytes, ``read_to_end``, comes first:
        # for at most ``drain_timeout_s``, microseconds when the provider ends its body with its last event.)
        return "done", task.result()
    return ("stopped" if stop.is_set() else "timeout"), None
