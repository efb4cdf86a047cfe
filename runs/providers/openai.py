"""OpenAI Chat Completions streaming (providers.md §1.2), shared by OpenAI, Groq (§1.5) and OpenAI-compatible
servers. One parser; Groq differs only in where usage may arrive (``x_groq.usage``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from runs.providers.base import ChatRequest, ProviderAdapter, StreamParser
from runs.providers.errors import classify_stream_error
from runs.providers.events import (
    ErrorKind,
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
    "stop": StopReason.END,
    "tool_calls": StopReason.TOOL_USE,
    "function_call": StopReason.TOOL_USE,
    "length": StopReason.MAX_TOKENS,
    "content_filter": StopReason.CONTENT_FILTER,
}


@dataclass
class _Call:
    call_id: str
    fragments: list[str] = field(default_factory=list)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage_from_openai(raw: dict[str, Any], *, complete: bool) -> Usage:
    details = raw.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Usage(
        input_tokens=_int(raw.get("prompt_tokens")),
        output_tokens=_int(raw.get("completion_tokens")),
        cached_input_tokens=cached,
        complete=complete,
    )


class OpenAIStreamParser(StreamParser):
    """``chat.completion.chunk`` events until ``data: [DONE]``. Tool-call fragments are keyed by ``index``; a new
    non-empty ``id`` at a used index starts a new call (some compatible servers reuse index 0)."""

    def __init__(self, *, secret: str | None = None) -> None:
        self._secret = secret
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._calls: list[_Call] = []
        self._position_of_index: dict[int, int] = {}
        self._ended = 0  # calls [0, _ended) got their ToolCallEnd

    def on_event(self, sse: SSEEvent) -> list[ProviderEvent]:
        data = sse.data
        if data.startswith("[DONE]"):
            self._done = True
            return self._final()
        try:
            payload = orjson.loads(data)
        except ValueError:
            self._done = True
            return self._fail(
                ProviderError(
                    kind=ErrorKind.PROTOCOL, retryable=False, message="The provider sent an unreadable chunk."
                )
            )
        if sse.event == "error" or (isinstance(payload, dict) and payload.get("error")):
            self._done = True
            return self._fail(classify_stream_error(payload, secret=self._secret))
        if not isinstance(payload, dict):
            return []
        # Usage = the last non-null of chunk.usage and chunk.x_groq.usage; the two are never added.
        if isinstance(payload.get("usage"), dict):
            self._usage = payload["usage"]
        x_groq = payload.get("x_groq")
        if isinstance(x_groq, dict) and isinstance(x_groq.get("usage"), dict):
            self._usage = x_groq["usage"]
        events: list[ProviderEvent] = []
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n > 1 is never requested
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta, events)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self._finish = reason
                self._end_calls(events)
        return events

    def _delta(self, delta: dict[str, Any], events: list[ProviderEvent]) -> None:
        content = delta.get("content")
        if isinstance(content, str) and content:
            events.append(TextDelta(content))
        for item in delta.get("tool_calls") or ():
            if not isinstance(item, dict):
                continue
            index: int = item["index"] if isinstance(item.get("index"), int) else 0
            call_id: str = item["id"] if isinstance(item.get("id"), str) else ""
            function: dict[str, Any] = item["function"] if isinstance(item.get("function"), dict) else {}
            position = self._position_of_index.get(index)
            if position is None or (call_id and call_id != self._calls[position].call_id):
                position = len(self._calls)
                self._calls.append(_Call(call_id or f"call_{position}"))
                self._position_of_index[index] = position
                name: str = function["name"] if isinstance(function.get("name"), str) else ""
                events.append(ToolCallStart(call_id=self._calls[position].call_id, name=name, position=position))
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                self._calls[position].fragments.append(arguments)
                events.append(ToolCallArgsDelta(position=position, fragment=arguments))

    def _end_calls(self, events: list[ProviderEvent]) -> None:
        for position in range(self._ended, len(self._calls)):
            events.append(ToolCallEnd(position=position, arguments_json="".join(self._calls[position].fragments)))
        self._ended = len(self._calls)

    def _final(self) -> list[ProviderEvent]:
        if self._finish is None:
            return self._fail(
                ProviderError(
                    kind=ErrorKind.INCOMPLETE,
                    retryable=True,
                    message="The provider ended the stream without a finish reason.",
                )
            )
        usage = (
            usage_from_openai(self._usage, complete=True)
            if self._usage is not None
            else Usage(input_tokens=None, output_tokens=None, complete=False)
        )
        return [usage, TurnEnd(stop=_STOPS.get(self._finish, StopReason.OTHER), raw_reason=self._finish)]

    def _fail(self, error: ProviderError) -> list[ProviderEvent]:
        usage = self.partial_usage()
        return [usage, error] if usage is not None else [error]

    def partial_usage(self) -> Usage | None:
        if self._usage is not None:
            return usage_from_openai(self._usage, complete=False)
        return Usage(input_tokens=None, output_tokens=None, complete=False)


def openai_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The neutral conversation in Chat Completions form."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    for message in request.messages:
        if message.role == "tool":
            messages.append(
                {"role": "tool", "tool_call_id": message.tool_call_id or "", "content": message.content or ""}
            )
        elif message.role == "assistant":
            entry: dict[str, Any] = {"role": "assistant", "content": message.content}
            if message.tool_calls:
                entry["tool_calls"] = [
                    {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
                    for c in message.tool_calls
                ]
            messages.append(entry)
        else:
            messages.append({"role": "user", "content": message.content or ""})
    return messages


class OpenAIAdapter(ProviderAdapter):
    provider: ClassVar[str] = "openai"
    # OpenAI deprecated max_tokens (and o-series models reject it); many compatible servers only know max_tokens.
    max_tokens_field: ClassVar[str] = "max_completion_tokens"

    def __init__(self, *, include_usage: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Switchable per provider: Groq rejected stream_options in 2024 (providers.md §1.5).
        self.include_usage = include_usage

    def build_request(self, request: ChatRequest) -> tuple[str, dict[str, str], dict[str, Any]]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": openai_messages(request),
            "stream": True,
            self.max_tokens_field: request.max_tokens,
        }
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": dict(t.parameters)},
                }
                for t in request.tools
            ]
            body["tool_choice"] = "auto"
        headers = {"authorization": f"Bearer {self._api_key}", "accept": "text/event-stream"}
        return f"{self.base_url}/chat/completions", headers, body

    def new_parser(self) -> StreamParser:
        return OpenAIStreamParser(secret=self._api_key)


class GroqAdapter(OpenAIAdapter):
    provider: ClassVar[str] = "groq"


class OpenAICompatibleAdapter(OpenAIAdapter):
    provider: ClassVar[str] = "openai_compatible"
    max_tokens_field: ClassVar[str] = "max_tokens"
