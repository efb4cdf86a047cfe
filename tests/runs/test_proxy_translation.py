"""The proxy's translation layer without HTTP: OpenAI requests -> neutral requests, neutral events -> OpenAI chunks,
provider failures -> statuses the SDK understands."""

from __future__ import annotations

import json

import pytest

from runs.providers.events import (
    ErrorKind,
    Ping,
    ProviderError,
    StopReason,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    TurnEnd,
    Usage,
)
from runs.proxy import (
    CallOptions,
    CompletionTranslator,
    ProxyError,
    apply_options,
    error_for_provider,
    max_body_bytes,
    parse_completion_request,
    parse_json_body,
    split_model,
    sse,
    stream_error_frame,
)


def _request(**overrides):
    body = {"model": "team/gpt-x", "messages": [{"role": "user", "content": "hi"}], **overrides}
    return parse_completion_request(body)


# --- Requests -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "label", "name"),
    [("demo-anthropic/fake/echo", "demo-anthropic", "fake/echo"), ("team/gpt-4.1-mini", "team", "gpt-4.1-mini")],
)
def test_model_splits_at_the_first_slash(model, label, name):
    assert split_model(model) == (label, name)


@pytest.mark.parametrize("model", ["gpt-4", "/gpt-4", "team/", " "])
def test_a_model_without_label_and_name_is_not_found(model):
    with pytest.raises(ProxyError) as raised:
        split_model(model)
    assert raised.value.status in (400, 404)
    assert raised.value.param == "model"


def test_conversation_with_tools_becomes_the_neutral_request():
    request = _request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [{"type": "text", "text": "write "}, {"type": "text", "text": "it"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
        ],
        tools=[{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}],
        max_tokens=50,
        max_completion_tokens=60,
        stream=True,
        stream_options={"include_usage": True},
    )
    chat = request.chat
    assert chat.system == "Be brief.\n\nUse tools."
    assert [m.role for m in chat.messages] == ["user", "assistant", "tool"]
    assert chat.messages[0].content == "write it"
    assert chat.messages[1].content is None
    assert chat.messages[1].tool_calls[0].call_id == "call_1"
    assert chat.messages[2].tool_call_id == "call_1"
    assert chat.tools[0].name == "w"
    assert chat.max_tokens == 60  # max_completion_tokens wins over the deprecated max_tokens
    assert (request.stream, request.include_usage) == (True, True)
    assert (request.key_label, request.model, request.requested_model) == ("team", "gpt-x", "team/gpt-x")


def test_repr_of_a_request_shows_no_content():
    request = _request(messages=[{"role": "system", "content": "SECRET-SYSTEM"}, {"role": "user", "content": "SECRET"}])
    assert "SECRET" not in repr(request)
    assert "SECRET" not in repr(request.chat)


def test_options_are_parsed_and_validated():
    request = _request(
        temperature=0,
        top_p=1,
        stop=["a", "b"],
        tools=[{"type": "function", "function": {"name": "w"}}],
        tool_choice="required",
        parallel_tool_calls=False,
        seed=7,  # accepted and ignored
    )
    assert request.options == CallOptions(
        temperature=0.0, top_p=1.0, stop=("a", "b"), tool_choice="required", parallel_tool_calls=False
    )
    assert request.chat.tools[0].parameters == {"type": "object", "properties": {}}


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": True}, "top_p"),
        ({"stop": ["a"] * 5}, "stop"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": {"name": "w"}}, "tools"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "assistant", "function_call": {"name": "f"}}]}, "messages[0].function_call"),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}]}
                ]
            },
            "messages[0].tool_calls[0].function",
        ),
    ],
)
def test_bad_shapes_are_400_naming_the_parameter(overrides, param):
    with pytest.raises(ProxyError) as raised:
        _request(**overrides)
    assert raised.value.status == 400
    assert raised.value.param == param
    assert raised.value.body()["error"]["type"] == "invalid_request_error"


def test_body_parsing_refuses_what_is_not_a_json_object():
    with pytest.raises(ProxyError) as too_big:
        parse_json_body(b" " * (max_body_bytes() + 1))
    assert too_big.value.status == 413
    for raw in (b"\xff\xfe", b"1e999999", b'"text"', b"[" * 50_000):
        with pytest.raises(ProxyError) as raised:
            parse_json_body(raw)
        assert raised.value.status == 400


# --- Provider bodies ----------------------------------------------------------------------------------------------


def test_options_are_written_in_each_dialect():
    options = CallOptions(temperature=0.5, stop=("X",), tool_choice="required", parallel_tool_calls=False)
    openai_body = apply_options({"tools": [{}]}, dialect="openai", options=options)
    assert openai_body == {
        "tools": [{}],
        "temperature": 0.5,
        "stop": ["X"],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    anthropic_body = apply_options({"tools": [{}]}, dialect="anthropic", options=options)
    assert anthropic_body == {
        "tools": [{}],
        "temperature": 0.5,
        "stop_sequences": ["X"],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }
    # Tool choice means nothing without tools; providers refuse it then.
    assert "tool_choice" not in apply_options({}, dialect="openai", options=options)
    assert "tool_choice" not in apply_options({}, dialect="anthropic", options=options)
    none = apply_options({"tools": [{}]}, dialect="anthropic", options=CallOptions(tool_choice="none"))
    assert none["tool_choice"] == {"type": "none"}


# --- Responses ----------------------------------------------------------------------------------------------------


def _translator() -> CompletionTranslator:
    return CompletionTranslator(completion_id="chatcmpl-1", created=1, model="team/m")


def test_tool_call_events_become_indexed_fragments_and_one_message():
    translator = _translator()
    chunks = []
    for event in (
        TextDelta("Let me."),
        ToolCallStart(call_id="toolu_1", name="write", position=0),
        ToolCallArgsDelta(position=0, fragment='{"a"'),
        ToolCallArgsDelta(position=0, fragment=": 1}"),
        ToolCallEnd(position=0, arguments_json='{"a": 1}'),
        ToolCallStart(call_id="toolu_2", name="finish", position=1),
        ToolCallEnd(position=1, arguments_json="{}"),  # Anthropic: a tool without arguments streams no JSON
        Ping(),
        Usage(input_tokens=10, output_tokens=5, cached_input_tokens=2),
        TurnEnd(stop=StopReason.TOOL_USE, raw_reason="tool_use"),
    ):
        chunks.extend(translator.feed(event))

    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"content": "Let me."}
    assert deltas[1]["tool_calls"] == [
        {"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "write", "arguments": ""}}
    ]
    assert deltas[2]["tool_calls"] == [{"index": 0, "function": {"arguments": '{"a"'}}]
    assert deltas[5]["tool_calls"] == [{"index": 1, "function": {"arguments": "{}"}}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert {c["id"] for c in chunks} == {"chatcmpl-1"}

    completion = translator.completion()
    message = completion["choices"][0]["message"]
    assert message["content"] == "Let me."
    assert [(c["id"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("toolu_1", '{"a": 1}'),
        ("toolu_2", "{}"),
    ]
    assert completion["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 2},
    }


def test_a_streamed_answer_goes_out_chunk_by_chunk_and_is_not_kept():
    canary = "CANARY-streamed-answer-7f3e"
    events = (
        TextDelta(canary),
        ToolCallStart(call_id="toolu_1", name="write", position=0),
        ToolCallArgsDelta(position=0, fragment='{"path": "'),
        ToolCallEnd(position=0, arguments_json=f'{{"path": "{canary}"}}'),  # the end completes the arguments
        TurnEnd(stop=StopReason.TOOL_USE, raw_reason="tool_use"),
    )
    kept, streamed = (
        _translator(),
        CompletionTranslator(completion_id="chatcmpl-1", created=1, model="team/m", streaming=True),
    )
    kept_chunks = [chunk for event in events for chunk in kept.feed(event)]
    streamed_chunks = [chunk for event in events for chunk in streamed.feed(event)]

    assert streamed_chunks == kept_chunks  # the client gets the same frames
    assert streamed_chunks[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] == f'{canary}"}}'
    assert canary in repr(vars(kept))  # the non-streaming answer is held until it is sent whole...
    assert canary not in repr(vars(streamed)) + repr([vars(call) for call in vars(streamed)["_calls"]])
    with pytest.raises(RuntimeError, match="not kept"):
        streamed.completion()
    assert streamed.finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("stop", "reason"),
    [
        (StopReason.END, "stop"),
        (StopReason.MAX_TOKENS, "length"),
        (StopReason.CONTENT_FILTER, "content_filter"),
        (StopReason.REFUSAL, "content_filter"),
        (StopReason.OTHER, "stop"),
    ],
)
def test_stop_reasons_map_to_openai_finish_reasons(stop, reason):
    translator = _translator()
    (chunk,) = translator.feed(TurnEnd(stop=stop, raw_reason=None))
    assert chunk["choices"][0]["finish_reason"] == reason
    assert chunk["choices"][0]["delta"] == {}


def test_usage_of_every_attempt_is_added_up_and_unknown_counts_are_skipped():
    translator = _translator()
    translator.feed(Usage(input_tokens=None, output_tokens=None, complete=False))
    translator.feed(Usage(input_tokens=7, output_tokens=None, complete=False))
    translator.feed(Usage(input_tokens=7, output_tokens=3))
    assert translator.usage_chunk()["usage"] == {"prompt_tokens": 14, "completion_tokens": 3, "total_tokens": 17}
    assert translator.usage_chunk()["choices"] == []


def test_frames_are_single_data_lines():
    frame = sse({"text": "line\nbreak", "é": "☕"})
    assert frame.startswith(b"data: ")
    assert frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 2  # newlines inside strings are escaped by JSON
    assert json.loads(frame[6:]) == {"text": "line\nbreak", "é": "☕"}


# --- Errors -------------------------------------------------------------------------------------------------------


def _error(kind: ErrorKind, **extra) -> ProviderError:
    return ProviderError(kind=kind, retryable=False, message="provider says no", **extra)


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [
        (_error(ErrorKind.AUTH, status=401), 401, "authentication_error"),
        (_error(ErrorKind.PERMISSION, status=403), 403, "permission_error"),
        (_error(ErrorKind.RATE_LIMIT, status=429, retry_after_s=1.5), 429, "rate_limit_error"),
        (_error(ErrorKind.BILLING_QUOTA, status=429), 429, "insufficient_quota"),
        (_error(ErrorKind.OVERLOADED, status=529), 503, "overloaded_error"),
        (_error(ErrorKind.SERVER, status=502), 502, "server_error"),
        (_error(ErrorKind.SERVER), 502, "server_error"),
        (_error(ErrorKind.TIMEOUT), 504, "timeout_error"),
        (_error(ErrorKind.DEADLINE), 504, "timeout_error"),
        (_error(ErrorKind.NETWORK), 502, "upstream_error"),
        (_error(ErrorKind.BLOCKED), 502, "upstream_error"),
        (_error(ErrorKind.NOT_FOUND, status=404), 404, "invalid_request_error"),
        (_error(ErrorKind.TOO_LARGE, status=400), 400, "invalid_request_error"),
        (_error(ErrorKind.BAD_REQUEST, status=400), 400, "invalid_request_error"),
        (_error(ErrorKind.MODEL_TOOL_ERROR, status=400, code="tool_use_failed"), 400, "invalid_request_error"),
    ],
)
def test_provider_errors_map_to_statuses_the_sdk_understands(error, status, error_type):
    mapped = error_for_provider(error, key_label="team")
    assert mapped.status == status
    assert mapped.body()["error"]["type"] == error_type


def test_rate_limits_forward_retry_after_and_retried_failures_say_do_not_retry():
    limited = error_for_provider(_error(ErrorKind.RATE_LIMIT, retry_after_s=1.5), key_label="team")
    assert limited.headers["retry-after"] == "2"
    assert limited.headers["retry-after-ms"] == "1500"
    assert "x-should-retry" not in limited.headers
    server = error_for_provider(_error(ErrorKind.SERVER, status=500, request_id="req_9"), key_label="team")
    assert server.headers["x-should-retry"] == "false"
    assert server.headers["x-upstream-request-id"] == "req_9"


def test_a_midstream_error_is_one_error_frame():
    frame = stream_error_frame(_error(ErrorKind.OVERLOADED), key_label="team")
    payload = json.loads(frame.removeprefix(b"data: "))
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["type"] == "overloaded_error"
