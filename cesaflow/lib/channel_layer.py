"""The production channel layer: channels_redis's, with group sends that cost one round trip when nobody listens.

``RedisChannelLayer.group_send`` asks Redis twice before it knows whether a group has members (expire stale
members, then list them), one awaited command each. Most run events go to groups nobody is subscribed to at that
moment (a completion's own run group; the org's live list when no dashboard is open): every proxied completion
published four of them, eight round trips (issue #13). Here the two commands go in one pipelined round trip, and
``group_send_many`` checks several groups in that same round trip; a group with members is then sent to by
channels_redis's own ``group_send``, unchanged (which asks again: one more round trip only when someone listens).
Joining is the same: ``group_add_many`` adds a channel to several groups (each an add and an expiry) in one round
trip, where channels_redis awaits two commands per group (a run's websocket joins three groups before its first
event).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from channels_redis.core import RedisChannelLayer as _RedisChannelLayer


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
        """``group_send`` for each ``(group, message)``, in order; the groups' memberships are read in one pipelined
        round trip per Redis host, and groups without members are skipped."""
        sends = list(sends)
        listened: set[int] = set()
        oldest = int(time.time()) - self.group_expiry
        for host, positions in self._by_host([group for group, _ in sends]).items():
            pipe = self.connection(host).pipeline(transaction=False)
            for position in positions:
                key = self._group_key(sends[position][0])
                pipe.zremrangebyscore(key, min=0, max=oldest)
                pipe.zrange(key, 0, -1)
            results = await pipe.execute()
            listened.update(position for position, members in zip(positions, results[1::2], strict=True) if members)
        for position, (group, message) in enumerate(sends):
            if position in listened:
                await super().group_send(group, message)

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
