"""Error classification (providers.md §1.6) and dialect-parser edge cases the simulator does not produce."""

from __future__ import annotations

import email.utils
import json
import secrets
from typing import Any

import pytest

from runs.providers.anthropic import AnthropicStreamParser, anthropic_messages
from runs.providers.base import ChatRequest, Message, ToolCall
from runs.providers.errors import classify_http_error, classify_stream_error, parse_retry_after, scrub
from runs.providers.events import (
    ErrorKind,
    Ping,
    ProviderError,
    StopReason,
    TextDelta,
    ToolCallEnd,
    ToolCallStart,
    TurnEnd,
    Usage,
)
from runs.providers.openai import OpenAIStreamParser
from runs.providers.sse import SSEEvent


def _openai(error: dict[str, Any]) -> bytes:
    return json.dumps({"error": error}).encode()


def _anthropic(error: dict[str, Any]) -> bytes:
    return json.dumps({"type": "error", "error": error, "request_id": "req_body"}).encode()


@pytest.mark.parametrize(
    ("status", "body", "kind", "retryable"),
    [
        (400, _openai({"type": "invalid_request_error", "code": None, "message": "bad"}), ErrorKind.BAD_REQUEST, False),
        (400, _openai({"type": "invalid_request_error", "code": "tool_use_failed"}), ErrorKind.MODEL_TOOL_ERROR, False),
        (
            400,
            _openai({"type": "invalid_request_error", "code": "context_length_exceeded"}),
            ErrorKind.TOO_LARGE,
            False,
        ),
        (401, _openai({"code": "invalid_api_key", "message": "Incorrect API key provided"}), ErrorKind.AUTH, False),
        (401, _openai({"code": None, "message": "Missing scopes: model.request"}), ErrorKind.PERMISSION, False),
        (401, _anthropic({"type": "authentication_error", "message": "invalid x-api-key"}), ErrorKind.AUTH, False),
        (402, _anthropic({"type": "billing_error", "message": "credit"}), ErrorKind.BILLING_QUOTA, False),
        (403, _anthropic({"type": "permission_error", "message": "no"}), ErrorKind.PERMISSION, False),
        (404, _openai({"code": "model_not_found", "message": "nope"}), ErrorKind.NOT_FOUND, False),
        (408, b"", ErrorKind.TIMEOUT, True),
        (409, b"", ErrorKind.SERVER, True),
        (413, _anthropic({"type": "request_too_large", "message": "big"}), ErrorKind.TOO_LARGE, False),
        (422, b"{}", ErrorKind.BAD_REQUEST, False),
        (429, _openai({"type": "requests", "code": "rate_limit_exceeded"}), ErrorKind.RATE_LIMIT, True),
        (429, _openai({"type": "insufficient_quota", "code": "insufficient_quota"}), ErrorKind.BILLING_QUOTA, False),
        (
            429,
            _anthropic({"type": "rate_limit_error", "details": {"error_code": "enforced_spend_limit_reached"}}),
            ErrorKind.BILLING_QUOTA,
            False,
        ),
        (498, b"", ErrorKind.OVERLOADED, True),
        (500, _anthropic({"type": "api_error", "message": "x"}), ErrorKind.SERVER, True),
        (500, _anthropic({"type": "overloaded_error", "message": "x"}), ErrorKind.OVERLOADED, True),
        (502, b"<html>bad gateway</html>", ErrorKind.SERVER, True),
        (503, b"", ErrorKind.SERVER, True),
        (504, _anthropic({"type": "timeout_error", "message": "x"}), ErrorKind.SERVER, True),
        (529, _anthropic({"type": "overloaded_error", "message": "Overloaded"}), ErrorKind.OVERLOADED, True),
    ],
)
def test_http_status_classification(status, body, kind, retryable):
    error = classify_http_error(status, {}, body)
    assert (error.kind, error.retryable, error.status) == (kind, retryable, status)
    assert "<html>" not in error.message


@pytest.mark.parametrize(("header", "status", "retryable"), [("true", 400, True), ("false", 503, False)])
def test_x_should_retry_overrides_the_status(header, status, retryable):
    assert classify_http_error(status, {"x-should-retry": header}, b"").retryable is retryable


def test_request_id_from_header_or_anthropic_body():
    assert classify_http_error(500, {"x-request-id": "req_h"}, b"").request_id == "req_h"
    assert classify_http_error(500, {"request-id": "req_a"}, b"").request_id == "req_a"
    assert classify_http_error(500, {}, _anthropic({"type": "api_error"})).request_id == "req_body"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # milliseconds win, as in the SDKs
        ({"retry-after-ms": "junk", "retry-after": "3"}, 3.0),
        ({"retry-after": "0"}, None),
        ({"retry-after": "-4"}, None),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_parsing(headers, expected):
    assert parse_retry_after(headers) == expected


def test_retry_after_as_an_http_date():
    now = 1_800_000_000.0
    header = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": header}, now=now) == pytest.approx(30, abs=1)


def test_messages_are_scrubbed_of_the_key_and_capped():
    secret = "sk-proj-" + secrets.token_urlsafe(18)
    body = _openai({"message": f"Incorrect API key provided: {secret}. " + "x" * 2000, "code": "invalid_api_key"})
    error = classify_http_error(401, {}, body, secret=secret)
    assert secret not in error.message
    assert len(error.message) <= 500
    assert "gsk_" not in scrub("leaked gsk_ABCDEFGH12345678 here")


def test_in_stream_errors_by_provider():
    groq = {"error": {"type": "invalid_request_error", "code": "tool_use_failed", "status_code": 400}}
    assert classify_stream_error(groq).kind is ErrorKind.MODEL_TOOL_ERROR
    assert classify_stream_error({"error": {"type": "server_error"}}).retryable is True
    anthropic = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert classify_stream_error(anthropic).kind is ErrorKind.OVERLOADED
    assert classify_stream_error({"error": "something"}).kind is ErrorKind.SERVER


# --- OpenAI / Groq parser -----------------------------------------------------------------------------------------


def _chunk(delta=None, finish=None, **extra) -> SSEEvent:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return SSEEvent(event="message", data=json.dumps({"choices": choices, **extra}))


_DONE = SSEEvent(event="message", data="[DONE]")


def _feed(parser, *events):
    out = []
    for event in events:
        out += parser.on_event(event)
    return out


def test_new_id_at_a_reused_index_starts_a_new_call():
    # Some OpenAI-compatible servers send every parallel call at index 0, told apart only by the id.
    out = _feed(
        OpenAIStreamParser(),
        _chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "one", "arguments": "{}"}}]}),
        _chunk({"tool_calls": [{"index": 0, "id": "b", "function": {"name": "two", "arguments": "{"}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}),
        _chunk({}, "tool_calls"),
        _DONE,
    )
    starts = [e for e in out if isinstance(e, ToolCallStart)]
    ends = [e for e in out if isinstance(e, ToolCallEnd)]
    assert [(s.call_id, s.name, s.position) for s in starts] == [("a", "one", 0), ("b", "two", 1)]
    assert [(e.position, e.arguments_json) for e in ends] == [(0, "{}"), (1, "{}")]


def test_groq_usage_is_the_last_non_null_report_never_a_sum():
    usage = {"prompt_tokens": 7, "completion_tokens": 3}
    out = _feed(
        OpenAIStreamParser(),
        _chunk({"content": "hi"}, usage=None, x_groq={"id": "req_1"}),
        _chunk({}, "stop", usage=None, x_groq={"id": "req_1", "usage": usage}),
        _chunk(None, usage=usage),
        _DONE,
    )
    assert out[-2:] == [
        Usage(input_tokens=7, output_tokens=3, complete=True),
        TurnEnd(stop=StopReason.END, raw_reason="stop"),
    ]


def test_done_without_a_finish_reason_is_incomplete():
    out = _feed(OpenAIStreamParser(), _chunk({"content": "hi"}), _DONE)
    assert isinstance(out[-1], ProviderError)
    assert out[-1].kind is ErrorKind.INCOMPLETE


def test_stream_without_usage_reports_unknown_usage():
    out = _feed(OpenAIStreamParser(), _chunk({"content": "hi"}, "content_filter"), _DONE)
    assert out[-2:] == [
        Usage(input_tokens=None, output_tokens=None, complete=False),
        TurnEnd(stop=StopReason.CONTENT_FILTER, raw_reason="content_filter"),
    ]


def test_unknown_fields_and_other_choices_are_ignored():
    noise = SSEEvent(event="message", data=json.dumps({"obfuscation": "xyz", "choices": [{"index": 1, "delta": {}}]}))
    out = _feed(OpenAIStreamParser(), noise, _chunk({"content": "a"}, "stop"), _DONE)
    assert out[0] == TextDelta("a")


def test_unreadable_chunk_is_a_protocol_error():
    parser = OpenAIStreamParser()
    out = _feed(parser, SSEEvent(event="message", data="{not json"))
    assert out[-1].kind is ErrorKind.PROTOCOL
    assert parser.is_done()


# --- Anthropic parser ---------------------------------------------------------------------------------------------


def _a(kind: str, **payload) -> SSEEvent:
    return SSEEvent(event=kind, data=json.dumps({"type": kind, **payload}))


def test_anthropic_usage_is_cumulative_and_counts_cache_tokens():
    usage = {"input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 20, "output_tokens": 1}
    out = _feed(
        AnthropicStreamParser(),
        _a("message_start", message={"usage": usage}),
        _a("message_delta", delta={"stop_reason": None}, usage={"output_tokens": 4}),
        _a("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 9}),
        _a("message_stop"),
    )
    assert out == [
        Usage(input_tokens=35, output_tokens=9, cached_input_tokens=20, complete=True),
        TurnEnd(stop=StopReason.END, raw_reason="end_turn"),
    ]


def test_anthropic_input_tokens_are_known_when_the_stream_dies_early():
    parser = AnthropicStreamParser()
    _feed(parser, _a("message_start", message={"usage": {"input_tokens": 12, "output_tokens": 1}}))
    assert parser.partial_usage() == Usage(input_tokens=12, output_tokens=None, complete=False)


def test_anthropic_unknown_events_thinking_and_pings():
    out = _feed(
        AnthropicStreamParser(),
        _a("brand_new_event", anything=1),
        _a("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
        _a("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "hmm"}),
        _a("content_block_stop", index=0),
        _a("ping"),
        _a("content_block_start", index=1, content_block={"type": "tool_use", "id": "t", "name": "ls", "input": {}}),
        _a("content_block_stop", index=1),
    )
    assert out == [
        Ping(),
        ToolCallStart(call_id="t", name="ls", position=0),
        ToolCallEnd(position=0, arguments_json="{}"),
    ]


@pytest.mark.parametrize(
    ("reason", "stop"),
    [("pause_turn", StopReason.OTHER), ("refusal", StopReason.REFUSAL), ("stop_sequence", StopReason.END)],
)
def test_anthropic_stop_reasons(reason, stop):
    out = _feed(AnthropicStreamParser(), _a("message_delta", delta={"stop_reason": reason}), _a("message_stop"))
    assert out[-1] == TurnEnd(stop=stop, raw_reason=reason)


def test_anthropic_messages_group_tool_results_and_keep_alternation():
    request = ChatRequest(
        model="m",
        messages=[
            Message(role="user", content="go"),
            Message(
                role="assistant",
                content="calling",
                tool_calls=(ToolCall("t1", "a", '{"x": 1}'), ToolCall("t2", "b", "{broken")),
            ),
            Message(role="tool", tool_call_id="t1", content="ok"),
            Message(role="tool", tool_call_id="t2", content="bad json", is_error=True),
            Message(role="user", content="and then?"),
        ],
    )
    assert anthropic_messages(request) == [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "calling"},
                {"type": "tool_use", "id": "t1", "name": "a", "input": {"x": 1}},
                {"type": "tool_use", "id": "t2", "name": "b", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "ok"},
                {"type": "tool_result", "tool_use_id": "t2", "content": "bad json", "is_error": True},
                {"type": "text", "text": "and then?"},
            ],
        },
    ]


def test_message_repr_hides_conversation_text():
    assert "secret plan" not in repr(Message(role="user", content="secret plan"))
    assert "secret plan" not in repr(ChatRequest(model="m", messages=[], system="secret plan"))
