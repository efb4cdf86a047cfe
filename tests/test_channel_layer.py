"""The production channel layer (``cesaflow.lib.channel_layer``): channels_redis's, against the real Redis, with
group sends that look up several groups' members in one round trip, skip the groups nobody listens to, and queue the
messages in a second one that channels_redis's own ``receive`` reads; messages for the sending instance's own
channels go straight to their buffers. ``other_process``: a second instance, whose channels are another process's
(its messages travel through Redis)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest
from channels.exceptions import ChannelFull
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers, get_channel_layer

from cesaflow.lib.channel_layer import RedisChannelLayer


@pytest.fixture
async def layer():
    layer = get_channel_layer()
    assert isinstance(layer, RedisChannelLayer)
    yield layer
    await layer.flush()


@pytest.fixture
async def other_process():
    other = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    yield other
    await other.close_pools()


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


async def test_a_member_past_the_group_expiry_is_dropped_not_sent_to(layer, other_process):
    stale = await other_process.new_channel()
    await other_process.group_add("expiring", stale)
    connection = layer.connection(layer.consistent_hash("expiring"))
    # As if it had joined longer ago than the group expiry (a consumer that died without leaving).
    await connection.zadd(layer._group_key("expiring"), {stale: int(time.time()) - layer.group_expiry - 10})
    await layer.group_send("expiring", {"type": "t", "n": 1})
    assert await connection.zcard(layer._group_key("expiring")) == 0
    await _nothing_for(other_process, stale)
    # The same holds for a channel of the sending instance, which gets its messages without Redis: dropped there
    # too (and not sent through Redis, where it is as old).
    own = await layer.new_channel()
    await layer.group_add("expiring", own)
    joined_long_ago = int(time.time()) - layer.group_expiry - 10
    layer._local_groups["expiring"][own] = joined_long_ago
    await connection.zadd(layer._group_key("expiring"), {own: joined_long_ago})
    await layer.group_send("expiring", {"type": "t", "n": 2})
    await _nothing_for(layer, own)
    assert "expiring" not in layer._local_groups
    # Joined again (fresh), it gets the next one.
    await layer.group_add("expiring", own)
    await layer.group_send("expiring", {"type": "t", "n": 3})
    assert (await layer.receive(own))["n"] == 3


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


async def test_group_add_many_reads_a_key_in_its_round_trip_once_joined(layer):
    """``then_get``: the key's raw value, read after the joins (the authorization generation of a run's watcher);
    None when the key has none or holds what GET cannot read, and the join holds either way."""
    channel = await layer.new_channel()
    connection = layer.connection(0)
    await connection.set("cf-test:then-get", b"token")
    await connection.sadd("cf-test:a-set", "member")
    try:
        assert await layer.group_add_many(["one", "two"], channel, then_get="cf-test:then-get") == b"token"
        assert await layer.group_add_many(["three"], channel, then_get="cf-test:missing") is None
        assert await layer.group_add_many(["four"], channel, then_get="cf-test:a-set") is None
        for group in ("one", "two", "three", "four"):
            assert await connection.zrange(layer._group_key(group), 0, -1) == [channel.encode()]
    finally:
        await connection.delete("cf-test:then-get", "cf-test:a-set")
    sharded = RedisChannelLayer(hosts=[{"address": "redis://127.0.0.1:1/0"}] * 2)
    with pytest.raises(ValueError, match="one Redis host"):
        await sharded.group_add_many(["one"], await sharded.new_channel(), then_get="cf-test:then-get")


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
        # A channel of the sending instance, which gets its messages without Redis, has the same capacity.
        own_small = await layer.new_channel()
        await layer.group_add_many(["crowded"], own_small)
        layer.channel_capacity = [(re.compile(re.escape(own_small)), 2)]
        for n in range(3, 6):
            await layer.group_send("crowded", {"type": "t", "n": n})
        assert [(await layer.receive(own_small))["n"] for _ in range(2)] == [3, 4]
        await _nothing_for(layer, own_small)
    finally:
        layer.channel_capacity = []
        await other_process.close_pools()


async def test_messages_past_the_expiry_are_dropped_from_a_channel_before_a_new_one_is_queued(layer, other_process):
    listener = await other_process.new_channel()
    await other_process.group_add("slow", listener)
    await layer.group_send("slow", {"type": "t", "n": 1})
    key = layer.prefix + layer.non_local_name(listener)
    connection = layer.connection(layer.consistent_hash(layer.non_local_name(listener)))
    (payload,) = await connection.zrange(key, 0, -1)
    await connection.zadd(key, {payload: time.time() - layer.expiry - 10})  # as if queued long ago, never read
    await layer.group_send("slow", {"type": "t", "n": 2})
    assert (await other_process.receive(listener))["n"] == 2
    await _nothing_for(other_process, listener)


async def test_a_channel_of_the_sending_instance_gets_its_messages_without_redis_and_the_others_through_it(
    layer, other_process
):
    own = await layer.new_channel()
    remote = await other_process.new_channel()
    await layer.group_add_many(["room", "hall"], own)
    await other_process.group_add("room", remote)
    # Redis no longer lists the own channel in "room": what it still receives did not come through Redis.
    connection = layer.connection(layer.consistent_hash("room"))
    await connection.zrem(layer._group_key("room"), own)
    await layer.group_send_many([("room", {"type": "t", "n": 1}), ("hall", {"type": "t", "n": 2})])
    assert [(await layer.receive(own))["n"] for _ in range(2)] == [1, 2]
    assert (await other_process.receive(remote))["n"] == 1
    # Exactly once each: "hall" lists the own channel in Redis too, and nothing was queued there for it.
    await _nothing_for(layer, own)
    await _nothing_for(other_process, remote)
    own_key = layer.prefix + layer.non_local_name(own)
    assert await layer.connection(layer.consistent_hash(layer.non_local_name(own))).zcard(own_key) == 0
    # After leaving, nothing more.
    await layer.group_discard("hall", own)
    await layer.group_send("hall", {"type": "t", "n": 3})
    await _nothing_for(layer, own)


async def test_a_message_redis_could_not_carry_is_refused_before_anyone_gets_it(layer):
    own = await layer.new_channel()
    await layer.group_add("strict", own)
    with pytest.raises(TypeError):
        await layer.group_send_many([("strict", {"type": "t", "n": 1}), ("strict", {"type": "t", "bad": {1, 2}})])
    await _nothing_for(layer, own)


async def test_each_own_member_gets_its_own_copy(layer):
    first, second = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("pair", first)
    await layer.group_add("pair", second)
    event = {"text": "a"}
    message = {"type": "t", "event": event}
    await layer.group_send("pair", message)
    got = await layer.receive(first)
    got["event"]["text"] = "changed"
    assert (await layer.receive(second))["event"]["text"] == "a"
    assert event["text"] == "a"


async def _holding_the_pop(layer: RedisChannelLayer, channel: str) -> asyncio.Future[dict[str, Any]]:
    """A receiver of ``channel`` that holds the receive lock, waiting in Redis's blocking pop."""
    receiver = asyncio.ensure_future(layer.receive(channel))
    async with asyncio.timeout(5):
        while layer._popping is None or layer._popping.done():
            await asyncio.sleep(0.01)
    assert layer.receive_lock.locked()
    return receiver


async def test_the_receiver_waiting_in_redis_gets_a_local_message_at_once_and_its_pop_ends(layer, other_process):
    waiting = await layer.new_channel()
    later = await layer.new_channel()
    await layer.group_add("local", waiting)
    receiver = await _holding_the_pop(layer, waiting)
    pop = layer._popping
    await layer.group_send("local", {"type": "t", "n": 1})
    async with asyncio.timeout(2):  # not the blocking pop's 5 s
        assert (await receiver)["n"] == 1
    # The pop is not cancelled (a message Redis hands it then would be lost): a wake-up through Redis ends it, and
    # the wake-up itself reaches nobody.
    async with asyncio.timeout(2):
        await asyncio.wait({pop})
    assert not pop.cancelled()
    assert pop.exception() is None
    assert not layer.receive_lock.locked()
    await _nothing_for(layer, waiting)
    # Messages through Redis still arrive (another process's direct send to a channel of this one).
    await other_process.send(later, {"type": "t", "n": 2})
    async with asyncio.timeout(5):
        assert (await layer.receive(later))["n"] == 2


async def test_a_receiver_cancelled_during_its_pop_ends_it_and_loses_nothing(layer, other_process):
    first = await layer.new_channel()
    second = await layer.new_channel()
    receiver = await _holding_the_pop(layer, first)
    pop = layer._popping
    receiver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await receiver
    async with asyncio.timeout(2):
        await asyncio.wait({pop})
    assert not pop.cancelled()
    await other_process.send(second, {"type": "t", "n": 1})
    async with asyncio.timeout(5):
        assert (await layer.receive(second))["n"] == 1


async def test_send_queues_in_order_until_the_channel_is_full_and_drops_stale_messages_first(layer, other_process):
    """``send`` in one round trip, read by channels_redis's ``receive`` in another process (a channel several
    processes may receive from): in order; a full channel refuses the next with ``ChannelFull`` and keeps what it
    holds; messages past the expiry are dropped first, so they do not count against the capacity."""
    layer.channel_capacity = [(re.compile(r"^shared\.work$"), 2)]
    try:
        await layer.send("shared.work", {"type": "t", "n": 1})
        await layer.send("shared.work", {"type": "t", "n": 2})
        with pytest.raises(ChannelFull):
            await layer.send("shared.work", {"type": "t", "n": 3})
        assert [(await other_process.receive("shared.work"))["n"] for _ in range(2)] == [1, 2]
        await asyncio.gather(*other_process.receive_cleaners)
        key = layer.prefix + "shared.work"
        connection = layer.connection(0)
        await layer.send("shared.work", {"type": "t", "n": 4})
        (payload,) = await connection.zrange(key, 0, -1)
        await connection.zadd(key, {payload: time.time() - layer.expiry - 10})  # as if queued long ago, never read
        await layer.send("shared.work", {"type": "t", "n": 5})
        await layer.send("shared.work", {"type": "t", "n": 6})  # the stale one no longer counts
        assert 0 < await connection.ttl(key) <= layer.expiry
        assert [(await other_process.receive("shared.work"))["n"] for _ in range(2)] == [5, 6]
    finally:
        layer.channel_capacity = []


async def test_send_to_another_process_channel_names_it_and_refuses_bad_input(layer, other_process):
    channel = await other_process.new_channel()
    await layer.send(channel, {"type": "t", "n": 1})
    assert await other_process.receive(channel) == {"type": "t", "n": 1}
    with pytest.raises(ValueError, match="reserved"):
        await layer.send(channel, {"type": "t", "__asgi_channel__": "x"})
    with pytest.raises(TypeError, match="Channel name must be"):
        await layer.send("no spaces allowed", {"type": "t"})
