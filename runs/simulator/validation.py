"""Request checks that mirror the real APIs' first failures (providers.md §3.3), in the same order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ANTHROPIC_VERSIONS = ("2023-06-01", "2026-10-21")
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass
class Invalid:
    """A validation failure: HTTP status, error preset and message (the flavour decides the body shape)."""

    status: int
    preset: str
    message: str | None = None
    param: str | None = None


def api_key(flavour: str, headers: dict[str, str]) -> str:
    """The key the client sent: Bearer for OpenAI/Groq; x-api-key or Bearer (SDK 2.x) for Anthropic."""
    authorization = headers.get("authorization", "")
    bearer = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    if flavour == "anthropic":
        return headers.get("x-api-key", "").strip() or bearer
    return bearer


def check_auth(key: str) -> Invalid | None:
    if not key or key == "fake-invalid" or key.startswith("fake-401"):
        return Invalid(401, "auth")
    return None


def check_anthropic_version(headers: dict[str, str]) -> Invalid | None:
    version = headers.get("anthropic-version")
    if not version:
        return Invalid(400, "bad_request", "anthropic-version: header is required")
    if version not in ANTHROPIC_VERSIONS:
        return Invalid(400, "bad_request", f"anthropic-version: invalid version {version[:40]!r}")
    return None


def _openai_tool_order(messages: list[Any]) -> Invalid | None:
    pending: dict[str, int] = {}  # unanswered tool_call ids -> index of the assistant message
    announced: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in announced:
                return Invalid(
                    400,
                    "bad_request",
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with "
                    "'tool_calls'.",
                    f"messages.[{i}].role",
                )
            pending.pop(call_id, None)
            continue
        if pending:
            return _missing_responses(pending, i)
        announced = set()
        if role == "assistant":
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    pending[call["id"]] = i
                    announced.add(call["id"])
    if pending:
        return _missing_responses(pending, len(messages))
    return None


def _missing_responses(pending: dict[str, int], index: int) -> Invalid:
    return Invalid(
        400,
        "bad_request",
        "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
        f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(pending)}",
        f"messages.[{index}].role",
    )


def check_openai_body(body: Any) -> Invalid | None:
    if not isinstance(body, dict):
        return Invalid(400, "bad_request", "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return Invalid(400, "bad_request", "you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return Invalid(400, "bad_request", "[] is too short - 'messages'", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in OPENAI_ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            return Invalid(
                400,
                "bad_request",
                f"Invalid value: {role!r}. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', "
                "and 'developer'.",
                f"messages[{i}].role",
            )
    if "stream_options" in body and body.get("stream") is not True:
        return Invalid(
            400,
            "bad_request",
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return Invalid(400, "bad_request", f"Invalid '{key}': integer below minimum value.", key)
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            return Invalid(400, "bad_request", "Invalid type for 'tools': expected an array.", "tools")
        for k, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function":
                return Invalid(400, "bad_request", f"Invalid value for 'tools[{k}].type'.", f"tools[{k}].type")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
                return Invalid(400, "bad_request", f"Missing required parameter: 'tools[{k}].function.name'.")
            if "parameters" in function and not isinstance(function["parameters"], dict):
                return Invalid(
                    400,
                    "bad_request",
                    f"Invalid type for 'tools[{k}].function.parameters': expected an object.",
                    f"tools[{k}].function.parameters",
                )
    return _openai_tool_order(messages)


def _blocks(content: Any) -> list[dict[str, Any]]:
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def check_anthropic_body(body: Any, version: str) -> Invalid | None:
    if not isinstance(body, dict):
        return Invalid(400, "bad_request", "The request body must be a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return Invalid(400, "bad_request", "model: Field required")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        return Invalid(400, "bad_request", "max_tokens: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return Invalid(400, "bad_request", "max_tokens: Input should be greater than or equal to 1")
    if version == "2026-10-21":
        for key in ("temperature", "top_p", "top_k"):
            if key in body:
                return Invalid(400, "bad_request", f"{key}: Extra inputs are not permitted")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return Invalid(400, "bad_request", "messages: at least one message is required")
    previous_role = None
    previous_tool_ids: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "system":
            return Invalid(
                400,
                "bad_request",
                'messages: Unexpected role "system". The Messages API accepts a top-level `system` parameter, '
                'not "system" as an input message role.',
            )
        if role not in ("user", "assistant"):
            return Invalid(400, "bad_request", f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if i == 0 and role != "user":
            return Invalid(400, "bad_request", 'messages: first message must use the "user" role')
        if role == previous_role:
            return Invalid(
                400,
                "bad_request",
                f'messages: roles must alternate between "user" and "assistant", but found multiple "{role}" roles '
                "in a row",
            )
        blocks = _blocks(message.get("content"))
        result_ids = [str(b.get("tool_use_id")) for b in blocks if b.get("type") == "tool_result"]
        if previous_tool_ids:
            missing = sorted(previous_tool_ids - set(result_ids))
            if missing:
                return Invalid(
                    400,
                    "bad_request",
                    f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block in "
                    "the next message.",
                )
        for j, result_id in enumerate(result_ids):
            if result_id not in previous_tool_ids:
                return Invalid(
                    400,
                    "bad_request",
                    f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {result_id}. "
                    "Each `tool_result` block must have a corresponding `tool_use` block in the previous message.",
                )
        previous_tool_ids = (
            {str(b.get("id")) for b in blocks if b.get("type") == "tool_use"} if role == "assistant" else set()
        )
        previous_role = role
    if previous_tool_ids:
        return Invalid(
            400,
            "bad_request",
            f"messages.{len(messages)}: `tool_use` ids were found without `tool_result` blocks immediately after: "
            f"{', '.join(sorted(previous_tool_ids))}. Each `tool_use` block must have a corresponding `tool_result` "
            "block in the next message.",
        )
    return None
