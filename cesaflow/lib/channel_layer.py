"""The production channel layer: channels_redis's, with group sends in two round trips, one when nobody listens.

``RedisChannelLayer.group_send`` awaits four commands per group: expire stale members, list them, expire stale
messages of their channels, queue the message (a script). Most run events go to groups nobody is subscribed to at
that moment (a completion's own run group; the org's live list when no dashboard is open): every proxied completion
published four of them, eight round trips (issue #13); and every event a watcher does receive paid four, on the path
to its screen. Here ``group_send_many`` reads the members of all the groups it is given in one pipelined round trip
and stops there if none has any; otherwise it queues every message in a second one. Joining is the same:
``group_add_many`` adds a channel to several groups (each an add and an expiry) in one round trip, where
channels_redis awaits two commands per group (a run's websocket joins three groups before its first event); it
reads a key in that round trip too, after the joins (a run's watcher reads the authorization generation there:
``row_cache.ajoin_then_generation``).

Messages for this process's own channels do not travel through Redis: a group send hands each message to every
member channel created by this instance (``new_channel``) at once, on the loop that receives them, and queues it in
Redis only for the other members (other processes). A run executed in the process that serves its stream (the
inline executor claims a run on attach) thus reaches its watcher's screen without two round trips out and one back
(issue #13: the run stream's first words). ``receive`` is channels_redis's, with one change that local delivery
needs: the receiver that pops the process's Redis queue (one at a time, under the receive lock) also watches its own
channel's buffer, and returns a message delivered there at once; a wake-up it sends through Redis ends its pop (never
cancelled: a pop cancelled just as Redis hands it a message would lose it), which releases the lock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from channels.exceptions import ChannelFull
from channels_redis.core import RedisChannelLayer as _RedisChannelLayer

logger = logging.getLogger("cesaflow.channel_layer")

# A message that only ends a pop of the process's Redis queue (``_end_pop_soon``); never handed to a receiver.
_POKE = "cesaflow.layer.wake"

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
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The loop this instance's channels are received on (the first one that made a channel; another once that
        # one is closed), and the groups those channels joined: group -> channel -> when it joined.
        self._local_loop: asyncio.AbstractEventLoop | None = None
        self._local_groups: dict[str, dict[str, float]] = defaultdict(dict)
        self._popping: asyncio.Task[None] | None = None  # the pop of the Redis queue in flight (holds the lock)
        self._popping_from = ""  # the queue it pops (the non-local part of a channel name: ``prefix.<client>!``)
        self._pokes: set[asyncio.Future[None]] = set()

    async def new_channel(self, prefix: str = "specific") -> str:
        loop = asyncio.get_running_loop()
        if self._local_loop is None or self._local_loop.is_closed():
            self._local_loop = loop
            self._local_groups.clear()  # the channels of a closed loop receive nothing more
        channel: str = await super().new_channel(prefix)
        return channel

    def _is_own(self, channel: str) -> bool:
        """A channel of this instance (``new_channel``): its messages end in this process's ``receive_buffer``."""
        return "!" in channel and self.non_local_name(channel).endswith(self.client_prefix + "!")

    def _on_local_loop(self) -> bool:
        return self._local_loop is not None and self._local_loop is asyncio.get_running_loop()

    async def group_add(self, group: str, channel: str) -> None:
        await self.group_add_many([group], channel)

    def is_at(self, url: str) -> bool:
        """Whether this layer's one Redis is the one at ``url`` (a key read through the layer is that Redis's)."""
        return len(self.hosts) == 1 and self.hosts[0].get("address") == url

    async def group_add_many(self, groups: Iterable[str], channel: str, *, then_get: str | None = None) -> Any:
        """Add ``channel`` to each of ``groups``: one pipelined round trip per Redis host. A channel of this instance
        joins locally too (before Redis: a message sent meanwhile reaches it).

        ``then_get``: a key read in the last round trip, after every group was joined (Redis runs one connection's
        commands in order): its raw value is returned, None when it has none or cannot be read. Read on the host
        of the last group: for a layer with one host (``is_at``)."""
        groups = list(groups)
        if not self.require_valid_channel_name(channel):
            raise ValueError(f"Channel name not valid: {channel!r}")
        if then_get is not None and self.ring_size != 1:
            raise ValueError("then_get needs a channel layer with one Redis host.")
        by_host = list(self._by_host(groups).items())
        now = time.time()
        local = self._is_own(channel) and self._on_local_loop()
        if local:
            for group in groups:
                self._local_groups[group][channel] = now
        value = None
        try:
            for index, (host, positions) in enumerate(by_host):
                pipe = self.connection(host).pipeline(transaction=False)
                for position in positions:
                    key = self._group_key(groups[position])
                    pipe.zadd(key, {channel: now})
                    # Everything in the group expires before this: the set goes when its last member would have.
                    pipe.expire(key, self.group_expiry)
                reading = then_get is not None and index == len(by_host) - 1
                if reading:
                    pipe.get(then_get)
                results = await pipe.execute(raise_on_error=False)
                if reading:
                    read = results.pop()
                    if isinstance(read, Exception):
                        logger.warning("%s not read with the join (%s)", then_get, type(read).__name__)
                    else:
                        value = read
                for result in results:
                    if isinstance(result, Exception):
                        raise result
        except BaseException:
            if local:
                self._leave_locally(groups, channel)
            raise
        return value

    async def group_discard(self, group: str, channel: str) -> None:
        self._leave_locally([group], channel)
        await super().group_discard(group, channel)

    def _leave_locally(self, groups: Iterable[str], channel: str) -> None:
        for group in groups:
            members = self._local_groups.get(group)
            if members is not None:
                members.pop(channel, None)
                if not members:
                    del self._local_groups[group]

    def _deliver_locally(self, sends: list[tuple[str, dict[str, Any]]]) -> dict[int, set[str]]:
        """Each message straight into the buffer of every member channel of this instance, as Redis would hand it
        over (serialized once and deserialized per member: the same checks, and a copy each); the channels served,
        by position in ``sends`` (Redis then queues the message for the other members only). A member past the
        group expiry is dropped, as Redis drops it; a full channel misses the message, as in Redis."""
        served: dict[int, set[str]] = {}
        if not self._local_groups or not self._on_local_loop():
            return served
        joined_after = time.time() - self.group_expiry
        serialized: dict[int, bytes] = {}
        for position, (group, message) in enumerate(sends):
            members = self._local_groups.get(group)
            for channel in [channel for channel, joined_at in (members or {}).items() if joined_at <= joined_after]:
                self._leave_locally([group], channel)
            if group in self._local_groups:
                serialized[position] = self.serialize(message)  # all of them before any is delivered
        full = 0
        for position, raw in serialized.items():
            served[position] = set(self._local_groups[sends[position][0]])
            for channel in served[position]:
                queue = self.receive_buffer[channel]
                if queue.qsize() >= self.get_capacity(channel):
                    full += 1
                    continue
                queue.put_nowait(self.deserialize(raw))
        if full:
            logger.info("group send: %d channel(s) over capacity, message dropped for them", full)
        return served

    async def receive(self, channel: str) -> dict[str, Any]:
        """channels_redis's ``receive``; for this instance's channels (``!``), the receiver holding the receive lock
        pops the Redis queue in a task of its own and returns as soon as its own buffer has a message, whichever
        comes first: a message delivered locally must not wait for the next one through Redis. The pop then ends
        with a wake-up sent through Redis (``_end_pop_soon``), hands any real message to the buffers and releases
        the lock (which the other receivers wait for meanwhile, as they do for any receiver's pop). A receiver
        cancelled during its pop ends it the same way."""
        if "!" not in channel:
            message: dict[str, Any] = await super().receive(channel)
            return message
        if not self.require_valid_channel_name(channel):
            raise ValueError(f"Channel name not valid: {channel!r}")
        real_channel = self.non_local_name(channel)
        if not real_channel.endswith(self.client_prefix + "!"):
            raise ValueError(f"Channel {channel!r} is not one of this channel layer's")
        loop = asyncio.get_running_loop()
        popping = self._popping
        pop_alive = popping is not None and not popping.done() and not popping.get_loop().is_closed()
        if self.receive_count == 0 and not pop_alive:
            self.receive_lock = asyncio.Lock()
            self.receive_event_loop = loop
        elif self.receive_event_loop is not loop:
            raise RuntimeError("Two event loops are trying to receive() on one channel layer at once!")
        self.receive_count += 1
        try:
            return await self._receive_own(channel, real_channel)
        finally:
            self.receive_count -= 1

    def _end_pop_soon(self, popping: asyncio.Future[None]) -> None:
        """Its receiver stops waiting for ``popping``: a message of no consequence through Redis ends the pop now
        (it was waiting for the next message of any channel of this process). A pop is never cancelled while it
        may be handed a message: it would lose that message."""
        if popping.done():
            return
        popping.add_done_callback(_retrieve)  # nobody awaits it any more: its failure is logged
        poke = asyncio.ensure_future(self.send(f"{self._popping_from}wake", {"type": _POKE}))  # into its queue
        self._pokes.add(poke)
        poke.add_done_callback(self._poked)

    def _poked(self, poke: asyncio.Future[None]) -> None:
        self._pokes.discard(poke)
        if not poke.cancelled() and poke.exception() is not None:  # Redis away: the pop ends with it anyway
            logger.warning("channel layer: wake-up not sent (%s)", type(poke.exception()).__name__)

    async def _receive_own(self, channel: str, real_channel: str) -> dict[str, Any]:
        lock: asyncio.Lock = self.receive_lock
        queue = self.receive_buffer[channel]
        while queue.empty():
            getting = asyncio.ensure_future(queue.get())
            acquiring = asyncio.ensure_future(lock.acquire())
            try:
                await asyncio.wait({getting, acquiring}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                _drop(getting, acquiring, lock)
                self.receive_buffer.pop(channel, None)
                raise
            if getting.done():
                _drop(None, acquiring, lock)
                return self._taken(channel, getting.result())
            getting.cancel()  # not done: nothing was taken from the queue
            # This receiver holds the lock: it pops the process's Redis queue, and watches its own buffer meanwhile.
            popping = self._popping = asyncio.ensure_future(self._pop_into_buffers(real_channel, lock))
            self._popping_from = real_channel
            getting = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait({getting, popping}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                getting.cancel()
                self._end_pop_soon(popping)
                self.receive_buffer.pop(channel, None)
                raise
            if getting.done():
                self._end_pop_soon(popping)
                return self._taken(channel, getting.result())
            getting.cancel()
            if not popping.cancelled():  # (cancelled: the pools were closed under it; the next pop starts over)
                popping.result()  # raises what the pop raised (a Redis error), as channels_redis's receive does
        return self._taken(channel, queue.get_nowait())

    def _taken(self, channel: str, message: dict[str, Any]) -> dict[str, Any]:
        queue = self.receive_buffer.get(channel)
        if queue is not None and queue.empty():
            del self.receive_buffer[channel]
        return message

    async def _pop_into_buffers(self, real_channel: str, lock: asyncio.Lock) -> None:
        """One message off the process's Redis queue, into the buffer of the channel it is for; then the lock goes
        to the next receiver."""
        try:
            message_channel, message = await self.receive_single(real_channel)
            if message.get("type") != _POKE:
                for name in message_channel if isinstance(message_channel, list) else [message_channel]:
                    self.receive_buffer[name].put_nowait(message)
        finally:
            lock.release()

    async def close_pools(self) -> None:
        popping = self._popping
        if popping is not None and not popping.done() and popping.get_loop() is asyncio.get_running_loop():
            self._end_pop_soon(popping)
            await asyncio.wait({popping}, timeout=1.0)
            popping.cancel()  # the wake-up did not get through: its connection is about to close anyway
        await super().close_pools()

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """channels_redis's ``send`` in one pipelined round trip where it awaits four commands (expire the channel's
        stale messages, count them, queue, renew the key's expiry): the same script as a group send's. ``ChannelFull``
        when the channel holds its capacity already, as there. The wake-up that ends a pop (``_end_pop_soon``) goes
        this way: one for every message delivered locally while the receiver's pop is in flight, which on a run
        executed where its watcher is served can be each of its events (issue #13)."""
        if not isinstance(message, dict) or "__asgi_channel__" in message:
            raise ValueError("A message is a dict without the reserved __asgi_channel__ key.")
        self.require_valid_channel_name(channel)  # raises TypeError, as channels_redis's send does
        real_channel = channel
        if "!" in channel:
            message = {**message, "__asgi_channel__": channel}
            real_channel = self.non_local_name(channel)
            host = self.consistent_hash(channel)
        else:
            host = next(self._send_index_generator)
        key = self.prefix + real_channel
        pipe = self.connection(host).pipeline(transaction=False)
        pipe.zremrangebyscore(key, min=0, max=int(time.time()) - int(self.expiry))
        pipe.eval(
            _QUEUE_TO_CHANNELS, 1, key, self.serialize(message), self.get_capacity(channel), time.time(), self.expiry
        )
        _, full = await pipe.execute()
        if int(full):
            raise ChannelFull()

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await self.group_send_many([(group, message)])

    async def group_send_many(self, sends: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """``group_send`` for each ``(group, message)``, in order, in two pipelined round trips per Redis host: the
        groups' members (stale ones expired first), then, for groups that have some, the messages queued to the
        members' channels (the stale messages there expired first, a full channel skipped), as channels_redis does
        in four round trips per group."""
        sends = list(sends)
        by_host = self._by_host([group for group, _ in sends])  # every name checked before anything is sent
        served = self._deliver_locally(sends)
        members: dict[int, list[str]] = {}
        oldest = int(time.time()) - self.group_expiry
        for host, positions in by_host.items():
            pipe = self.connection(host).pipeline(transaction=False)
            for position in positions:
                key = self._group_key(sends[position][0])
                pipe.zremrangebyscore(key, min=0, max=oldest)
                pipe.zrange(key, 0, -1)
            results = await pipe.execute()
            for position, names in zip(positions, results[1::2], strict=True):
                local = served.get(position, ())
                remote = [name.decode() for name in names if name.decode() not in local]
                if remote:
                    members[position] = remote
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


def _retrieve(task: asyncio.Future[Any]) -> None:
    """A pop that outlived its receiver and failed: logged here, not as an exception nobody retrieved (the next
    receiver's pop meets the same Redis trouble and raises it)."""
    if not task.cancelled() and task.exception() is not None:
        logger.warning("channel layer: receive failed (%s)", type(task.exception()).__name__)


def _drop(getting: asyncio.Future[Any] | None, acquiring: asyncio.Future[Any], lock: asyncio.Lock) -> None:
    """Abandon a receiver's waits: a queue read not done takes nothing; a lock it was granted is released."""
    if getting is not None:
        getting.cancel()
    if acquiring.done():
        if not acquiring.cancelled() and acquiring.exception() is None and acquiring.result() is True:
            lock.release()
    else:
        acquiring.cancel()


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
