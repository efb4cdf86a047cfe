"""The agent loop against the real simulator, the real adapters, real workspace directories and the real sandbox.

``RecordingSink`` stands in for the executor's publisher: it keeps every report the loop makes, in order.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from cesaflow.lib.http import EgressPolicy, close_http_clients, get_http_client
from runs.agent import AgentLimits, AgentOutcome, run_agent
from runs.agent.loop import BetweenSteps, StreamTurn
from runs.providers import CallLimits, ChatRequest, adapter_for
from runs.providers.events import ProviderEvent, Retry, Usage
from runs.workspaces import FileChange, workspace_create, workspace_delete
from tests.runs.conftest import FAKE_KEY

FLAVOURS = ["openai", "groq", "anthropic"]
FAST_CALLS = CallLimits(
    connect_timeout_s=2.0, read_timeout_s=5.0, deadline_s=20.0, backoff_base_s=0.005, backoff_max_s=0.02
)
OBJECTIVE = "Build a small greeting package with a test."


@dataclass
class RecordingSink:
    """Every AgentSink call as (method, arguments), in order; ``on_tool_call`` lets a test act at that moment."""

    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    on_tool_call: Callable[[str], Awaitable[None]] | None = None

    async def text(self, text: str) -> None:
        self.calls.append(("text", (text,)))

    async def turn_started(self, step: int, max_steps: int, input_tokens: int, output_tokens: int) -> None:
        self.calls.append(("turn_started", (step, max_steps, input_tokens, output_tokens)))

    async def tool_call(self, call_id: str, name: str, arguments: dict[str, Any]) -> None:
        self.calls.append(("tool_call", (call_id, name, arguments)))
        if self.on_tool_call is not None:
            await self.on_tool_call(name)

    async def tool_result(self, call_id: str, name: str, ok: bool, summary: str) -> None:
        self.calls.append(("tool_result", (call_id, name, ok, summary)))

    async def command_output(self, text: str) -> None:
        self.calls.append(("command_output", (text,)))

    async def file_changed(self, change: FileChange) -> None:
        self.calls.append(("file_changed", (change,)))

    async def usage(self, usage: Usage) -> None:
        self.calls.append(("usage", (usage,)))

    async def retry(self, retry: Retry) -> None:
        self.calls.append(("retry", (retry,)))

    def of(self, method: str) -> list[tuple[Any, ...]]:
        return [arguments for name, arguments in self.calls if name == method]

    @property
    def text_streamed(self) -> str:
        return "".join(arguments[0] for arguments in self.of("text"))

    @property
    def command_output_streamed(self) -> str:
        return "".join(arguments[0] for arguments in self.of("command_output"))

    def results(self) -> list[tuple[str, bool, str]]:
        """(tool name, ok, summary) of every tool_result."""
        return [(name, ok, summary) for _call_id, name, ok, summary in self.of("tool_result")]

    def changes(self) -> list[FileChange]:
        return [arguments[0] for arguments in self.of("file_changed")]


@pytest.fixture
def workspace(settings) -> Iterator[Path]:
    """A real run workspace under a fresh /tmp directory: pytest's tmp_path is not traversable by the sandbox uid."""
    base = Path(tempfile.mkdtemp(prefix="cesaflow-agent-", dir="/tmp"))
    os.chmod(base, 0o711)  # noqa: S103 - the sandbox uid must traverse it, as it does the real workspace root
    settings.WORKSPACE_ROOT = base / "workspaces"
    settings.SANDBOX_MODE = "bwrap"
    run_id = uuid.uuid4()
    path = workspace_create(run_id)
    yield path
    workspace_delete(run_id)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    yield get_http_client(EgressPolicy(allow_private=True))
    await close_http_clients()


@pytest.fixture
def stream_turn_for(simulator, http_client) -> Callable[[str], StreamTurn]:
    """What the executor passes as ``stream_turn``: a fresh adapter per model call, pointed at the simulator."""

    def make(flavour: str) -> StreamTurn:
        async def stream_turn(request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
            adapter = adapter_for(
                flavour, base_url=simulator.base_urls[flavour], api_key=FAKE_KEY, client=http_client, limits=FAST_CALLS
            )
            async with aclosing(adapter.stream_chat(request)) as events:
                async for event in events:
                    yield event

        return stream_turn

    return make


@dataclass
class AgentRun:
    outcome: AgentOutcome
    sink: RecordingSink
    elapsed_s: float


@pytest.fixture
def run_agent_with(stream_turn_for, workspace) -> Callable[..., Awaitable[AgentRun]]:
    """Run the agent once: ``await run_agent_with("openai", "fake/agent_demo", limits=..., ...)``."""

    async def run(
        flavour: str,
        model: str,
        *,
        limits: AgentLimits | None = None,
        allow_commands: bool = True,
        stop: asyncio.Event | None = None,
        sink: RecordingSink | None = None,
        between_steps: BetweenSteps | None = None,
    ) -> AgentRun:
        sink = sink or RecordingSink()
        started = time.monotonic()
        outcome = await asyncio.wait_for(
            run_agent(
                stream_turn=stream_turn_for(flavour),
                model=model,
                objective=OBJECTIVE,
                root=workspace,
                limits=limits or AgentLimits(),
                sink=sink,
                stop=stop or asyncio.Event(),
                allow_commands=allow_commands,
                max_output_tokens=1024,
                between_steps=between_steps,
            ),
            timeout=30,  # a hang fails the test instead of the suite
        )
        return AgentRun(outcome=outcome, sink=sink, elapsed_s=time.monotonic() - started)

    return run
