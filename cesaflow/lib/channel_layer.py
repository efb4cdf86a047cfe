"""The production channel layer: channels_redis's, with group sends in two round trips, one when nobody listens.

``RedisChannelLayer.group_send`` awaits four commands per group: expire stale members, list them, expire stale
messages of their channels, queue the message (a script). Most run events go to groups nobody is subscribed to at
that moment (a completion's own run group; the org's live list when no dashboard is open): every proxied completion
published four of them, eight round trips (issue #13); and every event a watcher does receive paid four, on the path
to its screen. Here ``group_send_many`` reads the members of all the groups it is given in one pipelined round trip
and stops there if none has any; otherwise it queues every message in a second one. Joining is the same:
``group_add_many`` adds a channel to several groups (each an add and an expiry) in one round trip, where
channels_redis awaits two commands per group (a run's websocket joins three groups before its first event)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from channels_redis.core import RedisChannelLayer as _RedisChannelLayer

logger = logging.getLogger("cesaflow.channel_layer")

# Queues one message to each channel key given (KEYS; ARGV: one message per key, then one capacity per key, then the
# time and the expiry in seconds) unless the channel is full; returns how many were full. The store is
# channels_redis's own (4.3: a sorted set per channel, scored by time, that its ``receive`` pops), so its receivers
# read these messages as theirs.
_QUEUE_TO_CHANNELS = """
local n = #KEYS
local now, expiry = ARGV[2 * n + 1], ARGV[2 * n + 2]
local full = 0
for i = 1, n do
    if redis.call('ZCARD', KEYS[i]) < tonumber(ARGV[n + i]) then
        redis.call('ZADD', KEYS[i], now, ARGV[i])
        redis.call('EXPIRE', KEYS[i], expiry)
    else
        full = full + 1
    end
end
return full
"""


class RedisChannelLayer(_RedisChannelLayer):  # type: ignore[misc]  # channels_redis ships no type hints
    async def group_add(self, group: str, channel: str) -> None:
        await self.group_add_many([group], channel)

    async def group_add_many(self, groups: Iterable[str], channel: str) -> None:
        """Add ``channel`` to each of ``groups``: one pipelined round trip per Redis host."""
        groups = list(groups)
        if not self.require_valid_channel_name(channel):
            raise ValueError(f"Channel name not valid: {channel!r}")
        now = time.time()
        for host, positions in self._by_host(groups).items():
            pipe = self.connection(host).pipeline(transaction=False)
            for position in positions:
                key = self._group_key(groups[position])
                pipe.zadd(key, {channel: now})
                # Everything in the group expires before this: the set goes when its last member would have.
                pipe.expire(key, self.group_expiry)
            await pipe.execute()

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await self.group_send_many([(group, message)])

    async def group_send_many(self, sends: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """``group_send`` for each ``(group, message)``, in order, in two pipelined round trips per Redis host: the
        groups' members (stale ones expired first), then, for groups that have some, the messages queued to the
        members' channels (the stale messages there expired first, a full channel skipped), as channels_redis does
        in four round trips per group."""
        sends = list(sends)
        members: dict[int, list[str]] = {}
        oldest = int(time.time()) - self.group_expiry
        for host, positions in self._by_host([group for group, _ in sends]).items():
            pipe = self.connection(host).pipeline(transaction=False)
            for position in positions:
                key = self._group_key(sends[position][0])
                pipe.zremrangebyscore(key, min=0, max=oldest)
                pipe.zrange(key, 0, -1)
            results = await pipe.execute()
            for position, names in zip(positions, results[1::2], strict=True):
                if names:
                    members[position] = [name.decode() for name in names]
        if not members:
            return
        # The messages per Redis host of the members' channels, in send order: each channel keeps its order.
        batches: dict[int, list[tuple[list[str], list[Any]]]] = defaultdict(list)
        for position, (_, message) in enumerate(sends):
            if position in members:
                by_host, payloads, capacities = self._map_channel_keys_to_connection(members[position], message)
                for host, keys in by_host.items():
                    batches[host].append((keys, [*(payloads[key] for key in keys), *(capacities[key] for key in keys)]))
        expired_before = int(time.time()) - int(self.expiry)
        for host, batch in batches.items():
            pipe = self.connection(host).pipeline(transaction=False)
            queued_at: list[int] = []  # the position of each script's result among the pipeline's
            stamp = 0.0
            for keys, args in batch:
                for key in keys:
                    pipe.zremrangebyscore(key, min=0, max=expired_before)
                queued_at.append(len(pipe))
                # A channel pops its messages by this score: strictly increasing within the pipeline, so several
                # messages to one channel in one call keep their order even on a coarse clock.
                stamp = max(time.time(), stamp + 1e-6)
                pipe.eval(_QUEUE_TO_CHANNELS, len(keys), *keys, *args, stamp, self.expiry)
            results = await pipe.execute()
            full = sum(int(results[at]) for at in queued_at)
            if full:
                logger.info("group send: %d channel(s) over capacity, message dropped for them", full)

    def _by_host(self, groups: list[str]) -> dict[int, list[int]]:
        """The positions of ``groups`` per Redis host (channels_redis shards groups by name); every name is checked
        before anything is sent."""
        by_host: dict[int, list[int]] = defaultdict(list)
        for position, group in enumerate(groups):
            if not self.require_valid_group_name(group):
                raise ValueError(f"Group name not valid: {group!r}")
            by_host[self.consistent_hash(group)].append(position)
        return by_host


async def join_groups(layer: Any, groups: Iterable[str], channel: str) -> None:
    """Add ``channel`` to ``groups`` on any channel layer: in one round trip on this one, one by one on another (the
    in-memory layer of ``make run`` without Redis)."""
    if isinstance(layer, RedisChannelLayer):
        await layer.group_add_many(groups, channel)
        return
    for group in groups:
        await layer.group_add(group, channel)


async def send_to_groups(layer: Any, sends: Iterable[tuple[str, dict[str, Any]]]) -> None:
    """``group_send`` each ``(group, message)`` in order on any channel layer: unlistened groups skipped in one round
    trip on this one, one by one on another."""
    if isinstance(layer, RedisChannelLayer):
        await layer.group_send_many(sends)
        return
    for group, message in sends:
        await layer.group_send(group, message)
