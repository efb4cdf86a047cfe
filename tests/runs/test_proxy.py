"""The OpenAI-compatible proxy end to end: the stock ``openai`` SDK against a real ASGI server (uvicorn, in a thread)
serving CesaFlow, whose provider keys point at the provider simulator.

Every test here is transactional: the server's connections only see committed rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db import connections, transaction
from django.test import AsyncRequestFactory
from django.utils import timezone

from cesaflow.lib import row_cache
from cesaflow.lib.http import close_http_clients
from keys.checking import provider_key_check
from keys.models import KeyStatus, Provider, ProviderKey
from keys.services import provider_key_create, provider_key_revoke
from orgs import api_key_cache
from orgs.models import ApiKey, Organization
from orgs.permissions import RUNS_READ, RUNS_WRITE
from orgs.services import api_key_create
from runs.api import proxy_call, proxy_keys, proxy_views
from runs.models import AuditEvent, Run, RunKind, RunStatus, UsageRecord
from runs.providers.base import CallLimits
from tests.keys import canary
from tests.runs.proxy_support import serving, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "fake-proxy-key-0123456789"
FLAVOURS = ["openai", "groq", "anthropic"]
WRITE_FILE: Any = {
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
FINISH: Any = {
    "type": "function",
    "function": {
        "name": "finish",
        "description": "Finish.",
        "parameters": {"type": "object", "properties": {"summary": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def server(django_db_blocker):
    with serving(django_db_blocker) as running:
        yield running


@pytest.fixture
def fast_retries(monkeypatch):
    """Provider retries with tiny backoffs (the server thread reads the limits at call time)."""
    monkeypatch.setattr(proxy_call, "CALL_LIMITS", CallLimits(backoff_base_s=0.01, backoff_max_s=0.02))


@pytest.fixture
def no_retries(monkeypatch):
    monkeypatch.setattr(proxy_call, "CALL_LIMITS", CallLimits(max_retries=0, read_timeout_s=0.3))


@pytest.fixture
def keys(cast, simulator) -> dict[str, ProviderKey]:
    """Org A: one key per dialect, labelled ``sim-<flavour>``, pointing at the simulator. Org B: ``b-openai``."""
    made = {
        flavour: provider_key_create(
            org=cast.org_a,
            actor=cast.admin_a.user,
            provider=flavour,
            label=f"sim-{flavour}",
            secret=SECRET,
            base_url=simulator.base_urls[flavour],
        )
        for flavour in FLAVOURS
    }
    made["b"] = provider_key_create(
        org=cast.org_b,
        actor=cast.admin_b.user,
        provider=Provider.OPENAI,
        label="b-openai",
        secret=SECRET,
        base_url=simulator.base_urls["openai"],
    )
    return made


def sdk(server, api_key: str) -> openai.OpenAI:
    # No SDK retries: each test sees the proxy's first answer.
    return openai.OpenAI(base_url=server.api, api_key=api_key, max_retries=0)


def collect_tool_calls(chunks: Any) -> list[dict[str, Any]]:
    """Reassemble streamed tool calls by index, the way the SDK's own helpers do."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for part in choice.delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = part.id or call["id"]
                if part.function is not None:
                    call["name"] += part.function.name or ""
                    call["arguments"] += part.function.arguments or ""
    return [calls[i] for i in sorted(calls)]


def only_run() -> Run:
    """The one run, once it has ended: the proxy records a run's end off the response path, just after the answer."""
    wait_until(lambda: Run.objects.exists() and not Run.objects.filter(status=RunStatus.RUNNING).exists())
    runs = list(Run.objects.all())
    assert len(runs) == 1, runs
    return runs[0]


# --- Streaming and non-streaming, per dialect ---------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sdk_streams_text_and_usage_through_each_dialect(server, cast, keys, flavour):
    model = f"sim-{flavour}/fake/echo"
    stream = sdk(server, cast.admin_a.api_secret).chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello proxy"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "You asked: hello proxy"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.model for c in chunks} == {model}  # echoed as sent, label included
    assert {c.created for c in chunks} == {chunks[0].created}
    usage = chunks[-1].usage
    assert usage is not None
    assert chunks[-1].choices == []
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    run = only_run()
    assert (run.kind, run.status, run.org_id) == (RunKind.COMPLETION, RunStatus.SUCCEEDED, cast.org_a.id)
    assert (run.provider, run.model, run.provider_key_id) == (flavour, "fake/echo", keys[flavour].id)
    assert run.created_by_api_key_id == cast.admin_a.api_key.id
    assert (run.input_tokens, run.output_tokens, run.usage_complete) == (
        usage.prompt_tokens,
        usage.completion_tokens,
        True,
    )
    assert run.started_at is not None
    assert run.finished_at is not None
    assert chunks[0].id == f"chatcmpl-{run.id.hex}"
    ledger = list(UsageRecord.objects.filter(run=run).values_list("input_tokens", "output_tokens", "complete"))
    assert ledger == [(usage.prompt_tokens, usage.completion_tokens, True)]
    # The key was opened for this call, and the opening names the run.
    used = AuditEvent.objects.get(event=AuditEvent.KEY_USED, target_id=str(keys[flavour].id))
    assert used.actor_api_key_id == cast.admin_a.api_key.id
    assert used.metadata["reference"] == str(run.id)


def test_calls_one_after_another_reuse_the_connection_to_their_provider(server, cast, keys, simulator):
    client = sdk(server, cast.admin_a.api_secret)
    for word in ("one", "two"):
        chunks = client.chat.completions.create(
            model="sim-openai/fake/echo", messages=[{"role": "user", "content": word}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == f"You asked: {word}"
        # The call's end (upstream read to its end, then the run's row) is recorded just after the answer.
        wait_until(lambda: not Run.objects.filter(status=RunStatus.RUNNING).exists())
    first, second = simulator.requests()
    assert first["connection"]
    assert second["connection"] == first["connection"]


def test_usage_chunk_is_sent_only_when_asked_for(server, cast, keys):
    chunks = list(
        sdk(server, cast.admin_a.api_secret).chat.completions.create(
            model="sim-openai/fake/echo", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    # The ledger knows the usage anyway: the proxy always asks the provider for it.
    assert only_run().input_tokens > 0


def test_sse_response_is_unbuffered_event_stream(server, cast, keys):
    body = {"model": "sim-openai/fake/echo", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {cast.admin_a.api_secret}"}
    with httpx.stream("POST", f"{server.api}/chat/completions", json=body, headers=headers) as response:
        raw = response.read().decode()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-accel-buffering"] == "no"
    assert "no-store" in response.headers["cache-control"] or "no-cache" in response.headers["cache-control"]
    frames = [f for f in raw.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    assert json.loads(frames[0][6:])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("flavour", ["openai", "anthropic"])
def test_sdk_gets_one_completion_without_streaming(server, cast, keys, simulator, flavour):
    completion = sdk(server, cast.admin_a.api_secret).chat.completions.create(
        model=f"sim-{flavour}/fake/echo", messages=[{"role": "user", "content": "whole answer"}], max_tokens=64
    )

    assert completion.object == "chat.completion"
    assert completion.model == f"sim-{flavour}/fake/echo"
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant",
        "You asked: whole answer",
        "stop",
    )
    assert choice.message.tool_calls is None
    run = only_run()
    assert run.status == RunStatus.SUCCEEDED
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        run.input_tokens,
        run.output_tokens,
    )
    # Upstream the proxy always streams; the caller's max_tokens reached the provider in its own dialect.
    upstream = simulator.requests()[-1]["body"]
    assert upstream["stream"] is True
    assert upstream["max_tokens" if flavour == "anthropic" else "max_completion_tokens"] == 64


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tool_calls_stream_in_openai_shape_and_results_round_trip(server, cast, keys, simulator, flavour):
    client = sdk(server, cast.admin_a.api_secret)
    model = f"sim-{flavour}/fake/tool_write"
    messages: list[Any] = [{"role": "user", "content": "write main.py"}]
    chunks = list(
        client.chat.completions.create(model=model, messages=messages, tools=[WRITE_FILE, FINISH], stream=True)
    )

    calls = collect_tool_calls(chunks)
    assert [c["name"] for c in calls] == ["write_file"]
    assert json.loads(calls[0]["arguments"]) == {"path": "main.py", "content": "print(1)\n"}
    assert calls[0]["id"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "I'll create the file."
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # The first fragment of a call carries index, id, type and name; the others only index and arguments.
    first: Any = next(c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls)[0]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (
        0,
        "function",
        "write_file",
        "",
    )

    # Second turn: the assistant's calls and our tool result go back; the simulator validates their pairing in
    # the provider's own dialect (Anthropic: tool_use blocks answered by tool_result blocks).
    messages.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": calls[0]["id"],
                    "type": "function",
                    "function": {"name": "write_file", "arguments": calls[0]["arguments"]},
                }
            ],
        }
    )
    messages.append({"role": "tool", "tool_call_id": calls[0]["id"], "content": "wrote 9 bytes"})
    second = client.chat.completions.create(model=model, messages=messages, tools=[WRITE_FILE, FINISH])

    assert second.choices[0].finish_reason == "tool_calls"
    returned: list[Any] = list(second.choices[0].message.tool_calls or [])
    assert [c.function.name for c in returned] == ["finish"]
    assert json.loads(returned[0].function.arguments) == {"summary": "Finished the task."}
    upstream = simulator.requests()[-1]["body"]
    if flavour == "anthropic":
        assert upstream["messages"][1]["content"][0]["type"] == "tool_use"
        assert upstream["messages"][2]["content"][0] == {
            "type": "tool_result",
            "tool_use_id": calls[0]["id"],
            "content": "wrote 9 bytes",
        }
        assert upstream["tools"][0]["input_schema"] == WRITE_FILE["function"]["parameters"]
    else:
        assert upstream["messages"][2] == {"role": "tool", "tool_call_id": calls[0]["id"], "content": "wrote 9 bytes"}
    wait_until(lambda: Run.objects.filter(status=RunStatus.SUCCEEDED).count() == 2)


def test_parallel_tool_calls_keep_their_indices(server, cast, keys):
    chunks = list(
        sdk(server, cast.admin_a.api_secret).chat.completions.create(
            model="sim-anthropic/fake/parallel_tools",
            messages=[{"role": "user", "content": "two files"}],
            tools=[WRITE_FILE, FINISH],
            stream=True,
        )
    )
    calls = collect_tool_calls(chunks)
    assert [json.loads(c["arguments"])["path"] for c in calls] == ["app.py", "test_app.py"]
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize("flavour", ["openai", "anthropic"])
def test_a_cut_off_turn_finishes_with_length(server, cast, keys, flavour):
    chunks = list(
        sdk(server, cast.admin_a.api_secret).chat.completions.create(
            model=f"sim-{flavour}/fake/length_cutoff",
            messages=[{"role": "user", "content": "big file"}],
            tools=[WRITE_FILE],
            stream=True,
        )
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert collect_tool_calls(chunks)[0]["arguments"].startswith('{"path": "big.py"')  # truncated, as received


@pytest.mark.parametrize(
    ("flavour", "expected"),
    [
        ("openai", {"temperature": 0.2, "top_p": 0.9, "stop": ["END"], "max_completion_tokens": 77}),
        ("anthropic", {"temperature": 0.2, "top_p": 0.9, "stop_sequences": ["END"], "max_tokens": 77}),
    ],
)
def test_sampling_options_and_tool_choice_reach_the_provider_in_its_dialect(
    server, cast, keys, simulator, flavour, expected
):
    sdk(server, cast.admin_a.api_secret).chat.completions.create(
        model=f"sim-{flavour}/fake/echo",
        messages=[{"role": "user", "content": "hi"}],
        temperature=0.2,
        top_p=0.9,
        stop="END",
        max_completion_tokens=77,
        tools=[WRITE_FILE, FINISH],
        tool_choice={"type": "function", "function": {"name": "finish"}},
        parallel_tool_calls=False,
    )
    body = simulator.requests()[-1]["body"]
    assert {name: body.get(name) for name in expected} == expected
    if flavour == "anthropic":
        assert body["tool_choice"] == {"type": "tool", "name": "finish", "disable_parallel_tool_use": True}
    else:
        assert body["tool_choice"] == {"type": "function", "function": {"name": "finish"}}
        assert body["parallel_tool_calls"] is False


# --- Provider failures ---------------------------------------------------------------------------------------------


def test_provider_401_is_an_authentication_error_and_marks_the_key_invalid(server, cast, keys, no_retries):
    with pytest.raises(openai.AuthenticationError) as raised:
        sdk(server, cast.admin_a.api_secret).chat.completions.create(
            model="sim-openai/fake/401", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert raised.value.code == "provider_key_invalid"
    assert "sim-openai" in raised.value.message
    key = ProviderKey.objects.get(pk=keys["openai"].pk)
    assert key.status == KeyStatus.INVALID
    checked = AuditEvent.objects.get(event=AuditEvent.KEY_CHECKED, target_id=str(key.id))
    assert checked.metadata["to"] == KeyStatus.INVALID
    run = only_run()
    assert (run.status, run.error_kind) == (RunStatus.FAILED, "auth")


def test_provider_429_is_a_rate_limit_error_with_retry_after_forwarded(server, cast, keys, simulator, no_retries):
    simulator.enqueue("openai", {"base": "429", "fault": {"retry_after_s": 7}})
    with pytest.raises(openai.RateLimitError) as raised:
        sdk(server, cast.admin_a.api_secret).chat.completions.create(
            model="sim-openai/fake/echo", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert raised.value.response.headers["retry-after"] == "7"
    assert (only_run().status, only_run().error_kind) == (RunStatus.FAILED, "rate_limit")


def test_provider_quota_429_says_insufficient_quota_and_no_retry(server, cast, keys):
    with pytest.raises(openai.RateLimitError) as raised:
        sdk(server, cast.admin_a.api_secret).chat.completions.create(
            model="sim-openai/fake/429_quota", messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.code == "insufficient_quota"
    assert raised.value.response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    ("flavour", "scenario", "status"),
    [("openai", "500", 500), ("anthropic", "529", 503), ("groq", "498", 503)],
)
def test_provider_server_errors_after_retries_are_internal_server_errors(
    server, cast, keys, simulator, fast_retries, flavour, scenario, status
):
    with pytest.raises(openai.InternalServerError) as raised:
        sdk(server, cast.admin_a.api_secret).chat.completions.create(
            model=f"sim-{flavour}/fake/{scenario}", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert raised.value.status_code == status
    # The proxy retried (three attempts) and tells the SDK not to multiply them.
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert len([r for r in simulator.requests() if r["path"].endswith(("/chat/completions", "/messages"))]) == 3
    assert only_run().status == RunStatus.FAILED


def test_a_failed_attempt_before_the_first_token_is_retried_invisibly(server, cast, keys, simulator, fast_retries):
    simulator.enqueue("openai", "500")
    completion = sdk(server, cast.admin_a.api_secret).chat.completions.create(
        model="sim-openai/fake/echo", messages=[{"role": "user", "content": "again"}]
    )
    assert completion.choices[0].message.content == "You asked: again"
    run = only_run()
    assert run.status == RunStatus.SUCCEEDED
    assert UsageRecord.objects.filter(run=run).count() == 1  # the failed attempt reported no usage


def test_a_provider_that_stalls_before_answering_is_a_gateway_timeout(server, cast, keys, simulator, no_retries):
    simulator.enqueue("openai", {"base": "stall", "fault": {"after_events": 0, "stall_ms": 1500}})
    with pytest.raises(openai.InternalServerError) as raised:
        sdk(server, cast.admin_a.api_secret).chat.completions.create(
            model="sim-openai/fake/echo", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert raised.value.status_code == 504
    assert only_run().error_kind == "timeout"


@pytest.mark.parametrize("flavour", ["openai", "anthropic"])
def test_a_midstream_error_reaches_the_sdk_as_an_error_event(server, cast, keys, simulator, flavour):
    # After a few text deltas (an error before any content would be retried, then answered with a status).
    simulator.enqueue(flavour, {"base": "midstream_error", "fault": {"after_events": 6}})
    stream = sdk(server, cast.admin_a.api_secret).chat.completions.create(
        model=f"sim-{flavour}/fake/echo", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    received: list[Any] = []
    with pytest.raises(openai.APIError):
        received.extend(stream)
    assert any(c.choices and c.choices[0].delta.content for c in received)  # the error came after content
    run = only_run()
    assert run.status == RunStatus.FAILED
    assert run.error_kind in {"server", "overloaded"}


# --- Access and isolation ------------------------------------------------------------------------------------------


def test_missing_or_bad_org_key_is_401(server, cast, keys):
    body: Any = {"model": "sim-openai/fake/echo", "messages": [{"role": "user", "content": "hi"}]}
    missing = httpx.post(f"{server.api}/chat/completions", json=body)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "cf_live_000000000000_" + "0" * 49).chat.completions.create(**body)
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "not-a-key").models.list()
    # The dashboard session cookie does not authenticate these CSRF-exempt views.
    session = cast.admin_a.client()
    assert session.post("/api/v1/chat/completions", body, content_type="application/json").status_code == 401
    assert not Run.objects.exists()


def test_a_key_without_runs_write_gets_403(server, cast, keys):
    _, read_only = api_key_create(org=cast.org_a, name="reader", actor=cast.admin_a.user, scopes=[RUNS_READ])
    with pytest.raises(openai.PermissionDeniedError) as raised:
        sdk(server, read_only).chat.completions.create(
            model="sim-openai/fake/echo", messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.code == "insufficient_scope"
    assert not Run.objects.exists()
    assert not AuditEvent.objects.filter(event=AuditEvent.KEY_USED).exists()
    # Listing models only needs runs:read (nothing is checked yet, so it lists nothing); a key without it is refused.
    assert sdk(server, read_only).models.list().data == []
    _, write_only = api_key_create(org=cast.org_a, name="writer", actor=cast.admin_a.user, scopes=[RUNS_WRITE])
    with pytest.raises(openai.PermissionDeniedError):
        sdk(server, write_only).models.list()


def test_another_orgs_label_is_not_found_like_a_missing_one(server, cast, keys):
    client = sdk(server, cast.admin_b.api_secret)
    for model in ("sim-openai/fake/echo", "no-such-label/fake/echo", "fake-echo-without-label"):
        with pytest.raises(openai.NotFoundError) as raised:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert raised.value.code == "model_not_found"
        assert raised.value.param == "model"
    assert not Run.objects.exists()
    assert not AuditEvent.objects.filter(event=AuditEvent.KEY_USED).exists()
    # Org B's own key works for org B.
    assert client.chat.completions.create(model="b-openai/fake/echo", messages=[{"role": "user", "content": "hi"}])


def test_a_revoked_key_label_is_not_found(server, cast, keys):
    provider_key_revoke(key=keys["openai"], actor=cast.admin_a.user)
    with pytest.raises(openai.NotFoundError):
        sdk(server, cast.admin_a.api_secret).chat.completions.create(
            model="sim-openai/fake/echo", messages=[{"role": "user", "content": "hi"}]
        )


def test_revocations_made_anywhere_reach_the_gateways_caches_on_the_next_request(server, cast, keys, simulator):
    client = sdk(server, cast.admin_a.api_secret)

    def ask() -> Any:
        return client.chat.completions.create(
            model="sim-openai/fake/echo", messages=[{"role": "user", "content": "hi"}]
        )

    ask()
    ask()
    # Both lookups are now answered from this server's in-process caches.
    assert proxy_keys.cache.entries
    assert api_key_cache.cache.entries
    calls = len(simulator.requests())

    # Another server process revokes the provider key: the row changes and the shared generation moves, while this
    # process's cached entries stay in its memory.
    ProviderKey.objects.filter(pk=keys["openai"].pk).update(
        status=KeyStatus.REVOKED, sealed_secret="", kid=None, revoked_at=timezone.now()
    )
    cache.set(row_cache.GENERATION_KEY, "moved-by-another-process", timeout=None)
    with pytest.raises(openai.NotFoundError):
        ask()
    assert len(simulator.requests()) == calls  # no provider call with the revoked key

    # Same for the org API key.
    ApiKey.objects.filter(pk=cast.admin_a.api_key.pk).update(revoked_at=timezone.now())
    cache.set(row_cache.GENERATION_KEY, "moved-again", timeout=None)
    with pytest.raises(openai.AuthenticationError):
        ask()
    assert len(simulator.requests()) == calls


def test_labels_match_case_insensitively_and_split_at_the_first_slash(server, cast, keys, simulator):
    sdk(server, cast.dev_a.api_secret).chat.completions.create(
        model="SIM-OpenAI/fake/echo", messages=[{"role": "user", "content": "hi"}]
    )
    assert simulator.requests()[-1]["body"]["model"] == "fake/echo"
    assert only_run().created_by_api_key_id == cast.dev_a.api_key.id


def test_the_monthly_token_cap_refuses_with_429(server, cast, keys):
    cast.org_a.monthly_token_cap = 0
    cast.org_a.save(update_fields=["monthly_token_cap"])
    with pytest.raises(openai.RateLimitError) as raised:
        sdk(server, cast.admin_a.api_secret).chat.completions.create(
            model="sim-openai/fake/echo", messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.code == "token_cap_reached"
    assert raised.value.type == "insufficient_quota"
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert not Run.objects.exists()


BAD_BODIES = [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "not_an_object"),
    (b"[" * 100_000 + b"]" * 100_000, "deeply_nested"),
    (json.dumps({"model": "sim-openai/x"}).encode(), "no_messages"),
    (json.dumps({"model": "sim-openai/x", "messages": []}).encode(), "empty_messages"),
    (json.dumps({"model": "sim-openai/x", "messages": [{"role": "robot", "content": "x"}]}).encode(), "bad_role"),
    (json.dumps({"model": "sim-openai/x", "messages": [{"role": "system", "content": "x"}]}).encode(), "no_user"),
    (json.dumps({"model": 5, "messages": [{"role": "user", "content": "x"}]}).encode(), "model_not_text"),
    (
        json.dumps(
            {
                "model": "sim-openai/x",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            }
        ).encode(),
        "image_part",
    ),
    (
        json.dumps(
            {
                "model": "sim-openai/x",
                "messages": [{"role": "user", "content": "x"}],
                "stream_options": {"include_usage": True},
            }
        ).encode(),
        "stream_options_without_stream",
    ),
    (json.dumps({"model": "sim-openai/x", "messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), "n"),
    (
        json.dumps(
            {"model": "sim-openai/x", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}
        ).encode(),
        "temperature",
    ),
    (b'{"model": "sim-openai/x", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "nan"),
    (
        json.dumps({"model": "sim-openai/x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(),
        "max_tokens",
    ),
    (
        json.dumps({"model": "sim-openai/x", "messages": [{"role": "tool", "content": "x"}]}).encode(),
        "tool_without_id",
    ),
    (
        json.dumps(
            {"model": "sim-openai/x", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}
        ).encode(),
        "tool_without_function",
    ),
    (
        json.dumps(
            {
                "model": "sim-openai/x",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [WRITE_FILE],
                "tool_choice": {"type": "function", "function": {"name": "undeclared"}},
            }
        ).encode(),
        "tool_choice_unknown",
    ),
    # The run could not record the name: refused before the provider is called, not after.
    (
        json.dumps({"model": "sim-openai/" + "m" * 201, "messages": [{"role": "user", "content": "x"}]}).encode(),
        "model_too_long",
    ),
    # NUL bytes reach PostgreSQL through the label lookup and the run's model: each was a 500 (found by fuzzing).
    *(
        (json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]}).encode(), f"nul_model_{i}")
        for i, model in enumerate(["a\u0000b/x", "sim-openai/x\u0000", "sim-openai\u0000/x"])
    ),
]


def test_malformed_requests_get_openai_shaped_400s(server, cast, keys):
    # One test for every case: each transactional test costs a database flush.
    headers = {"Authorization": f"Bearer {cast.admin_a.api_secret}", "content-type": "application/json"}
    with httpx.Client(base_url=server.api, headers=headers) as client:
        for raw, case in BAD_BODIES:
            response = client.post("/chat/completions", content=raw)
            assert response.status_code == 400, (case, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, case
            assert error["type"] == "invalid_request_error", case
            assert error["message"], case
    assert not Run.objects.exists()


def _declared_only(server: Any, path: str, length: int, token: str) -> tuple[int, dict[str, Any]]:
    """POST with a declared Content-Length and no body byte sent: the answer of a server that refuses it unread.
    (With the body sent too, uvicorn, this test's server, closes with the body unread and the kernel may reset
    the connection before the client reads the answer; ``cesaflow.serve`` lingers instead: ``test_body_limits``.)"""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(head.encode())
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_oversized_bodies_and_wrong_methods_are_refused(server, cast, keys):
    headers = {"Authorization": f"Bearer {cast.admin_a.api_secret}"}
    status, body = _declared_only(server, "/api/v1/chat/completions", 2 * 1024 * 1024 + 1, cast.admin_a.api_secret)
    assert status == 413
    assert body["error"]["code"] == "request_too_large"
    assert set(body["error"]) == {"message", "type", "param", "code"}  # the proxy's error shape
    wrong = httpx.get(f"{server.api}/chat/completions", headers=headers)
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    assert httpx.post(f"{server.api}/models", headers=headers).status_code == 405


# --- Client disconnect ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["openai", "anthropic"])
def test_client_disconnect_closes_the_upstream_at_once_and_cancels_the_run(server, cast, keys, simulator, flavour):
    body = {"model": f"sim-{flavour}/fake/slow", "messages": [{"role": "user", "content": "go slowly"}], "stream": True}
    headers = {"Authorization": f"Bearer {cast.admin_a.api_secret}"}
    client = httpx.Client(timeout=10)
    with client.stream("POST", f"{server.api}/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        frames = 0
        for line in response.iter_lines():
            frames += line.startswith("data: ")
            if frames >= 3:
                break
        closed_at = time.monotonic()
    client.close()  # the socket goes away here: what a user pressing "stop" in an IDE does

    entry = simulator.wait_for(lambda e: e["client_closed"], timeout=2.0)
    noticed_after = time.monotonic() - closed_at
    wait_until(lambda: Run.objects.filter(status=RunStatus.CANCELLED).exists())

    # The upstream stream stopped long before its end (about 40 events at 80 ms each).
    assert not entry["completed"]
    assert entry["events_sent"] < 20
    assert noticed_after < 1.0, noticed_after  # generous for a loaded CI machine; typically a few ms
    run = only_run()
    assert (run.status, run.error_kind, run.usage_complete) == (RunStatus.CANCELLED, "cancelled", False)
    assert run.finished_at is not None
    if flavour == "anthropic":
        # message_start already said how many input tokens the call used: that much is known and billed.
        assert run.input_tokens > 0
        assert list(UsageRecord.objects.filter(run=run).values_list("complete", flat=True)) == [False]
    else:
        assert UsageRecord.objects.filter(run=run).count() == 0  # OpenAI reports usage only at the end


# --- The run's row: the first words do not wait for it, the last byte does ----------------------------------------


@contextlib.contextmanager
def _rows_held(model: Any, pk: Any) -> Iterator[None]:
    """Hold one row FOR UPDATE in this test's connection until the block ends. The org's row: no run of the org can
    commit meanwhile (its deferred foreign key check waits for the lock at commit). The provider key's row: the
    run's transaction waits at its first use of the key (``last_used_at``), before its commit."""
    with transaction.atomic():
        list(model.objects.select_for_update().filter(pk=pk).values_list("pk", flat=True))
        yield


def _read_until(chunks: Iterator[bytes], marker: bytes) -> bytes:
    """Read the stream up to ``marker`` (the client's read timeout fails the test if it never comes)."""
    received = b""
    while marker not in received:
        received += next(chunks)
    return received


LAST_WORDS = b'"finish_reason":"stop"'


def _completion_stream(client: httpx.Client, server: Any, cast: Any, model: str) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {cast.admin_a.api_secret}"}
    return client.stream("POST", f"{server.api}/chat/completions", json=body, headers=headers)


def _recv_until(conn: socket.socket, marker: bytes, received: bytes = b"") -> bytes:
    while marker not in received:
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed before {marker!r}"
        received += chunk
    return received


def test_the_answer_does_not_wait_for_the_runs_row_and_done_does(server, cast, keys):
    body = json.dumps(
        {"model": "sim-openai/fake/echo", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
    head = (
        f"POST /api/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {cast.admin_a.api_secret}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn, contextlib.ExitStack() as held:
        held.enter_context(_rows_held(Organization, cast.org_a.id))
        conn.sendall(head + body)
        # The whole answer arrives while the run's row cannot be committed, already named after the run...
        received = _recv_until(conn, LAST_WORDS)
        found = re.search(rb"x-cesaflow-run-id: ([0-9a-f-]{36})", received, re.IGNORECASE)
        assert found is not None
        run_id = found[1].decode()
        assert f"chatcmpl-{uuid.UUID(run_id).hex}".encode() in received
        # ...and nothing more while it cannot: [DONE] waits for the row.
        conn.settimeout(0.5)
        with pytest.raises(TimeoutError):
            received += conn.recv(65536)
        assert b"[DONE]" not in received
        held.close()  # the lock goes: the row commits, then [DONE] follows
        conn.settimeout(10)
        received = _recv_until(conn, b"data: [DONE]\n\n", received)
        # Committed before [DONE] went out: visible at once, no waiting.
        assert Run.objects.filter(id=run_id, kind=RunKind.COMPLETION).exists()
        assert AuditEvent.objects.filter(event=AuditEvent.KEY_USED, metadata__reference=run_id).exists()


def test_a_call_whose_run_cannot_be_written_ends_with_an_error_frame_not_done(server, cast, keys):
    with httpx.Client(timeout=10) as client, contextlib.ExitStack() as held:
        held.enter_context(_rows_held(ProviderKey, keys["openai"].id))
        with _completion_stream(client, server, cast, "sim-openai/fake/echo") as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            _read_until(chunks, LAST_WORDS)
            # The caller's key is deleted before the run's row commits: the row's foreign key check then fails.
            ApiKey.objects.filter(id=cast.admin_a.api_key.id).delete()
            held.close()
            rest = b"".join(chunks)
    assert b"[DONE]" not in rest
    frames = [frame for frame in rest.split(b"\n\n") if frame]
    assert json.loads(frames[-1][len(b"data: ") :]) == {
        "error": {
            "message": "The proxy failed unexpectedly.",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert not Run.objects.exists()
    assert not AuditEvent.objects.filter(event=AuditEvent.KEY_USED).exists()


def test_a_non_streaming_call_whose_run_cannot_be_written_stops_reading_the_answer(server, cast, keys, simulator):
    answers: list[httpx.Response] = []
    body = {"model": "sim-openai/fake/slow", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {cast.admin_a.api_secret}"}
    with contextlib.ExitStack() as held:
        held.enter_context(_rows_held(ProviderKey, keys["openai"].id))
        caller = threading.Thread(
            target=lambda: answers.append(httpx.post(f"{server.api}/chat/completions", json=body, headers=headers))
        )
        caller.start()
        simulator.wait_for(lambda e: e["events_sent"] >= 2, timeout=5.0)  # the answer is on its way
        ApiKey.objects.filter(id=cast.admin_a.api_key.id).delete()  # the run's row will fail its foreign key check
    caller.join(timeout=10)
    (answer,) = answers
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "internal_error"
    # The provider's answer (about 40 events, 80 ms apart) was not read to its end: the connection was dropped.
    entry = simulator.wait_for(lambda e: e["client_closed"], timeout=5.0)
    assert not entry["completed"]
    assert not Run.objects.exists()


def test_a_client_gone_while_its_run_is_being_written_still_gets_its_run_cancelled(server, cast, keys, simulator):
    with httpx.Client(timeout=10) as client, contextlib.ExitStack() as held:
        held.enter_context(_rows_held(Organization, cast.org_a.id))
        with _completion_stream(client, server, cast, "sim-openai/fake/slow") as response:
            assert response.status_code == 200
            _read_until(response.iter_raw(), b'"content":"')
        client.close()  # gone, with the run's row still waiting to commit
        simulator.wait_for(lambda e: e["client_closed"], timeout=5.0)  # the upstream is closed at once anyway
        held.close()
    wait_until(lambda: Run.objects.filter(status=RunStatus.CANCELLED).exists())
    run = only_run()
    assert (run.kind, run.error_kind) == (RunKind.COMPLETION, "cancelled")
    assert AuditEvent.objects.filter(event=AuditEvent.KEY_USED, metadata__reference=str(run.id)).exists()


# --- Model listing -------------------------------------------------------------------------------------------------


def test_models_lists_label_slash_model_for_the_callers_org_only(server, cast, keys, simulator):
    provider_key_create(
        org=cast.org_a,
        actor=cast.admin_a.user,
        provider=Provider.OPENAI,
        label="broken",
        secret="fake-invalid",
        base_url=simulator.base_urls["openai"],
    )
    # An admin's key (keys:write) checks the keys nothing is cached for on the way (audited); a developer's key
    # then reads the same cached lists.
    checked = {m.id for m in sdk(server, cast.admin_a.api_secret).models.list().data}
    models = sdk(server, cast.dev_a.api_secret).models.list()
    ids = {m.id for m in models.data}

    assert ids == checked
    assert {"sim-openai/fake-model", "sim-groq/fake-model", "sim-anthropic/fake-claude"} <= ids
    assert "sim-anthropic/fake/echo" in ids
    assert not any(i.startswith(("b-openai/", "broken/")) for i in ids)
    owners = {m.id.split("/", 1)[0]: m.owned_by for m in models.data}
    assert owners == {"sim-openai": "openai", "sim-groq": "groq", "sim-anthropic": "anthropic"}
    assert all(m.object == "model" and m.created == 0 for m in models.data)
    # The admin's listing checked the unchecked keys (audited) and found the broken one invalid.
    assert ProviderKey.objects.get(label="sim-openai").status == KeyStatus.VALID
    assert ProviderKey.objects.get(label="broken").status == KeyStatus.INVALID
    assert AuditEvent.objects.filter(event=AuditEvent.KEY_CHECKED, org=cast.org_a).count() == 4

    # Org B sees its own key's models and nothing of org A's.
    other = {m.id for m in sdk(server, cast.admin_b.api_secret).models.list().data}
    assert other
    assert all(i.startswith("b-openai/") for i in other)


def test_a_key_without_keys_write_never_causes_a_key_check(server, cast, keys, simulator):
    _, reader = api_key_create(org=cast.org_a, name="reader", actor=cast.admin_a.user, scopes=[RUNS_READ])
    for secret in (reader, cast.dev_a.api_secret):
        # Nothing is cached yet: the keys are absent ("not checked yet"), and nobody asked the provider.
        assert sdk(server, secret).models.list().data == []
    assert simulator.requests() == []
    assert not AuditEvent.objects.filter(event__in=[AuditEvent.KEY_USED, AuditEvent.KEY_CHECKED]).exists()
    assert not ProviderKey.objects.filter(last_checked_at__isnull=False).exists()

    # Once someone with keys:write has checked a key, its cached list is served, still without a provider call.
    provider_key_check(key=keys["groq"], actor=cast.admin_a.user)
    calls = len(simulator.requests())
    ids = {m.id for m in sdk(server, reader).models.list().data}
    assert "sim-groq/fake-model" in ids
    assert not any(i.startswith(("sim-openai/", "sim-anthropic/")) for i in ids)
    assert len(simulator.requests()) == calls


def test_an_unreachable_key_is_not_probed_again_on_every_listing(server, cast, simulator):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    provider_key_create(
        org=cast.org_a, actor=cast.admin_a.user, provider=Provider.OPENAI, label="gone", secret=SECRET, base_url=closed
    )
    admin = sdk(server, cast.admin_a.api_secret)
    for _ in range(3):
        assert admin.models.list().data == []
    # One check, whose "unreachable" outcome was cached for the next listings.
    assert AuditEvent.objects.filter(event=AuditEvent.KEY_CHECKED).count() == 1
    assert AuditEvent.objects.filter(event=AuditEvent.KEY_USED).count() == 1


def test_models_are_cached_briefly_per_org(server, cast, keys, simulator):
    client = sdk(server, cast.admin_a.api_secret)
    first = [m.id for m in client.models.list().data]
    calls_after_first = len(simulator.requests())
    second = [m.id for m in client.models.list().data]

    assert first == second
    assert len(simulator.requests()) == calls_after_first  # served from the cache: no provider call
    # Org B's listing is not served from org A's cache entries.
    sdk(server, cast.admin_b.api_secret).models.list()
    assert len(simulator.requests()) == calls_after_first + 1


# --- Content never stored ------------------------------------------------------------------------------------------


def test_prompts_and_answers_leave_no_trace_in_rows_dump_redis_or_logs(server, cast, keys, settings):
    settings.DEBUG = True  # worst case: Django logs SQL with its parameters
    prompt = canary.new_canary("PROMPT-CANARY-")
    body = {"model": "sim-anthropic/fake/echo", "messages": [{"role": "user", "content": prompt}], "stream": True}
    headers = {"Authorization": f"Bearer {cast.admin_a.api_secret}"}
    with canary.debug_logging() as logs:
        with httpx.stream("POST", f"{server.api}/chat/completions", json=body, headers=headers) as response:
            streamed = response.read().decode()
        completion = httpx.post(
            f"{server.api}/chat/completions", json={**body, "stream": False}, headers=headers
        ).json()
    # The canary really went through: the answer quotes it (echo), in small deltas.
    deltas = [json.loads(f[6:]) for f in streamed.split("\n\n") if f.startswith("data: {")]
    assert prompt in "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas if d["choices"])
    assert prompt in completion["choices"][0]["message"]["content"]

    for model in (Run, UsageRecord, AuditEvent):
        for row in model.objects.all():
            for column in model._meta.concrete_fields:
                assert prompt not in str(getattr(row, column.attname)), (model.__name__, column.name)
    collected = canary.Collected()
    canary.collect_pg_dump(collected)
    canary.collect_redis(collected)
    collected.add("logs", logs.text())
    assert canary.scan(collected, [prompt]) == []
    wait_until(lambda: Run.objects.filter(status=RunStatus.SUCCEEDED).count() == 2)


async def test_a_response_dropped_before_its_body_is_read_still_ends_the_run(cast, keys):
    """The client can leave between the view's return and the first body chunk: the generator never starts, so
    its ``finally`` never runs; the finalizer must still close the call and end the run."""
    request = AsyncRequestFactory().post(
        "/api/v1/chat/completions",
        {"model": "sim-openai/fake/slow", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        content_type="application/json",
        headers={"authorization": f"Bearer {cast.admin_a.api_secret}"},
    )
    try:
        response = await proxy_views.chat_completions(request)
        assert response.status_code == 200
        del response
        gc.collect()
        # The run's row may still be being written (the answer does not wait for it): poll for its end.
        deadline = time.monotonic() + 10
        while not await Run.objects.exclude(status=RunStatus.RUNNING).aexists():
            assert time.monotonic() < deadline, "the run did not end"
            await asyncio.sleep(0.01)
        run = await Run.objects.aget()
        assert (run.status, run.error_kind) == (RunStatus.CANCELLED, "cancelled")
    finally:
        await close_http_clients()
        await sync_to_async(connections.close_all)()  # the sync_to_async thread's connection, opened above
