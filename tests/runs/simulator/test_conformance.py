"""The official SDKs as the oracle: if openai and anthropic accept the simulator's streams and errors, the simulator
has not drifted from the real wire formats (providers.md §3.8). Re-run when the SDKs are bumped."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import openai
import pytest

from tests.runs.conftest import FAKE_KEY

pytestmark = pytest.mark.conformance

TOOLS_OPENAI: Any = [
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Write a file.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                "required": ["path", "content"],
            },
        },
    }
]
TOOLS_ANTHROPIC: Any = [
    {"name": t["function"]["name"], "description": "Write a file.", "input_schema": t["function"]["parameters"]}
    for t in TOOLS_OPENAI
]
# Any: the SDKs type messages as TypedDicts; these literals are exactly those shapes.
HELLO: Any = [{"role": "user", "content": "hello"}]


def _openai(simulator, flavour="openai", **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=simulator.base_urls[flavour], api_key=FAKE_KEY, **{"max_retries": 0, **options})


def _anthropic(simulator, **options) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=simulator.base_urls["anthropic"], api_key=FAKE_KEY, **{"max_retries": 0, **options}
    )


@pytest.mark.parametrize("flavour", ["openai", "groq"])
def test_openai_sdk_reassembles_streamed_text_and_reads_usage(simulator, flavour):
    stream = _openai(simulator, flavour).chat.completions.create(
        model="fake/split_utf8", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Café naïve résumé — ☕ 😀 ✓ 日本語 fin."
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == -(-len(text) // 4)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_openai_sdk_reassembles_parallel_tool_calls(simulator):
    with _openai(simulator).chat.completions.stream(
        model="fake/parallel_tools", messages=HELLO, tools=TOOLS_OPENAI, stream_options={"include_usage": True}
    ) as stream:
        completion = stream.get_final_completion()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None
    assert [c.function.name for c in calls] == ["write_file", "write_file"]
    assert calls[0].function.arguments == '{"path":"app.py","content":"def add(a, b):\\n    return a + b\\n"}'
    assert calls[1].id == "call_parallel_tools_0_1"
    usage = completion.usage
    assert usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_anthropic_sdk_reassembles_text_tool_use_and_usage(simulator):
    with _anthropic(simulator).messages.stream(
        model="fake/tool_write", max_tokens=100, messages=HELLO, tools=TOOLS_ANTHROPIC
    ) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    text, tool = message.content
    assert isinstance(text, anthropic.types.TextBlock)
    assert text.text == "I'll create the file."
    assert isinstance(tool, anthropic.types.ToolUseBlock)
    assert (tool.id, tool.name) == ("toolu_tool_write_0_0", "write_file")
    assert tool.input == {"path": "main.py", "content": "print(1)\n"}
    assert message.usage.output_tokens == 16
    assert message.usage.input_tokens > 0


def test_anthropic_sdk_non_streaming_message(simulator):
    message = _anthropic(simulator).messages.create(model="fake/echo", max_tokens=100, messages=HELLO)
    assert isinstance(message.content[0], anthropic.types.TextBlock)
    assert message.content[0].text == "You asked: hello"
    assert message.stop_reason == "end_turn"


@pytest.mark.parametrize(
    ("scenario", "error_class"),
    [
        ("401", openai.AuthenticationError),
        ("429", openai.RateLimitError),
        ("500", openai.InternalServerError),
        ("529", openai.InternalServerError),
    ],
)
def test_openai_sdk_raises_the_right_error_classes(simulator, scenario, error_class):
    with pytest.raises(error_class) as caught:
        _openai(simulator).chat.completions.create(model=f"fake/{scenario}", messages=HELLO)
    assert caught.value.request_id.startswith("req_fake_")


@pytest.mark.parametrize(
    ("scenario", "error_class"),
    [
        ("401", anthropic.AuthenticationError),
        ("429", anthropic.RateLimitError),
        ("500", anthropic.InternalServerError),
        ("529", anthropic.OverloadedError),
    ],
)
def test_anthropic_sdk_raises_the_right_error_classes(simulator, scenario, error_class):
    with pytest.raises(error_class):
        _anthropic(simulator).messages.create(model=f"fake/{scenario}", max_tokens=10, messages=HELLO)


def test_openai_sdk_honours_retry_after(simulator):
    simulator.enqueue("openai", {"base": "429", "fault": {"retry_after_s": 0.2}}, "echo")
    started = time.monotonic()
    completion = _openai(simulator, max_retries=1).chat.completions.create(model="m", messages=HELLO)
    assert completion.choices[0].message.content == "You asked: hello"
    assert time.monotonic() - started >= 0.18  # waited (about) the 0.2 s it was told, not its own backoff
    assert [r["status"] for r in simulator.requests()] == [429, 200]


def test_anthropic_sdk_honours_retry_after(simulator):
    simulator.enqueue("anthropic", {"base": "429", "fault": {"retry_after_s": 0.2}}, "echo")
    started = time.monotonic()
    message = _anthropic(simulator, max_retries=1).messages.create(model="m", max_tokens=10, messages=HELLO)
    assert isinstance(message.content[0], anthropic.types.TextBlock)
    assert message.content[0].text == "You asked: hello"
    assert time.monotonic() - started >= 0.18
    assert [r["status"] for r in simulator.requests()] == [429, 200]


@pytest.mark.parametrize("scenario", ["midstream_error", "midstream_tool_use_failed"])
@pytest.mark.parametrize("flavour", ["openai", "groq"])
def test_openai_sdk_raises_on_a_midstream_error(simulator, flavour, scenario):
    stream = _openai(simulator, flavour).chat.completions.create(model=f"fake/{scenario}", messages=HELLO, stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_anthropic_sdk_raises_on_a_midstream_error(simulator):
    stream = _anthropic(simulator).messages.create(
        model="fake/midstream_error", max_tokens=10, messages=HELLO, stream=True
    )
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        for _ in stream:
            pass


def test_sdks_accept_a_truncated_stream_silently(simulator):
    # Why our adapters track the terminal event themselves (providers.md §1.8): the SDKs do not notice.
    chunks = list(_openai(simulator).chat.completions.create(model="fake/truncate", messages=HELLO, stream=True))
    assert chunks
    assert all(c.choices[0].finish_reason is None for c in chunks)


def test_sdks_report_an_aborted_stream_as_a_connection_error(simulator):
    stream = _openai(simulator).chat.completions.create(model="fake/disconnect", messages=HELLO, stream=True)
    with pytest.raises(openai.APIConnectionError):
        for _ in stream:
            pass
