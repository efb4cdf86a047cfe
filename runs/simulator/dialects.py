"""What the simulator writes, per flavour: stream events (providers.md §3.5), non-streaming bodies and error
bodies in each provider's shape (§1.6)."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from runs.simulator.scenarios import Scenario


def dumps(value: Any) -> str:
    # Compact and raw UTF-8, like the real APIs: multi-byte characters stay multi-byte on the wire.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def mask_key(key: str) -> str:
    return f"{key[:8]}***" if key else ""


@dataclass
class ToolCallOut:
    call_id: str
    name: str
    arguments: str  # the exact string streamed


@dataclass
class TurnOut:
    text: str = ""
    calls: list[ToolCallOut] = field(default_factory=list)
    stop: str = "end"  # end | tool_use | max_tokens
    input_tokens: int = 0
    output_tokens: int = 0


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            text = _text_of(message.get("content"))
            if text:
                return text
    return ""


def declared_tools(flavour: str, body: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for tool in body.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        if flavour == "anthropic":
            names.add(str(tool.get("name", "")))
        elif isinstance(tool.get("function"), dict):
            names.add(str(tool["function"].get("name", "")))
    return names


def assistant_turns(body: dict[str, Any]) -> int:
    """Turn selection is stateless: the turn index is the number of assistant messages already sent (§3.4)."""
    return sum(1 for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "assistant")


def _ident(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)[:40]


def build_turn(scenario: Scenario, flavour: str, body: dict[str, Any]) -> TurnOut:
    index = assistant_turns(body)
    declared = declared_tools(flavour, body)
    if scenario.echo:
        turn: dict[str, Any] = {"text": f"You asked: {last_user_text(body)[:200]}"}
        turn["tool_calls"] = [
            {"name": "finish", "arguments": {"summary": "Echoed the request."}, "only_if_declared": True}
        ]
    else:
        turn = scenario.turn(index)
    out = TurnOut(text=turn.get("text") or "")
    prefix = "toolu" if flavour == "anthropic" else "call"
    for position, call in enumerate(turn.get("tool_calls") or []):
        if call.get("only_if_declared") and call["name"] not in declared:
            continue
        arguments = call["arguments_raw"] if "arguments_raw" in call else dumps(call.get("arguments") or {})
        call_id = f"{prefix}_{_ident(scenario.name)}_{index}_{position}"
        out.calls.append(ToolCallOut(call_id=call_id, name=call["name"], arguments=arguments))
    if turn.get("truncate_reason") == "length":
        out.stop = "max_tokens"
    elif out.calls:
        out.stop = "tool_use"
    emitted = len(out.text) + sum(len(c.arguments) for c in out.calls)
    usage = scenario.usage
    auto_in = math.ceil(len(json.dumps(body.get("messages"))) / 4)
    out.input_tokens = auto_in if usage.get("input_tokens", "auto") == "auto" else int(usage["input_tokens"])
    out.output_tokens = (
        math.ceil(emitted / 4) if usage.get("output_tokens", "auto") == "auto" else int(usage["output_tokens"])
    )
    return out


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


_OPENAI_FINISH = {"end": "stop", "tool_use": "tool_calls", "max_tokens": "length"}
_ANTHROPIC_STOP = {"end": "end_turn", "tool_use": "tool_use", "max_tokens": "max_tokens"}


@dataclass
class StreamContext:
    flavour: str
    model: str
    completion_id: str  # chatcmpl-fake-<n> / msg_fake_<n>
    groq_id: str
    include_usage: bool


def openai_usage(turn: TurnOut) -> dict[str, Any]:
    return {
        "prompt_tokens": turn.input_tokens,
        "completion_tokens": turn.output_tokens,
        "total_tokens": turn.input_tokens + turn.output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def openai_stream(turn: TurnOut, scenario: Scenario, ctx: StreamContext) -> list[str]:
    """The data payloads of a Chat Completions stream (OpenAI, or Groq with x_groq), ending with [DONE]."""
    created = int(time.time())
    groq = ctx.flavour == "groq"

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        payload: dict[str, Any] = {
            "id": ctx.completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": ctx.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if ctx.include_usage:
            payload["usage"] = None
        payload.update(extra)
        return dumps(payload)

    first_extra: dict[str, Any] = {"x_groq": {"id": ctx.groq_id}} if groq else {}
    events = [chunk({"role": "assistant", "content": ""}, **first_extra)]
    events += [chunk({"content": piece}) for piece in pieces(turn.text, int(scenario.shape("text_chunk_chars", 4)))]
    args_size = int(scenario.shape("args_chunk_chars", 12))
    for k, call in enumerate(turn.calls):
        start = {"index": k, "id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        events.append(chunk({"tool_calls": [start]}))
        for piece in pieces(call.arguments, args_size):
            events.append(chunk({"tool_calls": [{"index": k, "function": {"arguments": piece}}]}))
    usage = openai_usage(turn)
    final_extra: dict[str, Any] = {}
    if groq:
        timings = {"queue_time": 0.001, "prompt_time": 0.002, "completion_time": 0.003, "total_time": 0.006}
        final_extra["x_groq"] = {"id": ctx.groq_id, "usage": {**usage, **timings}}
    events.append(chunk({}, _OPENAI_FINISH[turn.stop], **final_extra))
    if ctx.include_usage:
        events.append(
            dumps(
                {
                    "id": ctx.completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": ctx.model,
                    "choices": [],
                    "usage": usage,
                }
            )
        )
    events.append("[DONE]")
    return [f"data: {e}\n\n" for e in events]


def anthropic_event(kind: str, payload: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {dumps({'type': kind, **payload})}\n\n"


def anthropic_stream(turn: TurnOut, scenario: Scenario, ctx: StreamContext) -> list[str]:
    usage: dict[str, Any] = {"input_tokens": turn.input_tokens, "output_tokens": 1}
    if scenario.shape("include_cache_fields", False):
        usage.update(cache_creation_input_tokens=0, cache_read_input_tokens=0)
    message: dict[str, Any] = {
        "id": ctx.completion_id,
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": ctx.model,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    events = [anthropic_event("message_start", {"message": message})]
    pinged = False
    index = 0

    def ping_once() -> None:
        nonlocal pinged
        if not pinged:
            events.append(anthropic_event("ping", {}))
            pinged = True

    if turn.text:
        events.append(
            anthropic_event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        )
        ping_once()
        for piece in pieces(turn.text, int(scenario.shape("text_chunk_chars", 4))):
            delta = {"type": "text_delta", "text": piece}
            events.append(anthropic_event("content_block_delta", {"index": 0, "delta": delta}))
        events.append(anthropic_event("content_block_stop", {"index": 0}))
        index = 1
    args_size = int(scenario.shape("args_chunk_chars", 12))
    for call in turn.calls:
        block = {"type": "tool_use", "id": call.call_id, "name": call.name, "input": {}}
        events.append(anthropic_event("content_block_start", {"index": index, "content_block": block}))
        ping_once()
        for piece in ["", *pieces(call.arguments, args_size)]:
            delta = {"type": "input_json_delta", "partial_json": piece}
            events.append(anthropic_event("content_block_delta", {"index": index, "delta": delta}))
        events.append(anthropic_event("content_block_stop", {"index": index}))
        index += 1
    ping_once()
    stop: dict[str, Any] = {"stop_reason": _ANTHROPIC_STOP[turn.stop], "stop_sequence": None}
    events.append(anthropic_event("message_delta", {"delta": stop, "usage": {"output_tokens": turn.output_tokens}}))
    events.append(anthropic_event("message_stop", {}))
    return events


def render_stream(turn: TurnOut, scenario: Scenario, ctx: StreamContext) -> list[str]:
    if ctx.flavour == "anthropic":
        return anthropic_stream(turn, scenario, ctx)
    return openai_stream(turn, scenario, ctx)


def render_json(turn: TurnOut, ctx: StreamContext) -> dict[str, Any]:
    """The same turn as one non-streaming object (``stream: false``)."""
    if ctx.flavour == "anthropic":
        content: list[dict[str, Any]] = [{"type": "text", "text": turn.text}] if turn.text else []
        for call in turn.calls:
            try:
                arguments = json.loads(call.arguments)
            except ValueError:
                arguments = {}
            content.append({"type": "tool_use", "id": call.call_id, "name": call.name, "input": arguments})
        return {
            "id": ctx.completion_id,
            "type": "message",
            "role": "assistant",
            "model": ctx.model,
            "content": content,
            "stop_reason": _ANTHROPIC_STOP[turn.stop],
            "stop_sequence": None,
            "usage": {"input_tokens": turn.input_tokens, "output_tokens": turn.output_tokens},
        }
    message: dict[str, Any] = {"role": "assistant", "content": turn.text or None, "refusal": None}
    if turn.calls:
        message["tool_calls"] = [
            {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in turn.calls
        ]
    body: dict[str, Any] = {
        "id": ctx.completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": ctx.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _OPENAI_FINISH[turn.stop]}],
        "usage": openai_usage(turn),
    }
    if ctx.flavour == "groq":
        body["x_groq"] = {"id": ctx.groq_id}
    return body


# --- Errors -------------------------------------------------------------------------------------------------------

# preset -> (OpenAI/Groq type, code, message, Anthropic type, Anthropic message)
_PRESETS: dict[str, tuple[str, str | None, str, str, str]] = {
    "auth": (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: {masked}. You can find your API key at https://platform.openai.com/account/api-keys.",
        "authentication_error",
        "invalid x-api-key",
    ),
    "scope": (
        "invalid_request_error",
        None,
        "You have insufficient permissions for this operation. Missing scopes: api.model.read. Check that you have "
        "the correct role in your organization (Reader, Writer, Owner) and project (Member, Owner), and if you're "
        "using a restricted API key, that it has the necessary scopes.",
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    "permission": (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    "not_found": (
        "invalid_request_error",
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
        "not_found_error",
        "model: {model}",
    ),
    "bad_request": ("invalid_request_error", None, "Invalid request.", "invalid_request_error", "Invalid request."),
    "rate_limit": (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests. Please try again later.",
        "rate_limit_error",
        "Number of request tokens has exceeded your per-minute rate limit.",
    ),
    "quota": (
        "insufficient_quota",
        "insufficient_quota",
        "You exceeded your current quota, please check your plan and billing details.",
        "rate_limit_error",
        "You have reached your specified workspace API usage limits.",
    ),
    "server": (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
        "api_error",
        "Internal server error",
    ),
    "overloaded": ("server_error", None, "Overloaded", "overloaded_error", "Overloaded"),
    "capacity": (
        "service_unavailable",
        "capacity_exceeded",
        "Flex tier capacity exceeded. This model is currently at capacity, please try again later.",
        "overloaded_error",
        "Overloaded",
    ),
    "tool_use_failed": (
        "invalid_request_error",
        "tool_use_failed",
        "Failed to call a function. Please adjust your prompt. See 'failed_generation' for more details.",
        "invalid_request_error",
        "Failed to call a function.",
    ),
}

_STATUS_PRESETS = {
    400: "bad_request",
    401: "auth",
    403: "permission",
    404: "not_found",
    429: "rate_limit",
    498: "capacity",
}


def preset_for_status(status: int) -> str:
    if status in _STATUS_PRESETS:
        return _STATUS_PRESETS[status]
    if status == 529:
        return "overloaded"
    return "server" if status >= 500 else "bad_request"


def error_body(
    flavour: str,
    preset: str,
    *,
    request_id: str,
    masked_key: str = "",
    model: str = "",
    message: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    oa_type, code, oa_message, an_type, an_message = _PRESETS[preset]
    if flavour == "anthropic":
        error: dict[str, Any] = {"type": an_type, "message": (message or an_message).format(model=model)}
        if preset == "quota":
            error["details"] = {"error_code": "enforced_spend_limit_reached"}
        return {"type": "error", "error": error, "request_id": request_id}
    text = message or oa_message.format(masked=masked_key or "<empty>", model=model)
    body: dict[str, Any] = {"message": text, "type": oa_type, "param": param, "code": code}
    if flavour == "groq":
        body.pop("param")
    return {"error": body}


def midstream_error_event(flavour: str, preset: str, *, request_id: str) -> str:
    """An error inside a 200 stream, as each provider sends it (§3.6 ``midstream_error``)."""
    if flavour == "anthropic":
        body = error_body("anthropic", preset, request_id=request_id)
        return f"event: error\ndata: {dumps({'type': 'error', 'error': body['error']})}\n\n"
    body = error_body(flavour, preset, request_id=request_id)
    if flavour == "groq" and preset == "tool_use_failed":
        body["error"]["failed_generation"] = '<function=write_file{"path": "main.py"'
        body["error"]["status_code"] = 400
        return f"event: error\ndata: {dumps(body)}\n\n"
    return f"data: {dumps(body)}\n\n"


def ping_event(flavour: str) -> str:
    # Anthropic sends ping events; OpenAI and Groq have no keep-alive event, so a comment line stands in.
    return anthropic_event("ping", {}) if flavour == "anthropic" else ": ping\n\n"
