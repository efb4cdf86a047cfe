"""The production channel layer (``cesaflow.lib.channel_layer``): channels_redis's, against the real Redis, with
group sends that look up several groups' members in one round trip, skip the groups nobody listens to, and queue the
messages in a second one that channels_redis's own ``receive`` reads."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers, get_channel_layer

from cesaflow.lib.channel_layer import RedisChannelLayer


@pytest.fixture
async def layer():
    layer = get_channel_layer()
    assert isinstance(layer, RedisChannelLayer)
    yield layer
    await layer.flush()


async def test_group_send_many_reaches_each_listened_group_in_order_and_skips_the_rest(layer):
    first = await layer.new_channel()
    second = await layer.new_channel()
    await layer.group_add("watched", first)
    await layer.group_add("watched", second)
    await layer.group_add("other", second)
    await layer.group_send_many(
        [
            ("nobody", {"type": "t", "n": 0}),
            ("watched", {"type": "t", "n": 1}),
            ("other", {"type": "t", "n": 2}),
            ("watched", {"type": "t", "n": 3}),
        ]
    )
    assert [(await layer.receive(first))["n"] for _ in range(2)] == [1, 3]
    assert [(await layer.receive(second))["n"] for _ in range(3)] == [1, 2, 3]
    # A burst to one channel in one call keeps its order: the channel pops by score, and the scores within one
    # call strictly increase.
    await layer.group_send_many([("watched", {"type": "t", "n": n}) for n in range(60)])
    assert [(await layer.receive(first))["n"] for _ in range(60)] == list(range(60))
    # Nothing else arrived, and the unlistened group left nothing behind in Redis.
    connection = layer.connection(layer.consistent_hash("nobody"))
    assert await connection.zcard(layer._group_key("nobody")) == 0
    assert await connection.zcard(layer._group_key("watched")) == 2


async def test_a_member_past_the_group_expiry_is_dropped_not_sent_to(layer):
    stale = await layer.new_channel()
    await layer.group_add("expiring", stale)
    connection = layer.connection(layer.consistent_hash("expiring"))
    # As if it had joined longer ago than the group expiry (a consumer that died without leaving).
    await connection.zadd(layer._group_key("expiring"), {stale: int(time.time()) - layer.group_expiry - 10})
    await layer.group_send("expiring", {"type": "t", "n": 1})
    assert await connection.zcard(layer._group_key("expiring")) == 0
    await _nothing_for(layer, stale)


async def test_an_invalid_group_name_is_refused_before_anything_is_sent(layer):
    listener = await layer.new_channel()
    await layer.group_add("fine", listener)
    with pytest.raises((TypeError, ValueError)):
        await layer.group_send_many([("fine", {"type": "t"}), ("not valid!", {"type": "t"})])
    await _nothing_for(layer, listener)


async def _nothing_for(layer: RedisChannelLayer, channel: str) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await layer.receive(channel)


async def test_group_add_many_joins_every_group_with_its_expiry(layer):
    channel = await layer.new_channel()
    await layer.group_add_many(["one", "two"], channel)
    for group in ("one", "two"):
        connection = layer.connection(layer.consistent_hash(group))
        assert await connection.zrange(layer._group_key(group), 0, -1) == [channel.encode()]
        assert 0 < await connection.ttl(layer._group_key(group)) <= layer.group_expiry
    await layer.group_send_many([("one", {"type": "t", "n": 1}), ("two", {"type": "t", "n": 2})])
    assert [(await layer.receive(channel))["n"] for _ in range(2)] == [1, 2]


async def test_a_full_channel_misses_the_message_and_the_others_still_get_it(layer):
    other_process = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)  # its channels live under another key
    small = await other_process.new_channel()
    roomy = await layer.new_channel()
    await layer.group_add_many(["crowded"], small)
    await layer.group_add_many(["crowded"], roomy)
    layer.channel_capacity = [(re.compile(re.escape(small)), 2)]
    try:
        for n in range(3):
            await layer.group_send("crowded", {"type": "t", "n": n})
        # The small channel's process holds two messages; the third was dropped for it alone.
        assert [(await layer.receive(roomy))["n"] for _ in range(3)] == [0, 1, 2]
        assert [(await other_process.receive(small))["n"] for _ in range(2)] == [0, 1]
        await _nothing_for(other_process, small)
    finally:
        layer.channel_capacity = []
        await other_process.close_pools()


async def test_messages_past_the_expiry_are_dropped_from_a_channel_before_a_new_one_is_queued(layer):
    listener = await layer.new_channel()
    await layer.group_add("slow", listener)
    await layer.group_send("slow", {"type": "t", "n": 1})
    key = layer.prefix + layer.non_local_name(listener)
    connection = layer.connection(layer.consistent_hash(layer.non_local_name(listener)))
    (payload,) = await connection.zrange(key, 0, -1)
    await connection.zadd(key, {payload: time.time() - layer.expiry - 10})  # as if queued long ago, never read
    await layer.group_send("slow", {"type": "t", "n": 2})
    assert (await layer.receive(listener))["n"] == 2
    await _nothing_for(layer, listener)
