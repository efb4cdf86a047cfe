"""``runs.api.proxy_call.ProxyCall.stream`` batching: the frames of the events decoded from one upstream read go out
as one write (one ASGI send), and the end of the answer goes out at once, before the run's end is recorded."""

from __future__ import annotations

import json

from keys.models import ProviderKey
from orgs.models import ApiKey, Organization
from orgs.tenancy import OrgContext
from runs.api.proxy_call import ProxyCall, drain_background
from runs.providers.events import ReadEnd, StopReason, TextDelta, TurnEnd, Usage
from runs.proxy import parse_completion_request


def _call() -> ProxyCall:
    completion = parse_completion_request(
        {"model": "main/m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    key = ProviderKey(label="main", provider="openai")
    context = OrgContext(org=Organization(name="o"), actor=ApiKey(name="k"), capabilities=frozenset())
    return ProxyCall(context=context, completion=completion, key=key)


def _deltas(write: bytes) -> list[str]:
    frames = [part for part in write.split(b"\n\n") if part.startswith(b"data: {")]
    chunks = [json.loads(frame[len(b"data: ") :]) for frame in frames]
    return [chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"]]


async def test_the_frames_of_one_upstream_read_go_out_as_one_write():
    call = _call()

    async def upstream():
        yield TextDelta("a")
        yield TextDelta("b")
        yield ReadEnd()
        yield TextDelta("c")
        yield Usage(input_tokens=3, output_tokens=3, complete=True)
        yield ReadEnd()
        yield TextDelta("d")
        yield TurnEnd(stop=StopReason.END, raw_reason="stop")

    call._events = upstream()
    writes = [write async for write in call.stream([])]

    assert len(writes) == 3
    assert _deltas(writes[0]) == ["", "a", "b"]  # the role chunk rides with the first read's deltas
    assert _deltas(writes[1]) == ["c"]
    assert _deltas(writes[2])[0] == "d"
    assert writes[2].endswith(b"data: [DONE]\n\n")  # the rest of the answer and [DONE] in the last write
    assert call.finished
    # The call's end, recorded off the response path, ends within this test's loop (left pending, it would hold up
    # the next teardown: tests/conftest.py waits for it).
    assert await drain_background(timeout_s=5) == 0
