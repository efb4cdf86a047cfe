"""Where sessions live: one record per signed-in browser, in Redis (production, tests) or in this process's memory
(the embedded default of ``make run``), behind one interface.

The store is an allowlist (security.md §1.5): a session exists only while its record does, so a flushed or
restarted Redis signs everyone out and can never bring a revoked session back. Records are keyed by the SHA-256 of
the session id (a Redis dump yields no usable id), expire by themselves (TTL = the nearer of the idle and the
absolute deadline), and each user has an index of their records for the Sessions page and "sign out everywhere".
An unreachable Redis raises ``SessionStoreUnavailable``: callers fail closed, never trust a token alone.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Protocol

from django.conf import settings


class SessionStoreUnavailable(Exception):
    """The session store cannot be reached: signed-in requests are refused (503) until it is back."""


def session_key(sid: str) -> str:
    """The store's name for a session id: its SHA-256, so neither Redis nor a page ever holds the id itself."""
    return hashlib.sha256(sid.encode()).hexdigest()


class HashRecord:
    """A frozen dataclass stored as a Redis hash: every field as a string, floats parsed back. Shared by the
    dashboard's session records and Nexus's operator sessions (``nexus.sessions``)."""

    def to_mapping(self) -> dict[str, str]:
        return {name: str(value) for name, value in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_mapping(cls, data: dict[str, str]) -> Any:
        """A record from the store, or None if it is incomplete (e.g. half-written): incomplete means gone."""
        try:
            values: dict[str, Any] = {}
            for field in fields(cls):  # type: ignore[arg-type]
                raw = data[field.name]
                values[field.name] = float(raw) if field.type == "float" else raw
        except (KeyError, ValueError):
            return None
        return cls(**values)

    @classmethod
    def from_redis(cls, data: dict[bytes, bytes]) -> Any:
        return cls.from_mapping({k.decode(): v.decode() for k, v in data.items()}) if data else None


def redis_call(operation: Any) -> Any:
    """Runs ``operation(client)`` on the session store's Redis; any Redis failure is ``SessionStoreUnavailable``
    (callers fail closed)."""
    from django_redis import get_redis_connection
    from redis.exceptions import RedisError

    try:
        return operation(get_redis_connection("sessions"))
    except RedisError as exc:
        raise SessionStoreUnavailable(type(exc).__name__) from None


@dataclass(frozen=True)
class SessionRecord(HashRecord):
    key: str  # session_key(sid)
    user_id: str
    created: float
    last_seen: float
    absolute_expiry: float
    refresh_hash: str  # SHA-256 of the refresh secret (the refresh cookie holds sid + secret)
    ip: str = ""
    user_agent: str = ""
    device: str = ""
    org_id: str = ""

    def idle_expiry(self) -> float:
        return self.last_seen + float(settings.SESSION_IDLE_SECONDS)

    def is_live(self, now: float) -> bool:
        return now < self.absolute_expiry and now < self.idle_expiry()

    def ttl(self, now: float) -> int:
        """Seconds the record should stay in the store from ``now`` (at least 1)."""
        return max(1, int(min(self.absolute_expiry, self.idle_expiry()) - now) + 1)


class SessionStore(Protocol):
    def create(self, record: SessionRecord, *, now: float) -> None: ...

    def get(self, key: str) -> SessionRecord | None: ...

    def update(self, key: str, *, now: float, last_seen: float | None = None, org_id: str | None = None) -> bool:
        """Changes a live record (never re-creates a deleted one). False if it is gone."""
        ...

    def delete(self, key: str, *, user_id: str) -> bool: ...

    def for_user(self, user_id: str) -> list[SessionRecord]: ...

    def delete_for_user(self, user_id: str, *, keep: str | None = None) -> list[str]:
        """Deletes every session of the user except ``keep``; returns the keys deleted."""
        ...


# --- Redis ----------------------------------------------------------------------------------------------------------

# Update a record only if it still exists: a touch racing a revocation must not resurrect a half record.
_UPDATE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


class RedisSessionStore:
    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    def _client(self) -> Any:
        from django_redis import get_redis_connection

        return get_redis_connection("sessions")

    def _record_key(self, key: str) -> str:
        return f"{self._prefix}:s:{key}"

    def _index_key(self, user_id: str) -> str:
        return f"{self._prefix}:u:{user_id}"

    def _run(self, operation: Any) -> Any:
        return redis_call(operation)

    def create(self, record: SessionRecord, *, now: float) -> None:
        def write(client: Any) -> None:
            pipe = client.pipeline(transaction=True)
            pipe.hset(self._record_key(record.key), mapping=record.to_mapping())
            pipe.expire(self._record_key(record.key), record.ttl(now))
            pipe.sadd(self._index_key(record.user_id), record.key)
            # Outlives every session it lists (each ends within SESSION_ABSOLUTE_SECONDS of its start).
            pipe.expire(self._index_key(record.user_id), int(settings.SESSION_ABSOLUTE_SECONDS) + 60)
            pipe.execute()

        self._run(write)

    def get(self, key: str) -> SessionRecord | None:
        record: SessionRecord | None = SessionRecord.from_redis(
            self._run(lambda client: client.hgetall(self._record_key(key)))
        )
        return record

    def update(self, key: str, *, now: float, last_seen: float | None = None, org_id: str | None = None) -> bool:
        record = self.get(key)
        if record is None:
            return False
        changed = replace(
            record,
            last_seen=record.last_seen if last_seen is None else last_seen,
            org_id=record.org_id if org_id is None else org_id,
        )
        args: list[Any] = [changed.ttl(now)]
        if last_seen is not None:
            args += ["last_seen", str(last_seen)]
        if org_id is not None:
            args += ["org_id", org_id]
        return bool(self._run(lambda client: client.eval(_UPDATE_IF_EXISTS, 1, self._record_key(key), *args)))

    def delete(self, key: str, *, user_id: str) -> bool:
        def remove(client: Any) -> bool:
            pipe = client.pipeline(transaction=True)
            pipe.delete(self._record_key(key))
            pipe.srem(self._index_key(user_id), key)
            deleted, _ = pipe.execute()
            return bool(deleted)

        return bool(self._run(remove))

    def for_user(self, user_id: str) -> list[SessionRecord]:
        def read(client: Any) -> list[SessionRecord]:
            keys = sorted(k.decode() for k in client.smembers(self._index_key(user_id)))
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(self._record_key(key))
            records, stale = [], []
            for key, data in zip(keys, pipe.execute(), strict=True):
                record = SessionRecord.from_redis(data)
                if record is None or record.user_id != user_id:
                    stale.append(key)
                else:
                    records.append(record)
            if stale:  # expired by TTL: tidy the index
                client.srem(self._index_key(user_id), *stale)
            return records

        result: list[SessionRecord] = self._run(read)
        return result

    def delete_for_user(self, user_id: str, *, keep: str | None = None) -> list[str]:
        def remove(client: Any) -> list[str]:
            keys = [k.decode() for k in client.smembers(self._index_key(user_id))]
            doomed = [key for key in keys if key != keep]
            if doomed:
                pipe = client.pipeline(transaction=True)
                pipe.delete(*(self._record_key(key) for key in doomed))
                pipe.srem(self._index_key(user_id), *doomed)
                pipe.execute()
            return doomed

        result: list[str] = self._run(remove)
        return result


# --- This process's memory (make run without Redis) ----------------------------------------------------------------


class LocalSessionStore:
    """The same semantics in one process: records with deadlines, an index per user, one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, tuple[SessionRecord, float]] = {}  # key -> (record, store deadline)
        self._index: dict[str, set[str]] = {}

    def _live(self, key: str, now: float) -> SessionRecord | None:
        entry = self._records.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            self._forget(key, entry[0].user_id)
            return None
        return entry[0]

    def _forget(self, key: str, user_id: str) -> None:
        self._records.pop(key, None)
        self._index.get(user_id, set()).discard(key)

    def create(self, record: SessionRecord, *, now: float) -> None:
        with self._lock:
            self._records[record.key] = (record, now + record.ttl(now))
            self._index.setdefault(record.user_id, set()).add(record.key)

    def get(self, key: str) -> SessionRecord | None:
        with self._lock:
            return self._live(key, time.time())

    def update(self, key: str, *, now: float, last_seen: float | None = None, org_id: str | None = None) -> bool:
        with self._lock:
            record = self._live(key, time.time())
            if record is None:
                return False
            if last_seen is not None:
                record = replace(record, last_seen=last_seen)
            if org_id is not None:
                record = replace(record, org_id=org_id)
            self._records[key] = (record, now + record.ttl(now))
            return True

    def delete(self, key: str, *, user_id: str) -> bool:
        with self._lock:
            existed = key in self._records
            self._forget(key, user_id)
            return existed

    def for_user(self, user_id: str) -> list[SessionRecord]:
        with self._lock:
            now = time.time()
            records = [self._live(key, now) for key in sorted(self._index.get(user_id, set()))]
            return [record for record in records if record is not None]

    def delete_for_user(self, user_id: str, *, keep: str | None = None) -> list[str]:
        with self._lock:
            doomed = [key for key in self._index.get(user_id, set()) if key != keep]
            for key in doomed:
                self._forget(key, user_id)
            return doomed


_local = LocalSessionStore()


def session_store() -> SessionStore:
    if settings.SESSION_STORE == "redis":
        return RedisSessionStore(settings.SESSION_STORE_PREFIX)
    return _local
