"""The provider simulator on the wire: validation, endpoints, framing, faults and the control API."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.management import CommandError, call_command

from runs.simulator import BUILTINS, ProviderSimulator, ScenarioError, SimulatorThread, load_script, parse_scenario
from runs.simulator.server import MAX_LOGGED_REQUESTS
from tests.runs.conftest import FAKE_KEY

ROOT = Path(__file__).resolve().parents[3]
OPENAI_AUTH = {"authorization": f"Bearer {FAKE_KEY}"}
ANTHROPIC_AUTH = {"x-api-key": FAKE_KEY, "anthropic-version": "2023-06-01"}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def http():
    with httpx.Client(timeout=5) as client:
        yield client


def openai_chat(http, simulator, body, *, flavour="openai", headers=OPENAI_AUTH):
    return http.post(simulator.base_urls[flavour] + "/chat/completions", json=body, headers=headers)


def anthropic_chat(http, simulator, body, *, headers=ANTHROPIC_AUTH):
    return http.post(simulator.base_urls["anthropic"] + "/v1/messages", json=body, headers=headers)


def sse_data(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


# --- Binding ------------------------------------------------------------------------------------------------------


# The point of this test is that binding all interfaces is refused.
@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "example.com", "::"])  # noqa: S104
def test_refuses_to_bind_anything_but_loopback(host):
    with pytest.raises(ValueError, match="loopback only"):
        ProviderSimulator(host=host)


# --- Auth and validation (§3.3) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["openai", "groq"])
@pytest.mark.parametrize("key", ["", "fake-invalid", "fake-401-anything"])
def test_openai_flavours_reject_missing_and_invalid_keys(http, simulator, flavour, key):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = openai_chat(http, simulator, {"model": "m", "messages": USER}, flavour=flavour, headers=headers)

    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    assert response.headers["x-request-id"].startswith("req_fake_")
    if key:
        assert key not in error["message"]  # masked: first 8 characters and ***


def test_anthropic_accepts_x_api_key_or_bearer_and_rejects_missing(http, simulator):
    body = {"model": "m", "max_tokens": 5, "messages": USER}
    assert anthropic_chat(http, simulator, body).status_code == 200
    bearer = {"authorization": f"Bearer {FAKE_KEY}", "anthropic-version": "2026-10-21"}
    assert anthropic_chat(http, simulator, body, headers=bearer).status_code == 200
    response = anthropic_chat(http, simulator, body, headers={"anthropic-version": "2023-06-01"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.json()["request_id"] == response.headers["request-id"]


def test_anthropic_version_is_required_and_2026_rejects_sampling_parameters(http, simulator):
    body = {"model": "m", "max_tokens": 5, "messages": USER, "temperature": 0.5}
    assert anthropic_chat(http, simulator, body, headers={"x-api-key": FAKE_KEY}).status_code == 400
    assert anthropic_chat(http, simulator, body).status_code == 200
    response = anthropic_chat(http, simulator, body, headers={**ANTHROPIC_AUTH, "anthropic-version": "2026-10-21"})
    assert response.status_code == 400
    assert "temperature" in response.json()["error"]["message"]


def test_unparsable_json_is_a_400(http, simulator):
    response = http.post(simulator.base_urls["openai"] + "/chat/completions", content=b"{nope", headers=OPENAI_AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"messages": USER}, "model"),
        ({"model": "m", "messages": []}, "too short"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "Supported values"),
        ({"model": "m", "messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": "m", "messages": USER, "tools": [{"type": "function", "function": {"parameters": {}}}]}, "name"),
        (
            {
                "model": "m",
                "messages": [
                    *USER,
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                    {"role": "user", "content": "again"},
                ],
            },
            "The following tool_call_ids did not have response messages: c1",
        ),
        ({"model": "m", "messages": [*USER, {"role": "tool", "tool_call_id": "zz", "content": "x"}]}, "role 'tool'"),
    ],
)
def test_openai_schema_checks_mirror_the_real_api(http, simulator, body, fragment):
    response = openai_chat(http, simulator, body)
    assert response.status_code == 400
    assert fragment in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": "m", "messages": USER}, "max_tokens: Field required"),
        ({"model": "m", "max_tokens": 0, "messages": USER}, "greater than or equal to 1"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "assistant", "content": "x"}]}, "first message"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "top-level `system`"),
        ({"model": "m", "max_tokens": 5, "messages": [*USER, *USER]}, "must alternate"),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    *USER,
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "x", "input": {}}]},
                    {"role": "user", "content": "no result"},
                ],
            },
            "`tool_use` ids were found without `tool_result` blocks immediately after: t1",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    *USER,
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t9", "content": "x"}]},
                ],
            },
            "unexpected `tool_use_id` found in `tool_result` blocks",
        ),
    ],
)
def test_anthropic_schema_checks_mirror_the_real_api(http, simulator, body, fragment):
    response = anthropic_chat(http, simulator, body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert fragment in response.json()["error"]["message"]


def test_unknown_paths_are_404_and_wrong_methods_405_in_the_flavours_shape(http, simulator):
    response = http.get(simulator.base_urls["anthropic"] + "/v1/nothing", headers=ANTHROPIC_AUTH)
    assert response.status_code == 404
    assert response.json()["type"] == "error"
    response = http.get(simulator.base_urls["openai"] + "/chat/completions", headers=OPENAI_AUTH)
    assert response.status_code == 405
    assert "error" in response.json()
    assert http.get(simulator.base_url + "/elsewhere").status_code == 404


# --- Models (§3.3.6) ---------------------------------------------------------------------------------------------


def test_models_endpoints_list_the_fixed_model_and_the_scenarios(http, simulator):
    listing = http.get(simulator.base_urls["openai"] + "/models", headers=OPENAI_AUTH).json()
    ids = [m["id"] for m in listing["data"]]
    assert listing["object"] == "list"
    assert ids[0] == "fake-model"
    assert "fake/echo" in ids
    assert "fake/huge_output" in ids
    groq = http.get(simulator.base_urls["groq"] + "/models", headers=OPENAI_AUTH).json()
    assert [m["id"] for m in groq["data"]] == ids


def test_anthropic_models_honour_limit(http, simulator):
    page = http.get(simulator.base_urls["anthropic"] + "/v1/models?limit=1", headers=ANTHROPIC_AUTH).json()
    assert page["data"] == [
        {"type": "model", "id": "fake-claude", "display_name": "Fake Claude", "created_at": "2025-01-01T00:00:00Z"}
    ]
    assert page["has_more"] is True
    assert page["first_id"] == page["last_id"] == "fake-claude"


def test_models_endpoint_needs_a_valid_key(http, simulator):
    assert http.get(simulator.base_urls["groq"] + "/models").status_code == 401
    response = http.get(simulator.base_urls["openai"] + "/models", headers={"authorization": "Bearer fake-x:401_scope"})
    assert response.status_code == 401
    assert "Missing scopes" in response.json()["error"]["message"]


# --- Output (§3.5) -----------------------------------------------------------------------------------------------


def test_openai_stream_shape(http, simulator):
    body = {"model": "fake/tool_write", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    response = openai_chat(http, simulator, body)

    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["transfer-encoding"] == "chunked"
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "fake/tool_write" for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + 16
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[:-1] if "tool_calls" in c["choices"][0]["delta"]]
    start, *pieces = calls
    assert start == {
        "index": 0,
        "id": "call_tool_write_0_0",
        "type": "function",
        "function": {"name": "write_file", "arguments": ""},
    }
    assert all(set(piece) == {"index", "function"} for piece in pieces)
    assert "".join(p["function"]["arguments"] for p in pieces) == '{"path":"main.py","content":"print(1)\\n"}'


def test_openai_without_include_usage_sends_no_usage_key_or_usage_chunk(http, simulator):
    response = openai_chat(http, simulator, {"model": "fake/echo", "messages": USER, "stream": True})
    chunks = [json.loads(d) for d in sse_data(response.text)[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_groq_stream_carries_x_groq_id_first_and_usage_on_the_finish_chunk(http, simulator):
    body = {"model": "fake/echo", "messages": USER, "stream": True}
    chunks = [json.loads(d) for d in sse_data(openai_chat(http, simulator, body, flavour="groq").text)[:-1]]
    assert chunks[0]["x_groq"] == {"id": chunks[-1]["x_groq"]["id"]}
    usage = chunks[-1]["x_groq"]["usage"]
    assert usage["completion_tokens"] == math.ceil(len("You asked: hi") / 4)
    assert {"queue_time", "prompt_time", "completion_time", "total_time"} <= usage.keys()
    assert all("x_groq" not in c for c in chunks[1:-1])


def test_groq_2024_stream_options_rejection_switch(http, simulator):
    simulator.set_groq_reject_stream_options(True)
    body = {"model": "fake/echo", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    response = openai_chat(http, simulator, body, flavour="groq")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "property 'stream_options' is unsupported, did you mean 'stream'?"
    assert openai_chat(http, simulator, body, flavour="openai").status_code == 200


def test_anthropic_stream_event_order(http, simulator):
    body = {"model": "fake/tool_write", "max_tokens": 9, "messages": USER, "stream": True}
    text = anthropic_chat(http, simulator, body).text
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    payloads = [json.loads(d) for d in sse_data(text)]
    assert [p["type"] for p in payloads] == names  # data.type repeats the event name
    tool_start = next(p for p in payloads if p["type"] == "content_block_start" and p["index"] == 1)
    assert tool_start["content_block"]["id"] == "toolu_tool_write_0_0"
    first_json = next(p for p in payloads if p.get("delta", {}).get("type") == "input_json_delta")
    assert first_json["delta"]["partial_json"] == ""
    assert payloads[-2]["delta"]["stop_reason"] == "tool_use"


def test_include_cache_fields_adds_zero_cache_counts(http, simulator):
    simulator.enqueue("anthropic", {"base": "echo", "stream_shape": {"include_cache_fields": True}})
    body = {"model": "m", "max_tokens": 9, "messages": USER, "stream": True}
    start = json.loads(sse_data(anthropic_chat(http, simulator, body).text)[0])
    assert start["message"]["usage"]["cache_read_input_tokens"] == 0
    assert start["message"]["usage"]["cache_creation_input_tokens"] == 0


def test_non_streaming_responses_carry_the_same_turn(http, simulator):
    openai_body = openai_chat(http, simulator, {"model": "fake/parallel_tools", "messages": USER}).json()
    assert openai_body["object"] == "chat.completion"
    assert openai_body["choices"][0]["finish_reason"] == "tool_calls"
    assert len(openai_body["choices"][0]["message"]["tool_calls"]) == 2
    groq_body = openai_chat(http, simulator, {"model": "fake/echo", "messages": USER}, flavour="groq").json()
    assert groq_body["choices"][0]["message"]["content"] == "You asked: hi"
    assert groq_body["x_groq"]["id"].startswith("req_fake_")
    message = anthropic_chat(http, simulator, {"model": "fake/tool_write", "max_tokens": 9, "messages": USER}).json()
    assert message["type"] == "message"
    assert message["stop_reason"] == "tool_use"
    assert message["content"][1]["input"] == {"path": "main.py", "content": "print(1)\n"}
    assert message["usage"]["output_tokens"] == 16


def test_turn_is_chosen_by_the_number_of_assistant_messages(http, simulator):
    messages = [
        *USER,
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    body = openai_chat(http, simulator, {"model": "fake/multi_turn_build", "messages": messages}).json()
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "edit_file"
    # Fixed usage numbers, so an agent loop's token totals can be asserted exactly.
    assert body["usage"]["prompt_tokens"] == 100
    assert body["usage"]["completion_tokens"] == 20


def test_usage_auto_is_a_quarter_of_the_characters_rounded_up(http, simulator):
    body = openai_chat(http, simulator, {"model": "fake/echo", "messages": USER}).json()
    assert body["usage"]["prompt_tokens"] == math.ceil(len(json.dumps(USER)) / 4)
    assert body["usage"]["completion_tokens"] == math.ceil(len("You asked: hi") / 4)


def test_scenario_selection_order_queue_then_model_then_key_suffix(http, simulator):
    simulator.enqueue("openai", "500")
    assert openai_chat(http, simulator, {"model": "fake/echo", "messages": USER}).status_code == 500
    assert openai_chat(http, simulator, {"model": "fake/429", "messages": USER}).status_code == 429
    keyed = {"authorization": "Bearer fake-demo:429_quota"}
    response = openai_chat(http, simulator, {"model": "gpt-x", "messages": USER}, headers=keyed)
    assert response.json()["error"]["code"] == "insufficient_quota"
    assert openai_chat(http, simulator, {"model": "gpt-x", "messages": USER}).status_code == 200
    response = openai_chat(http, simulator, {"model": "fake/unknown", "messages": USER})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_queued_scenarios_respect_their_flavour(http, simulator):
    simulator.enqueue("anthropic", "500")
    assert openai_chat(http, simulator, {"model": "m", "messages": USER}).status_code == 200
    assert anthropic_chat(http, simulator, {"model": "m", "max_tokens": 5, "messages": USER}).status_code == 500


def test_http_fault_headers_for_429(http, simulator):
    simulator.enqueue("openai", {"base": "429", "fault": {"retry_after_s": 0.5, "headers": {"X-Extra": "1"}}})
    response = openai_chat(http, simulator, {"model": "m", "messages": USER})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "0.5"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["x-extra"] == "1"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


# --- Faults on the wire: abort and truncate stay distinct ---------------------------------------------------------


def test_disconnect_aborts_without_the_terminating_chunk(http, simulator):
    simulator.enqueue("openai", {"base": "disconnect", "fault": {"after_events": 2}})
    with (
        pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"),
        http.stream(
            "POST",
            simulator.base_urls["openai"] + "/chat/completions",
            json={"model": "m", "messages": USER, "stream": True},
            headers=OPENAI_AUTH,
        ) as response,
    ):
        response.read()


def test_truncate_ends_the_body_cleanly_without_a_terminal_event(http, simulator):
    simulator.enqueue("anthropic", {"base": "truncate", "fault": {"after_events": 2}})
    text = anthropic_chat(http, simulator, {"model": "m", "max_tokens": 5, "messages": USER, "stream": True}).text
    assert "message_start" in text
    assert "message_stop" not in text


def test_midstream_error_payloads_per_flavour(http, simulator):
    simulator.enqueue("any", {"base": "midstream_error", "fault": {"after_events": 1}})
    simulator.enqueue("any", {"base": "midstream_tool_use_failed", "fault": {"after_events": 1}})
    simulator.enqueue("any", {"base": "midstream_error", "fault": {"after_events": 1}})
    body = {"model": "m", "messages": USER, "stream": True}
    openai_text = openai_chat(http, simulator, body).text
    assert json.loads(sse_data(openai_text)[-1])["error"]["type"] == "server_error"
    groq_text = openai_chat(http, simulator, body, flavour="groq").text
    assert "event: error" in groq_text
    assert json.loads(sse_data(groq_text)[-1])["error"]["code"] == "tool_use_failed"
    anthropic_text = anthropic_chat(http, simulator, {**body, "max_tokens": 5}).text
    assert json.loads(sse_data(anthropic_text)[-1])["error"]["type"] == "overloaded_error"


def _raw_chunks(port: int, path: str, body: dict[str, Any], headers: dict[str, str]) -> list[bytes]:
    """Send one request over a plain socket and return the HTTP chunks of the response body, as framed."""
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(payload)}\r\nconnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.encode() + payload)
        raw = b""
        while data := sock.recv(65536):
            raw += data
    body_bytes = raw.split(b"\r\n\r\n", 1)[1]
    chunks: list[bytes] = []
    while True:
        size_line, body_bytes = body_bytes.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(body_bytes[:size])
        body_bytes = body_bytes[size + 2 :]


def test_split_utf8_cuts_events_inside_characters_with_crlf_and_comments(simulator):
    chunks = _raw_chunks(
        simulator.port,
        "/openai/v1/chat/completions",
        {"model": "fake/split_utf8", "messages": USER, "stream": True},
        OPENAI_AUTH,
    )
    inside_a_character = 0
    for chunk in chunks:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            inside_a_character += 1
    assert inside_a_character >= 2
    joined = b"".join(chunks)
    assert b"\r\n\r\n" in joined
    assert b": keep-alive\r\n" in joined
    assert b"\n" not in joined.replace(b"\r\n", b"")


def test_each_event_is_its_own_chunk(simulator):
    chunks = _raw_chunks(
        simulator.port,
        "/anthropic/v1/messages",
        {"model": "fake/echo", "max_tokens": 5, "messages": USER, "stream": True},
        ANTHROPIC_AUTH,
    )
    assert all(chunk.startswith(b"event: ") and chunk.endswith(b"\n\n") for chunk in chunks)


def test_chunked_request_bodies_get_411(simulator):
    with socket.create_connection(("127.0.0.1", simulator.port), timeout=5) as sock:
        sock.sendall(b"POST /openai/v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 411")


def test_keep_alive_serves_several_requests_on_one_connection(simulator):
    with httpx.Client(limits=httpx.Limits(max_connections=1)) as client:
        for _ in range(3):
            response = openai_chat(client, simulator, {"model": "fake/echo", "messages": USER, "stream": True})
            assert sse_data(response.text)[-1] == "[DONE]"
    assert len(simulator.requests()) == 3


# --- Control API and request log ----------------------------------------------------------------------------------


def test_control_api_enqueue_reset_health_and_requests(http, simulator):
    response = http.post(simulator.base_url + "/_fake/scenarios", json={"flavour": "groq", "scenarios": ["498"]})
    assert response.json() == {"queued": 1}
    assert openai_chat(http, simulator, {"model": "m", "messages": USER}, flavour="groq").status_code == 498
    logged = http.get(simulator.base_url + "/_fake/requests").json()["requests"]
    assert logged[-1]["headers"]["authorization"] == f"Bearer {FAKE_KEY[:8]}***"
    assert logged[-1]["body"] == {"model": "m", "messages": USER}
    assert (logged[-1]["scenario"], logged[-1]["status"]) == ("498", 498)
    health = http.get(simulator.base_url + "/_fake/health").json()
    assert health["status"] == "ok"
    assert set(BUILTINS) <= set(health["scenarios"])
    assert http.post(simulator.base_url + "/_fake/reset").json() == {"ok": True}
    assert http.get(simulator.base_url + "/_fake/requests").json() == {"requests": []}


def test_control_api_rejects_bad_scenarios_with_a_clear_message(http, simulator):
    response = http.post(simulator.base_url + "/_fake/scenarios", json={"scenarios": [{"fault": {"type": "explode"}}]})
    assert response.status_code == 400
    assert "fault.type" in response.json()["error"]["message"]
    response = http.post(simulator.base_url + "/_fake/scenarios", json={"flavour": "mistral", "scenarios": []})
    assert response.status_code == 400


def test_request_log_is_off_unless_enabled_and_bounded():
    thread = SimulatorThread().start()
    try:
        with httpx.Client() as client:
            assert client.get(thread.simulator.base_url + "/_fake/requests").status_code == 404
    finally:
        thread.stop()
    state = SimulatorThread(record_requests=True).state
    for number in range(MAX_LOGGED_REQUESTS + 5):
        state.log({"id": number})
    assert len(state.requests()) == MAX_LOGGED_REQUESTS
    assert state.requests()[0]["id"] == 5


# --- Scenarios, scripts and the command ---------------------------------------------------------------------------


def test_every_section_3_6_scenario_is_built_in():
    expected = {
        "echo", "normal", "tool_write", "parallel_tools", "multi_turn_build", "bad_tool_args", "unknown_tool",
        "path_escape", "loop_forever", "401", "401_scope", "429", "429_no_retry_after", "429_quota", "500", "529",
        "498", "x_should_retry_false", "midstream_error", "disconnect", "truncate", "slow", "stall",
        "stall_with_pings", "split_utf8", "huge_output", "length_cutoff",
    }  # fmt: skip
    assert expected <= set(BUILTINS)
    slow = BUILTINS["slow"]
    assert (slow.timing_ms("first_token_ms"), slow.timing_ms("per_event_ms")) == (300, 80)


def test_base_merges_overrides_over_a_built_in():
    scenario = parse_scenario({"base": "stall", "fault": {"stall_ms": 200}})
    assert scenario.fault == {"type": "stall", "after_events": 2, "stall_ms": 200}
    assert scenario.turns == BUILTINS["stall"].turns
    assert (BUILTINS["stall"].fault or {})["stall_ms"] == 150_000  # the built-in is untouched


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"turns": "x"}, "'turns' must be a list"),
        ({"turns": [{"tool_calls": [{}]}]}, "needs a name"),
        ({"timing": {"per_event_ms": -1}}, "timing.per_event_ms"),
        ({"stream_shape": {"text_chunk_chars": 0}}, "text_chunk_chars"),
        ({"usage": {"input_tokens": "lots"}}, "usage.input_tokens"),
        ({"fault": {"type": "http", "error": "nope"}}, "fault.error"),
        ({"base": "no_such"}, "Unknown base"),
    ],
)
def test_malformed_scenarios_are_refused(document, fragment):
    with pytest.raises(ScenarioError, match=fragment.replace(".", r"\.")):
        parse_scenario(document)


def test_script_scenarios_are_selectable_by_model_name(http, tmp_path):
    script = {"scenarios": [{"name": "hello", "turns": [{"text": "Hello from the script."}]}]}
    [scenario] = load_script(json.dumps(script))
    thread = SimulatorThread(scenarios=[scenario]).start()
    try:
        response = http.post(
            thread.base_urls["openai"] + "/chat/completions",
            json={"model": "fake/hello", "messages": USER},
            headers=OPENAI_AUTH,
        )
    finally:
        thread.stop()
    assert response.json()["choices"][0]["message"]["content"] == "Hello from the script."
    with pytest.raises(ScenarioError, match="needs a name"):
        load_script(json.dumps({"scenarios": [{"turns": []}]}))
    with pytest.raises(ScenarioError, match="not valid JSON"):
        load_script("{")


def test_command_refuses_a_bad_script(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"scenarios": [{"name": "x", "turns": 3}]}')
    with pytest.raises(CommandError, match="turns"):
        call_command("provider_simulator", "--script", str(bad))
    with pytest.raises(CommandError, match="Cannot read"):
        call_command("provider_simulator", "--script", str(tmp_path / "missing.json"))


def test_command_serves_and_prints_its_base_urls(tmp_path):
    script = tmp_path / "s.json"
    script.write_text(json.dumps({"scenarios": [{"name": "greet", "turns": [{"text": "hi there"}]}]}))
    process = subprocess.Popen(
        [sys.executable, "manage.py", "provider_simulator", "--port", "0", "--script", str(script)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    try:
        lines = [process.stdout.readline() for _ in range(7)]
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()
    output = "".join(lines)
    assert "Provider simulator listening on http://127.0.0.1:" in output
    openai_url = next(line.split("base URL: ")[1].strip() for line in lines if line.strip().startswith("openai"))
    assert openai_url.endswith("/openai/v1")
    assert "/groq/openai/v1" in output
    assert "/anthropic" in output
    assert "fake/greet" in output
