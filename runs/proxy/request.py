"""OpenAI Chat Completions request JSON -> the adapters' neutral ``ChatRequest`` plus the call options it does not
carry. Validation failures are ``ProxyError`` 400s in OpenAI's shape; nothing here logs or shows content."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from cesaflow.lib.body_limit import body_limit, too_large_message
from runs.providers.base import ChatRequest, Message, ToolCall, ToolSpec
from runs.proxy.errors import ProxyError
from runs.proxy.errors import bad_request as _bad
from runs.services import MODEL_MAX_CHARS

COMPLETIONS_PATH = "/api/v1/chat/completions"
DEFAULT_MAX_TOKENS = 4096  # the adapters always send a limit (Anthropic requires one)
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_STOP_SEQUENCES = 4
MAX_NAME_CHARS = 128


ToolChoiceMode = Literal["none", "auto", "required", "function"]


@dataclass(frozen=True)
class CallOptions:
    """Request options the neutral ``ChatRequest`` does not carry; applied to the provider body per dialect."""

    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    tool_choice: ToolChoiceMode | None = None
    tool_choice_name: str | None = None  # with tool_choice == "function"
    parallel_tool_calls: bool | None = None


@dataclass(frozen=True)
class CompletionRequest:
    requested_model: str  # as the caller sent it; echoed in every response
    key_label: str
    model: str  # the provider's model name
    chat: ChatRequest
    stream: bool
    include_usage: bool
    options: CallOptions = field(default_factory=CallOptions)

    def __repr__(self) -> str:
        # Messages and tool schemas are customer content: a repr (tracebacks, debug logs) shows only the shape.
        return (
            f"CompletionRequest(model={self.requested_model!r}, messages={len(self.chat.messages)}, "
            f"tools={len(self.chat.tools)}, stream={self.stream})"
        )


def max_body_bytes() -> int:
    """The gateway's body cap: the request-body limit table's entry for its path (``settings.REQUEST_BODY_LIMITS``,
    ``CESAFLOW_GATEWAY_MAX_BODY_BYTES``), the one the server enforces before the body arrives; read at call time.
    Never above Django's FILE_UPLOAD_MAX_MEMORY_SIZE (settings), so an accepted body is never spooled to a file."""
    return body_limit(COMPLETIONS_PATH)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    limit = max_body_bytes()
    if len(raw) > limit:
        raise ProxyError(413, too_large_message(limit), code="request_too_large")
    try:
        body = orjson.loads(raw)
    except (ValueError, RecursionError):
        # orjson's JSONDecodeError (a ValueError) covers bad UTF-8, lone surrogates, bad JSON, integers beyond 64 bits
        # and nesting deeper than 1,024 levels (never a RecursionError; kept for safety).
        raise _bad("We could not parse the JSON body of your request. It must be a JSON object.") from None
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.")
    return body


def split_model(value: Any) -> tuple[str, str]:
    """``"<label>/<model>"`` -> (label, model), split at the FIRST slash: ``demo/fake/echo`` -> (demo, fake/echo)."""
    if not isinstance(value, str) or not value.strip():
        raise _bad("You must provide a model parameter.", "model")
    if "\x00" in value:
        # The label is looked up and the model recorded in PostgreSQL, whose text holds no NUL byte.
        raise _bad("The model parameter must not contain a NUL character.", "model")
    label, slash, model = value.strip().partition("/")
    if len(model.strip()) > MODEL_MAX_CHARS:
        # Refused here, before the provider is called: the run that records the call could not hold the name.
        raise _bad(f"The model name after the label may be at most {MODEL_MAX_CHARS} characters.", "model")
    if not slash or not label or not model:
        raise ProxyError(
            404,
            f"The model {value[:200]!r} does not exist. Use '<provider key label>/<model>', "
            "for example 'team-openai/gpt-4.1-mini'; GET /api/v1/models lists them.",
            param="model",
            code="model_not_found",
        )
    return label, model


def _text_content(content: Any, param: str, *, allow_none: bool) -> str | None:
    """A message's text: a string, null (where allowed), or a list of text parts (joined)."""
    if content is None:
        if allow_none:
            return None
        raise _bad(f"Missing content in '{param}'.", param)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                raise _bad(f"Invalid content part in '{param}[{i}]'.", f"{param}[{i}]")
            kind = part.get("type")
            if kind in ("text", "refusal"):
                text = part.get(kind)
                if not isinstance(text, str):
                    raise _bad(f"Missing '{kind}' in '{param}[{i}]'.", f"{param}[{i}].{kind}")
                texts.append(text)
            else:
                raise _bad(
                    f"Content parts of type {str(kind)[:40]!r} are not supported by this proxy; send text.",
                    f"{param}[{i}].type",
                )
        return "".join(texts)
    raise _bad(f"Invalid type for '{param}': expected a string or an array of text parts.", param)


def _tool_calls(value: Any, param: str) -> tuple[ToolCall, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad(f"Invalid type for '{param}': expected an array.", param)
    calls: list[ToolCall] = []
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(function, dict):
            raise _bad(f"Missing required parameter: '{where}.function'.", where)
        call_id, name, arguments = item.get("id"), function.get("name"), function.get("arguments", "")
        if not isinstance(call_id, str) or not call_id:
            raise _bad(f"Missing required parameter: '{where}.id'.", f"{where}.id")
        if not isinstance(name, str) or not name:
            raise _bad(f"Missing required parameter: '{where}.function.name'.", f"{where}.function.name")
        if not isinstance(arguments, str):
            raise _bad(f"Invalid type for '{where}.function.arguments': expected a string.", f"{where}.function")
        calls.append(ToolCall(call_id=call_id, name=name, arguments_json=arguments))
    return tuple(calls)


def _messages(value: Any) -> tuple[str | None, list[Message]]:
    """(system text, conversation). System and developer messages are hoisted into one system text, in order:
    Anthropic has no system role, and OpenAI reads them the same way."""
    if not isinstance(value, list) or not value:
        raise _bad("'messages' must be a non-empty array.", "messages")
    system: list[str] = []
    messages: list[Message] = []
    for i, raw in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(raw, dict):
            raise _bad(f"Invalid type for '{param}': expected an object.", param)
        role = raw.get("role")
        if role in ("system", "developer"):
            text = _text_content(raw.get("content"), f"{param}.content", allow_none=False)
            system.append(text or "")
        elif role == "user":
            text = _text_content(raw.get("content"), f"{param}.content", allow_none=False)
            messages.append(Message(role="user", content=text))
        elif role == "assistant":
            if raw.get("function_call") is not None:
                raise _bad("'function_call' is deprecated; send 'tool_calls'.", f"{param}.function_call")
            calls = _tool_calls(raw.get("tool_calls"), f"{param}.tool_calls")
            text = _text_content(raw.get("content"), f"{param}.content", allow_none=True)
            if text is None and not calls:
                raise _bad(f"Missing content in '{param}': an assistant message needs content or tool_calls.", param)
            messages.append(Message(role="assistant", content=text or None, tool_calls=calls))
        elif role == "tool":
            call_id = raw.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"Missing required parameter: '{param}.tool_call_id'.", f"{param}.tool_call_id")
            text = _text_content(raw.get("content"), f"{param}.content", allow_none=False)
            messages.append(Message(role="tool", content=text, tool_call_id=call_id))
        else:
            raise _bad(
                f"Invalid value for '{param}.role': {str(role)[:40]!r}. Supported values are: 'system', "
                "'developer', 'user', 'assistant' and 'tool'.",
                f"{param}.role",
            )
    if not messages:
        raise _bad("'messages' must contain at least one user message.", "messages")
    return ("\n\n".join(system) if system else None), messages


def _tools(value: Any) -> tuple[ToolSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad("Invalid type for 'tools': expected an array.", "tools")
    tools: list[ToolSpec] = []
    for i, tool in enumerate(value):
        param = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise _bad(f"Invalid value for '{param}': only function tools are supported.", f"{param}.type")
        name = function.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            raise _bad(f"Missing or invalid '{param}.function.name'.", f"{param}.function.name")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise _bad(f"Invalid type for '{param}.function.description'.", f"{param}.function.description")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise _bad(
                f"Invalid type for '{param}.function.parameters': expected an object.", f"{param}.function.parameters"
            )
        tools.append(ToolSpec(name=name, description=description, parameters=parameters))
    return tuple(tools)


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"Invalid type for '{name}': expected a number.", name)
    if not low <= value <= high:
        raise _bad(f"Invalid '{name}': must be between {low:g} and {high:g}.", name)
    return float(value)


def _max_tokens(body: Mapping[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKENS_LIMIT:
            raise _bad(f"Invalid '{name}': expected an integer of at least 1.", name)
        return int(value)
    return DEFAULT_MAX_TOKENS


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise _bad("Invalid 'stop': expected a string or an array of strings.", "stop")
    if len(items) > MAX_STOP_SEQUENCES:
        raise _bad(f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} sequences.", "stop")
    return tuple(items)


def _tool_choice(value: Any, tools: tuple[ToolSpec, ...]) -> tuple[ToolChoiceMode | None, str | None]:
    if value is None:
        return None, None
    if value in ("none", "auto", "required"):
        return value, None
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            if name not in {t.name for t in tools}:
                raise _bad(f"Invalid 'tool_choice': no tool named {name[:MAX_NAME_CHARS]!r} in 'tools'.", "tool_choice")
            return "function", name
    raise _bad(
        "Invalid 'tool_choice': expected 'none', 'auto', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}.",
        "tool_choice",
    )


def parse_completion_request(body: Mapping[str, Any]) -> CompletionRequest:
    """Validate an OpenAI Chat Completions request; ``ProxyError`` (400, or 404 for a malformed model) otherwise."""
    label, model = split_model(body.get("model"))
    system, messages = _messages(body.get("messages"))
    tools = _tools(body.get("tools"))
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("Invalid type for 'stream': expected a boolean.", "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise _bad("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
        if not isinstance(stream_options, dict):
            raise _bad("Invalid type for 'stream_options': expected an object.", "stream_options")
        flag = stream_options.get("include_usage", False)
        if not isinstance(flag, bool):
            raise _bad("Invalid type for 'stream_options.include_usage'.", "stream_options.include_usage")
        include_usage = flag
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("Only n=1 is supported.", "n")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad("Invalid type for 'parallel_tool_calls': expected a boolean.", "parallel_tool_calls")
    choice, choice_name = _tool_choice(body.get("tool_choice"), tools)
    options = CallOptions(
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        stop=_stop(body.get("stop")),
        tool_choice=choice,
        tool_choice_name=choice_name,
        parallel_tool_calls=parallel,
    )
    chat = ChatRequest(model=model, messages=messages, system=system, tools=tools, max_tokens=_max_tokens(body))
    return CompletionRequest(
        requested_model=body["model"].strip(),
        key_label=label,
        model=model,
        chat=chat,
        stream=stream,
        include_usage=include_usage,
        options=options,
    )
