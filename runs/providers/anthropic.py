"""Anthropic Messages streaming (providers.md §1.4): named events, content blocks, cumulative usage."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from keys.providers import ANTHROPIC_VERSION
from runs.providers.base import ChatRequest, ProviderAdapter, StreamParser
from runs.providers.errors import classify_stream_error
from runs.providers.events import (
    ErrorKind,
    Ping,
    ProviderError,
    ProviderEvent,
    StopReason,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    TurnEnd,
    Usage,
)
from runs.providers.sse import SSEEvent

_STOPS = {
    "end_turn": StopReason.END,
    "stop_sequence": StopReason.END,
    "tool_use": StopReason.TOOL_USE,
    "max_tokens": StopReason.MAX_TOKENS,
    "refusal": StopReason.REFUSAL,
}


@dataclass
class _ToolBlock:
    position: int
    fragments: list[str] = field(default_factory=list)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class AnthropicStreamParser(StreamParser):
    """message_start → content blocks → message_delta (cumulative usage, stop_reason) → message_stop."""

    def __init__(self, *, secret: str | None = None) -> None:
        self._secret = secret
        self._input: int | None = None
        self._cached: int | None = None
        self._output: int | None = None
        self._final_usage_seen = False
        self._stop: str | None = None
        self._tools: dict[int, _ToolBlock] = {}  # content block index -> tool call
        self._positions = 0

    def on_event(self, sse: SSEEvent) -> list[ProviderEvent]:
        try:
            payload = orjson.loads(sse.data) if sse.data else {}
        except ValueError:
            self._done = True
            return self._fail(
                ProviderError(
                    kind=ErrorKind.PROTOCOL, retryable=False, message="The provider sent an unreadable event."
                )
            )
        if not isinstance(payload, dict):
            return []
        kind = payload.get("type") if isinstance(payload.get("type"), str) else sse.event
        if sse.event == "error" or kind == "error":
            self._done = True
            return self._fail(classify_stream_error(payload, secret=self._secret))
        match kind:
            case "message_start":
                return self._on_message_start(payload)
            case "content_block_start":
                return self._on_content_block_start(payload)
            case "content_block_delta":
                return self._on_content_block_delta(payload)
            case "content_block_stop":
                return self._on_content_block_stop(payload)
            case "message_delta":
                return self._on_message_delta(payload)
            case "message_stop":
                return self._on_message_stop()
            case "ping":
                return [Ping()]
        return []  # unknown event types are no-ops, as Anthropic asks

    def _take_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        base = _int(usage.get("input_tokens"))
        if base is not None:
            # Total input = uncached + cache writes + cache reads (§1.4).
            created = _int(usage.get("cache_creation_input_tokens")) or 0
            read = _int(usage.get("cache_read_input_tokens"))
            self._input = base + created + (read or 0)
            if read is not None:
                self._cached = read
        output = _int(usage.get("output_tokens"))
        if output is not None:
            self._output = output  # cumulative: the last value is the total, never a sum

    def _on_message_start(self, payload: dict[str, Any]) -> list[ProviderEvent]:
        message = payload.get("message")
        if isinstance(message, dict):
            self._take_usage(message.get("usage"))
        return []

    def _on_content_block_start(self, payload: dict[str, Any]) -> list[ProviderEvent]:
        block = payload.get("content_block")
        index = payload.get("index")
        if not isinstance(block, dict) or not isinstance(index, int):
            return []
        events: list[ProviderEvent] = []
        if block.get("type") == "tool_use":
            tool = _ToolBlock(position=self._positions)
            self._positions += 1
            self._tools[index] = tool
            events.append(
                ToolCallStart(
                    call_id=str(block.get("id") or ""), name=str(block.get("name") or ""), position=tool.position
                )
            )
        elif block.get("type") == "text" and isinstance(block.get("text"), str) and block["text"]:
            events.append(TextDelta(block["text"]))
        return events

    def _on_content_block_delta(self, payload: dict[str, Any]) -> list[ProviderEvent]:
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            return []
        if delta.get("type") == "text_delta":
            text = delta.get("text")
            return [TextDelta(text)] if isinstance(text, str) and text else []
        if delta.get("type") == "input_json_delta":
            tool = self._tools.get(payload.get("index", -1))
            fragment = delta.get("partial_json")
            if tool is not None and isinstance(fragment, str) and fragment:
                tool.fragments.append(fragment)
                return [ToolCallArgsDelta(position=tool.position, fragment=fragment)]
        return []  # thinking, signature and citation deltas are not relayed

    def _on_content_block_stop(self, payload: dict[str, Any]) -> list[ProviderEvent]:
        tool = self._tools.get(payload.get("index", -1))
        if tool is None:
            return []
        # A tool without arguments streams no JSON at all; its input is the empty object.
        return [ToolCallEnd(position=tool.position, arguments_json="".join(tool.fragments) or "{}")]

    def _on_message_delta(self, payload: dict[str, Any]) -> list[ProviderEvent]:
        delta = payload.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
            self._stop = delta["stop_reason"]
        if isinstance(payload.get("usage"), dict):
            self._take_usage(payload["usage"])
            self._final_usage_seen = True
        return []

    def _on_message_stop(self) -> list[ProviderEvent]:
        self._done = True
        if self._stop is None:
            return self._fail(
                ProviderError(
                    kind=ErrorKind.INCOMPLETE,
                    retryable=True,
                    message="The provider ended the message without a stop reason.",
                )
            )
        usage = Usage(
            input_tokens=self._input,
            output_tokens=self._output,
            cached_input_tokens=self._cached,
            complete=self._final_usage_seen and self._input is not None,
        )
        return [usage, TurnEnd(stop=_STOPS.get(self._stop, StopReason.OTHER), raw_reason=self._stop)]

    def _fail(self, error: ProviderError) -> list[ProviderEvent]:
        usage = self.partial_usage()
        return [usage, error] if usage is not None else [error]

    def partial_usage(self) -> Usage | None:
        # If the stream dies after message_start, the input count is still known (§1.4).
        output = self._output if self._final_usage_seen else None
        return Usage(input_tokens=self._input, output_tokens=output, cached_input_tokens=self._cached, complete=False)


def _text_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content}] if content else []


def anthropic_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The neutral conversation in Messages form: tool results become ``tool_result`` blocks of a user message,
    and consecutive messages of one role are merged (the API requires alternation)."""
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if out and out[-1]["role"] == role:
            out[-1]["content"] = _text_blocks(out[-1]["content"]) + blocks
        else:
            out.append({"role": role, "content": blocks})

    for message in request.messages:
        if message.role == "tool":
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id or "",
                "content": message.content or "",
            }
            if message.is_error:
                block["is_error"] = True
            add("user", [block])
        elif message.role == "assistant":
            blocks = _text_blocks(message.content)
            for call in message.tool_calls:
                try:
                    arguments = json.loads(call.arguments_json) if call.arguments_json else {}
                except ValueError:
                    arguments = {}  # the model sent broken JSON; it was told so in the tool result
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.call_id,
                        "name": call.name,
                        "input": arguments if isinstance(arguments, dict) else {},
                    }
                )
            add("assistant", blocks)
        else:
            add("user", _text_blocks(message.content) or [{"type": "text", "text": ""}])
    # Plain single-text user messages stay strings: the most widely accepted shape.
    for entry in out:
        content = entry["content"]
        if len(content) == 1 and content[0].get("type") == "text":
            entry["content"] = content[0]["text"]
    return out


class AnthropicAdapter(ProviderAdapter):
    provider: ClassVar[str] = "anthropic"

    def build_request(self, request: ChatRequest) -> tuple[str, dict[str, str], dict[str, Any]]:
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": anthropic_messages(request),
            "stream": True,
        }
        if request.system:
            body["system"] = request.system
        if request.tools:
            body["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": dict(t.parameters)}
                for t in request.tools
            ]
        headers = {
            "x-api-key": self._api_key,
            "anthropic-version": ANTHROPIC_VERSION,
            "accept": "text/event-stream",
        }
        return f"{self.base_url}/v1/messages", headers, body

    def new_parser(self) -> StreamParser:
        return AnthropicStreamParser(secret=self._api_key)
