"""Adapters pointed at the simulator, through the shared HTTP client (development egress policy)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import httpx
import pytest

from cesaflow.lib.http import EgressPolicy, close_http_clients, get_http_client
from runs.providers.anthropic import AnthropicAdapter
from runs.providers.base import CallLimits, ChatRequest, Message, ProviderAdapter, ToolSpec
from runs.providers.events import (
    Ping,
    ProviderError,
    ProviderEvent,
    Retry,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    TurnEnd,
    Usage,
)
from runs.providers.openai import GroqAdapter, OpenAIAdapter
from tests.runs.conftest import FAKE_KEY

FLAVOURS = ["openai", "groq", "anthropic"]
ADAPTER_CLASSES: dict[str, type[ProviderAdapter]] = {
    "openai": OpenAIAdapter,
    "groq": GroqAdapter,
    "anthropic": AnthropicAdapter,
}
# Small timings so the suite stays fast; individual tests shrink them further.
FAST = CallLimits(
    connect_timeout_s=2.0,
    read_timeout_s=2.0,
    deadline_s=10.0,
    max_retries=2,
    backoff_base_s=0.005,
    backoff_max_s=0.02,
)
WRITE_FILE = ToolSpec(
    name="write_file",
    description="Write a file.",
    parameters={
        "type": "object",
        "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
        "required": ["path", "content"],
    },
)
FINISH = ToolSpec(
    name="finish",
    description="Finish.",
    parameters={"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]},
)


def chat(model: str = "fake/echo", *, tools: bool = True, text: str = "hello") -> ChatRequest:
    return ChatRequest(
        model=model,
        system="You are a test.",
        messages=[Message(role="user", content=text)],
        tools=[WRITE_FILE, FINISH] if tools else [],
        max_tokens=256,
    )


@dataclass
class Outcome:
    """One stream_chat call, summarised."""

    events: list[ProviderEvent]
    text: str = ""
    calls: list[ToolCallStart] = field(default_factory=list)
    arguments: dict[int, str] = field(default_factory=dict)  # position -> ToolCallEnd.arguments_json
    streamed_arguments: dict[int, str] = field(default_factory=dict)  # position -> joined ToolCallArgsDelta
    usages: list[Usage] = field(default_factory=list)
    retries: list[Retry] = field(default_factory=list)
    pings: int = 0
    terminal: TurnEnd | ProviderError | None = None

    @property
    def succeeded(self) -> bool:
        return isinstance(self.terminal, TurnEnd)

    @property
    def end(self) -> TurnEnd:
        assert isinstance(self.terminal, TurnEnd), f"expected a TurnEnd, got {self.terminal!r}"
        return self.terminal

    @property
    def error(self) -> ProviderError:
        assert isinstance(self.terminal, ProviderError), f"expected a ProviderError, got {self.terminal!r}"
        return self.terminal

    @classmethod
    def of(cls, events: list[ProviderEvent]) -> Outcome:
        outcome = cls(events=events)
        for event in events:
            if isinstance(event, TextDelta):
                outcome.text += event.text
            elif isinstance(event, ToolCallStart):
                outcome.calls.append(event)
            elif isinstance(event, ToolCallArgsDelta):
                outcome.streamed_arguments[event.position] = (
                    outcome.streamed_arguments.get(event.position, "") + event.fragment
                )
            elif isinstance(event, ToolCallEnd):
                outcome.arguments[event.position] = event.arguments_json
            elif isinstance(event, Usage):
                outcome.usages.append(event)
            elif isinstance(event, Retry):
                outcome.retries.append(event)
            elif isinstance(event, Ping):
                outcome.pings += 1
        terminal = events[-1]
        assert isinstance(terminal, TurnEnd | ProviderError), "the last event must be terminal"
        assert sum(isinstance(e, TurnEnd | ProviderError) for e in events) == 1, "exactly one terminal event"
        outcome.terminal = terminal
        return outcome


@pytest.fixture
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    yield get_http_client(EgressPolicy(allow_private=True))
    await close_http_clients()


@pytest.fixture
def make_adapter(simulator, http_client):
    def make(flavour: str, limits: CallLimits = FAST, key: str = FAKE_KEY) -> ProviderAdapter:
        return ADAPTER_CLASSES[flavour](
            base_url=simulator.base_urls[flavour], api_key=key, client=http_client, limits=limits
        )

    return make


async def run(adapter: ProviderAdapter, request: ChatRequest) -> Outcome:
    async with aclosing(adapter.stream_chat(request)) as stream:
        return Outcome.of([event async for event in stream])
