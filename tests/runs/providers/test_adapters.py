"""Every single-call scenario of providers.md §3.6, through the real adapters, for each dialect."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
from contextlib import aclosing
from dataclasses import replace

import pytest

from runs.providers.base import MAX_READS_PER_MARK, ChatRequest, Message, ToolCall, read_to_end
from runs.providers.events import ErrorKind, ProviderError, ReadEnd, Retry, StopReason, TextDelta, TurnEnd, Usage
from runs.simulator.scenarios import BUILTINS
from tests.runs.conftest import FAKE_KEY
from tests.runs.providers.conftest import ADAPTER_CLASSES, FAST, FLAVOURS, chat, run

pytestmark = pytest.mark.parametrize("flavour", FLAVOURS)

TOOL_PREFIX = {"openai": "call", "groq": "call", "anthropic": "toolu"}


def _text(name: str) -> str:
    return str(BUILTINS[name].turns[0]["text"])


def _auto_tokens(value: object) -> int:
    return math.ceil(len(json.dumps(value)) / 4)


async def test_echo_streams_text_finish_call_and_exact_usage(flavour, make_adapter, simulator):
    outcome = await run(make_adapter(flavour), chat())

    assert outcome.succeeded
    assert outcome.text == "You asked: hello"
    assert [(c.name, c.position) for c in outcome.calls] == [("finish", 0)]
    assert json.loads(outcome.arguments[0]) == {"summary": "Echoed the request."}
    assert outcome.end.stop is StopReason.TOOL_USE
    [usage] = outcome.usages
    sent = simulator.requests()[0]["body"]
    assert usage == Usage(
        input_tokens=_auto_tokens(sent["messages"]),
        output_tokens=math.ceil((len(outcome.text) + len(outcome.arguments[0])) / 4),
        cached_input_tokens=0 if flavour != "anthropic" else None,
        complete=True,
    )


async def test_echo_without_declared_tools_ends_the_turn_plainly(flavour, make_adapter):
    outcome = await run(make_adapter(flavour), chat(tools=False))

    assert outcome.text == "You asked: hello"
    assert outcome.calls == []
    assert outcome.end.stop is StopReason.END


async def test_tool_write_streams_text_then_one_reassembled_call(flavour, make_adapter):
    outcome = await run(make_adapter(flavour), chat("fake/tool_write"))

    assert outcome.text == "I'll create the file."
    [call] = outcome.calls
    assert (call.call_id, call.name, call.position) == (f"{TOOL_PREFIX[flavour]}_tool_write_0_0", "write_file", 0)
    assert outcome.arguments[0] == outcome.streamed_arguments[0] == '{"path":"main.py","content":"print(1)\\n"}'
    assert outcome.end.stop is StopReason.TOOL_USE
    # The text comes before the call, as the model sent it.
    kinds = [type(e).__name__ for e in outcome.events]
    assert kinds.index("TextDelta") < kinds.index("ToolCallStart")


async def test_parallel_tools_are_two_calls_in_order(flavour, make_adapter):
    outcome = await run(make_adapter(flavour), chat("fake/parallel_tools"))

    assert [(c.name, c.position) for c in outcome.calls] == [("write_file", 0), ("write_file", 1)]
    assert len({c.call_id for c in outcome.calls}) == 2
    assert json.loads(outcome.arguments[0])["path"] == "app.py"
    assert json.loads(outcome.arguments[1])["path"] == "test_app.py"
    assert outcome.end.stop is StopReason.TOOL_USE


async def test_bad_tool_args_are_passed_through_raw(flavour, make_adapter):
    outcome = await run(make_adapter(flavour), chat("fake/bad_tool_args"))

    assert outcome.arguments[0] == '{"path": "main.py", "content": '
    assert outcome.end.stop is StopReason.TOOL_USE


async def test_tool_round_trip_history_is_accepted_and_selects_the_next_turn(flavour, make_adapter, simulator):
    adapter = make_adapter(flavour)
    first = await run(adapter, chat("fake/tool_write"))
    [call] = first.calls
    history = [
        Message(role="user", content="hello"),
        Message(
            role="assistant",
            content=first.text,
            tool_calls=(ToolCall(call_id=call.call_id, name=call.name, arguments_json=first.arguments[0]),),
        ),
        Message(role="tool", tool_call_id=call.call_id, content="wrote 9 bytes"),
    ]
    second = await run(adapter, replace(chat("fake/tool_write"), messages=history))

    # The simulator validates tool ordering like the real APIs: a malformed history would be a 400 here.
    assert second.succeeded
    assert [c.name for c in second.calls] == ["finish"]
    assert second.text == "Done."


async def test_401_is_auth_and_not_retried(flavour, make_adapter, simulator):
    outcome = await run(make_adapter(flavour), chat("fake/401"))

    assert outcome.error.kind is ErrorKind.AUTH
    assert outcome.error.retryable is False
    assert outcome.error.status == 401
    assert outcome.error.request_id == f"req_fake_{simulator.requests()[0]['id']}"
    assert outcome.retries == []
    assert outcome.usages == []
    assert len(simulator.requests()) == 1


async def test_invalid_key_message_never_contains_the_key(flavour, make_adapter, simulator):
    key = "fake-401-sk-proj-ABCDEFGHIJKLMNOP"
    simulator.enqueue(
        flavour,
        {
            "fault": {
                "type": "http",
                "status": 401,
                "body": {"error": {"message": "Incorrect API key provided: {{api_key}}", "type": "x"}},
            }
        },
    )
    outcome = await run(make_adapter(flavour, key="fake-sk-proj-ABCDEFGHIJKLMNOP"), chat())

    assert outcome.error.kind is ErrorKind.AUTH
    assert "ABCDEFGHIJKLMNOP" not in outcome.error.message
    assert "ABCDEFGHIJKLMNOP" not in repr(outcome.events)
    assert key not in repr(make_adapter(flavour, key=key))


async def test_401_scope_is_a_permission_error(flavour, make_adapter):
    if flavour == "anthropic":
        pytest.skip("restricted-scope 401s are an OpenAI behaviour")
    outcome = await run(make_adapter(flavour), chat("fake/401_scope"))

    assert outcome.error.kind is ErrorKind.PERMISSION
    assert outcome.error.retryable is False
    assert "Missing scopes" in outcome.error.message


async def test_429_is_retried_after_retry_after(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, {"base": "429", "fault": {"retry_after_s": 0.05}}, "echo")
    outcome = await run(make_adapter(flavour), chat())

    [retry] = outcome.retries
    assert retry.error.kind is ErrorKind.RATE_LIMIT
    assert retry.error.retry_after_s == 0.05
    assert retry.delay_s == 0.05
    assert outcome.succeeded
    assert outcome.text == "You asked: hello"
    assert [r["status"] for r in simulator.requests()] == [429, 200]


async def test_429_without_retry_after_backs_off_exponentially(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, "429_no_retry_after", "429_no_retry_after", "echo")
    outcome = await run(make_adapter(flavour), chat())

    assert [r.error.retry_after_s for r in outcome.retries] == [None, None]
    first, second = (r.delay_s for r in outcome.retries)
    assert 0.75 * FAST.backoff_base_s <= first <= FAST.backoff_base_s
    assert 0.75 * 2 * FAST.backoff_base_s <= second <= 2 * FAST.backoff_base_s
    assert outcome.succeeded


async def test_retry_after_beyond_the_cap_is_not_waited_for(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, {"base": "429", "fault": {"retry_after_s": 3600}})
    outcome = await run(make_adapter(flavour), chat())

    assert outcome.retries == []
    assert outcome.error.kind is ErrorKind.RATE_LIMIT
    assert outcome.error.retry_after_s == 3600


async def test_429_quota_is_billing_and_not_retried(flavour, make_adapter, simulator):
    outcome = await run(make_adapter(flavour), chat("fake/429_quota"))

    assert outcome.error.kind is ErrorKind.BILLING_QUOTA
    assert outcome.error.retryable is False
    assert len(simulator.requests()) == 1


async def test_500_is_retried_then_fails(flavour, make_adapter, simulator):
    outcome = await run(make_adapter(flavour), chat("fake/500"))

    assert outcome.error.kind is ErrorKind.SERVER
    assert outcome.error.retryable is True
    assert [r.attempt for r in outcome.retries] == [1, 2]
    assert len(simulator.requests()) == 1 + FAST.max_retries


async def test_529_is_overloaded_and_retried(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, "529", "echo")
    outcome = await run(make_adapter(flavour), chat())

    [retry] = outcome.retries
    assert retry.error.kind is ErrorKind.OVERLOADED
    assert retry.error.status == 529
    # Overloads back off longer than other errors.
    assert retry.delay_s >= 0.75 * 2 * FAST.backoff_base_s
    assert outcome.succeeded


async def test_498_capacity_is_retried_until_the_budget_runs_out(flavour, make_adapter, simulator):
    outcome = await run(make_adapter(flavour), chat("fake/498"))

    assert outcome.error.kind is ErrorKind.OVERLOADED
    assert outcome.error.status == 498
    assert len(outcome.retries) == FAST.max_retries


async def test_x_should_retry_false_overrides_the_status(flavour, make_adapter, simulator):
    outcome = await run(make_adapter(flavour), chat("fake/x_should_retry_false"))

    assert outcome.error.kind is ErrorKind.SERVER
    assert outcome.error.retryable is False
    assert len(simulator.requests()) == 1


async def test_midstream_error_after_text_is_classified_and_not_retried(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, {"base": "midstream_error", "fault": {"after_events": 5}})
    outcome = await run(make_adapter(flavour), chat())

    assert outcome.text
    assert _text("midstream_error").startswith(outcome.text)
    expected = ErrorKind.OVERLOADED if flavour == "anthropic" else ErrorKind.SERVER
    assert outcome.error.kind is expected
    assert outcome.error.retryable is True  # the caller may retry the whole turn; the adapter does not
    assert outcome.retries == []
    assert outcome.usages[-1].complete is False
    assert len(simulator.requests()) == 1


async def test_midstream_error_before_any_content_is_retried(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, {"base": "midstream_error", "fault": {"after_events": 1}}, "echo")
    outcome = await run(make_adapter(flavour), chat())

    [retry] = outcome.retries
    assert retry.error.kind in (ErrorKind.SERVER, ErrorKind.OVERLOADED)
    assert outcome.text == "You asked: hello"
    assert outcome.succeeded
    # One Usage per streamed attempt: the failed one is marked incomplete.
    assert [u.complete for u in outcome.usages] == [False, True]


async def test_midstream_tool_use_failed_is_a_model_tool_error(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, {"base": "midstream_tool_use_failed", "fault": {"after_events": 5}})
    outcome = await run(make_adapter(flavour), chat())

    # Groq's code; Anthropic has no such code and reports a plain invalid request.
    expected = ErrorKind.BAD_REQUEST if flavour == "anthropic" else ErrorKind.MODEL_TOOL_ERROR
    assert outcome.error.kind is expected
    assert outcome.error.retryable is False
    if flavour == "groq":
        assert (outcome.error.code, outcome.error.status) == ("tool_use_failed", 400)


async def test_disconnect_mid_body_is_a_network_error(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, {"base": "disconnect", "fault": {"after_events": 5}})
    outcome = await run(make_adapter(flavour), chat())

    assert outcome.text
    assert outcome.error.kind is ErrorKind.NETWORK
    assert outcome.error.retryable is True
    assert outcome.usages[-1].complete is False


async def test_truncated_stream_is_incomplete_not_success(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, {"base": "truncate", "fault": {"after_events": 5}})
    outcome = await run(make_adapter(flavour), chat())

    assert outcome.text
    assert not outcome.succeeded
    assert outcome.error.kind is ErrorKind.INCOMPLETE
    assert outcome.error.retryable is True


async def test_truncation_before_content_is_retried(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, {"base": "truncate", "fault": {"after_events": 1}}, "echo")
    outcome = await run(make_adapter(flavour), chat())

    assert [r.error.kind for r in outcome.retries] == [ErrorKind.INCOMPLETE]
    assert outcome.succeeded


async def test_slow_stream_arrives_piece_by_piece_within_the_read_timeout(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, {"base": "slow", "timing": {"first_token_ms": 30, "per_event_ms": 2}})
    limits = replace(FAST, read_timeout_s=0.25)
    outcome = await run(make_adapter(flavour, limits), chat())

    assert outcome.text == _text("slow")
    assert sum(isinstance(e, TextDelta) for e in outcome.events) == 40
    assert outcome.end.stop is StopReason.END


async def test_stall_hits_the_read_timeout(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, {"base": "stall", "fault": {"after_events": 4, "stall_ms": 3000}})
    limits = replace(FAST, read_timeout_s=0.1)
    outcome = await run(make_adapter(flavour, limits), chat())

    assert outcome.text
    assert outcome.error.kind is ErrorKind.TIMEOUT
    assert outcome.error.retryable is True


async def test_stall_with_pings_is_stopped_by_the_wall_clock_deadline(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, {"base": "stall_with_pings", "fault": {"stall_ms": 5000, "ping_every_ms": 20}})
    limits = replace(FAST, read_timeout_s=0.1, deadline_s=0.3)
    outcome = await run(make_adapter(flavour, limits), chat())

    assert outcome.error.kind is ErrorKind.DEADLINE
    assert outcome.error.retryable is False
    if flavour == "anthropic":
        assert outcome.pings >= 3  # the keep-alives kept the read timeout from firing


async def test_split_utf8_crlf_and_comments_give_the_exact_text(flavour, make_adapter):
    outcome = await run(make_adapter(flavour), chat("fake/split_utf8"))

    assert outcome.text == _text("split_utf8")
    assert outcome.end.stop is StopReason.END


async def test_huge_output_completes(flavour, make_adapter):
    outcome = await run(make_adapter(flavour), chat("fake/huge_output"))

    assert len(outcome.text) == 2_000_000
    assert outcome.end.stop is StopReason.END
    assert outcome.usages[-1].output_tokens == 500_000


async def test_length_cutoff_reports_max_tokens_with_truncated_arguments(flavour, make_adapter):
    outcome = await run(make_adapter(flavour), chat("fake/length_cutoff"))

    assert outcome.end.stop is StopReason.MAX_TOKENS
    assert outcome.end.raw_reason == ("max_tokens" if flavour == "anthropic" else "length")
    with pytest.raises(ValueError, match="Unterminated string"):
        json.loads(outcome.arguments[0])


async def test_unknown_fake_model_is_not_found(flavour, make_adapter):
    outcome = await run(make_adapter(flavour), chat("fake/no-such-scenario"))

    assert outcome.error.kind is ErrorKind.NOT_FOUND
    assert outcome.error.retryable is False


async def test_connection_refused_is_a_retryable_network_error(flavour, http_client):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    adapter = ADAPTER_CLASSES[flavour](
        base_url=f"http://127.0.0.1:{port}/v1", api_key=FAKE_KEY, client=http_client, limits=FAST
    )
    outcome = await run(adapter, chat())

    assert outcome.error.kind is ErrorKind.NETWORK
    assert len(outcome.retries) == FAST.max_retries


# --- Cancellation -------------------------------------------------------------------------------------------------


def _slow(flavour):
    return {"base": "slow", "timing": {"first_token_ms": 0, "per_event_ms": 50}}


async def test_aclose_closes_the_upstream_connection_at_once(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, _slow(flavour))
    async with aclosing(make_adapter(flavour).stream_chat(chat())) as stream:
        async for event in stream:
            if isinstance(event, TextDelta):
                break
    # 40 events at 50 ms would take 2 s; the simulator sees the client hang up long before.
    entry = simulator.wait_for(lambda r: r["client_closed"], timeout=1.0)
    assert entry["completed"] is False
    assert entry["events_sent"] < 10


async def test_cancelling_the_consumer_task_closes_the_upstream_connection(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, _slow(flavour))
    first_text = asyncio.Event()

    async def consume() -> None:
        async with aclosing(make_adapter(flavour).stream_chat(chat())) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    first_text.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_text.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    entry = simulator.wait_for(lambda r: r["client_closed"], timeout=1.0)
    assert entry["completed"] is False


async def test_reading_to_the_end_reuses_the_connection_and_a_cut_drain_abandons_no_usage(
    flavour, make_adapter, simulator
):
    """After the terminal event, ``read_to_end`` lets the next call reuse the connection; a provider that holds its
    body open is cut off when its reader is cancelled, with nothing counted as abandoned (the usage was whole)."""
    adapter = make_adapter(flavour)
    async with aclosing(adapter.stream_chat(chat())) as stream:
        async for event in stream:
            if isinstance(event, TurnEnd):
                await read_to_end(stream)
    simulator.enqueue(flavour, {"base": "echo", "timing": {"body_end_ms": 30_000}})
    holding = make_adapter(flavour, replace(FAST, drain_timeout_s=60.0, read_timeout_s=60.0))
    ended = asyncio.Event()

    async def consume() -> None:
        async with aclosing(holding.stream_chat(chat())) as stream:
            async for event in stream:
                if isinstance(event, TurnEnd):
                    ended.set()
                    await read_to_end(stream)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(ended.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert holding.abandoned_usage is None
    first, second = simulator.requests()
    assert second["connection"] == first["connection"]
    simulator.wait_for(lambda r: r["client_closed"], timeout=5.0)


# --- Request shape ------------------------------------------------------------------------------------------------


async def test_request_shape_is_what_the_provider_documents(flavour, make_adapter, simulator):
    await run(make_adapter(flavour), chat())

    [entry] = simulator.requests()
    body, headers = entry["body"], entry["headers"]
    assert body["stream"] is True
    assert FAKE_KEY not in json.dumps(entry)  # the log masks the key ...
    if flavour == "anthropic":
        assert entry["path"] == "/anthropic/v1/messages"
        assert headers["anthropic-version"] == "2023-06-01"
        assert headers["x-api-key"] == FAKE_KEY[:8] + "***"  # ... but shows that one was sent
        assert "authorization" not in headers
        assert body["system"] == "You are a test."
        assert body["max_tokens"] == 256
        assert body["messages"] == [{"role": "user", "content": "hello"}]
        assert body["tools"][0] == {
            "name": "write_file",
            "description": "Write a file.",
            "input_schema": chat().tools[0].parameters,
        }
    else:
        assert entry["path"].endswith("/chat/completions")
        assert headers["authorization"] == "Bearer " + FAKE_KEY[:8] + "***"
        assert body["stream_options"] == {"include_usage": True}
        assert body["max_completion_tokens"] == 256
        assert body["messages"] == [
            {"role": "system", "content": "You are a test."},
            {"role": "user", "content": "hello"},
        ]
        assert body["tools"][0]["type"] == "function"
        assert body["tools"][0]["function"]["name"] == "write_file"
        assert body["tool_choice"] == "auto"


async def test_usage_is_never_summed_across_usage_sources(flavour, make_adapter, simulator):
    # Groq reports usage twice (x_groq.usage on the finish chunk, then the usage chunk): still one count.
    outcome = await run(make_adapter(flavour), chat(tools=False))

    [usage] = outcome.usages
    assert usage.output_tokens == math.ceil(len("You asked: hello") / 4)


async def test_request_with_a_conversation_history_is_valid_for_the_provider(flavour, make_adapter):
    request = ChatRequest(
        model="fake/echo",
        messages=[
            Message(role="user", content="first"),
            Message(role="assistant", content="ok"),
            Message(role="user", content="second"),
        ],
    )
    outcome = await run(make_adapter(flavour), request)

    assert outcome.text == "You asked: second"


async def test_a_usage_event_precedes_the_turn_end(flavour, make_adapter):
    outcome = await run(make_adapter(flavour), chat())

    assert isinstance(outcome.events[-2], Usage)
    assert not any(isinstance(e, Retry) for e in outcome.events)


# --- The idle-progress policy and read marks (issue #13, #14) ---------------------------------------------------------


async def test_an_upstream_that_only_keeps_alive_loses_the_call_at_the_idle_limit(flavour, make_adapter, simulator):
    # Pings (Anthropic) or SSE comments (OpenAI) every 20 ms keep the read timeout from firing; they are not progress.
    simulator.enqueue(flavour, {"base": "stall_with_pings", "fault": {"stall_ms": 60000, "ping_every_ms": 20}})
    limits = replace(FAST, read_timeout_s=5.0, deadline_s=30.0, idle_timeout_s=0.3)
    outcome = await run(make_adapter(flavour, limits), chat())

    assert outcome.error.kind is ErrorKind.TIMEOUT  # not DEADLINE: cut long before the 30 s deadline
    assert outcome.error.retryable is False  # a tarpit gets no second attempt
    assert "no progress" in outcome.error.message
    assert outcome.retries == []


async def test_steady_progress_is_never_cut_by_the_idle_limit(flavour, make_adapter):
    # Paced tokens: each event is progress, so a limit shorter than the whole answer never fires.
    limits = replace(FAST, idle_timeout_s=0.5)
    outcome = await run(make_adapter(flavour, limits), chat("fake/echo"))

    assert outcome.succeeded


async def test_the_idle_limit_never_interrupts_the_reader_between_its_reads(flavour, make_adapter, simulator):
    # One timer watches every read of a stream, and fires while the reader is busy elsewhere (here for longer than the
    # idle limit, after the first event): that work is never interrupted. The limit is the reads': the next one ends
    # the call, as a read that waited that long would.
    simulator.enqueue(flavour, {"base": "echo", "timing": {"per_event_ms": 30}})
    adapter = make_adapter(flavour, replace(FAST, idle_timeout_s=0.1))
    events = []
    async with aclosing(adapter.stream_chat(chat())) as stream:
        async for event in stream:
            events.append(event)
            if len(events) == 1:
                await asyncio.sleep(0.3)  # not cancelled by the adapter's timer
    assert isinstance(events[-1], ProviderError)
    assert events[-1].kind is ErrorKind.TIMEOUT


async def test_read_marks_follow_the_events_of_each_upstream_read_only_when_asked(flavour, make_adapter, simulator):
    simulator.enqueue(flavour, {"base": "echo", "timing": {"per_event_ms": 5}})
    plain = await run(make_adapter(flavour), chat())
    assert not any(isinstance(event, ReadEnd) for event in plain.events)

    adapter = make_adapter(flavour)
    adapter.mark_reads = True
    # Paced: each event arrives alone, and is marked before the read that waits for the next.
    simulator.enqueue(flavour, {"base": "echo", "timing": {"per_event_ms": 5}})
    marked = await run(adapter, chat())
    marks = [i for i, event in enumerate(marked.events) if isinstance(event, ReadEnd)]
    assert marks, "no read marks"
    assert marked.text == plain.text  # the marks add nothing else
    assert not isinstance(marked.events[0], ReadEnd)  # a mark always follows at least one event
    assert all(not isinstance(marked.events[i - 1], ReadEnd) for i in marks)  # never two marks in a row


async def test_reads_that_do_not_wait_join_one_batch_after_the_first_words(flavour, make_adapter, simulator):
    # 400 four-character chunks, unpaced. The consumer pauses after the first words, so the simulator sends the rest
    # meanwhile: every later read returns bytes already received, and they are marked in batches (one client write
    # each, in the proxy) of at most MAX_READS_PER_MARK reads, where each HTTP chunk had a mark of its own.
    simulator.enqueue(flavour, {"turns": [{"text": "abcd" * 400}], "stream_shape": {"text_chunk_chars": 4}})
    adapter = make_adapter(flavour)
    adapter.mark_reads = True
    events: list[object] = []
    async with aclosing(adapter.stream_chat(chat(tools=False))) as stream:
        async for event in stream:
            events.append(event)
            if isinstance(event, ReadEnd) and sum(isinstance(e, ReadEnd) for e in events) == 1:
                await asyncio.sleep(0.3)
    deltas = [i for i, event in enumerate(events) if isinstance(event, TextDelta)]
    marks = [i for i, event in enumerate(events) if isinstance(event, ReadEnd)]
    assert "".join(events[i].text for i in deltas) == "abcd" * 400  # type: ignore[attr-defined]
    assert isinstance(events[deltas[0] + 1], ReadEnd)  # the first words are not held for the batch
    later = [i for i in marks if i > deltas[0] + 1]
    assert len(later) <= 40, f"{len(later)} marks for {len(deltas)} deltas: the reads were not batched"
    # The bound: never more than MAX_READS_PER_MARK chunks (one delta each) between two marks.
    bounds = [deltas[0] + 1, *later, len(events)]
    assert max(sum(a < i < b for i in deltas) for a, b in itertools.pairwise(bounds)) <= MAX_READS_PER_MARK
