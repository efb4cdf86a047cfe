"""Operator sessions: an opaque random token in the Nexus cookie, a record in the session store.

Apart from the dashboard's sessions (``orgs.sessions``) in every way that matters: another cookie (its own name,
``Path=/<NEXUS_PREFIX>/``, ``SameSite=Strict``), another key prefix in the store, another record shape, and no
JWT: the token is random and only its SHA-256 names the record, so a Redis dump yields no usable token.

Lifetime: the record's Redis TTL is set once, at sign-in, to the absolute lifetime (8 hours) and never extended;
activity only moves ``last_seen`` inside the record (an HSET keeps the TTL), which is what the idle timeout is
checked against. The store unreachable raises ``SessionStoreUnavailable``: Nexus answers 503, never trusts a cookie.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from django.conf import settings

from nexus.models import Operator
from orgs.sessions.store import HashRecord, SessionStoreUnavailable, redis_call, session_key

__all__ = ["OperatorSession", "SessionStoreUnavailable", "operator_session_authenticate", "operator_session_start"]

# last_seen (the idle clock) moves at most this often: one store write per quarter minute, not per request.
TOUCH_INTERVAL_SECONDS: Final = 15
MAX_TOKEN_LENGTH: Final = 128


@dataclass(frozen=True)
class OperatorSession(HashRecord):
    """One signed-in operator browser. ``key`` is ``session_key(token)``; the token itself is never stored."""

    key: str
    operator_id: str
    created: float
    last_seen: float
    absolute_expiry: float
    ip: str = ""
    user_agent: str = ""

    def idle_expiry(self) -> float:
        return self.last_seen + float(settings.NEXUS_SESSION_IDLE_SECONDS)

    def is_live(self, now: float) -> bool:
        return now < self.absolute_expiry and now < self.idle_expiry()


class OperatorSessionStore(Protocol):
    def create(self, record: OperatorSession, *, ttl: int) -> None: ...

    def get(self, key: str) -> OperatorSession | None: ...

    def touch(self, key: str, *, last_seen: float) -> bool:
        """Moves ``last_seen`` of a live record without touching its expiry. False if it is gone."""
        ...

    def delete(self, key: str) -> bool: ...


# HSET on an existing key keeps its TTL; the EXISTS check keeps a touch racing a sign-out from re-creating a
# half record (which would have no TTL at all).
_TOUCH_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_seen', ARGV[1])
return 1
"""


class RedisOperatorSessionStore:
    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    def record_key(self, key: str) -> str:
        return f"{self._prefix}:s:{key}"

    def _run(self, operation: Any) -> Any:
        return redis_call(operation)

    def create(self, record: OperatorSession, *, ttl: int) -> None:
        def write(client: Any) -> None:
            pipe = client.pipeline(transaction=True)
            pipe.hset(self.record_key(record.key), mapping=record.to_mapping())
            pipe.expire(self.record_key(record.key), ttl)  # the only EXPIRE this record ever gets
            pipe.execute()

        self._run(write)

    def get(self, key: str) -> OperatorSession | None:
        record: OperatorSession | None = OperatorSession.from_redis(
            self._run(lambda client: client.hgetall(self.record_key(key)))
        )
        return record

    def touch(self, key: str, *, last_seen: float) -> bool:
        return bool(self._run(lambda client: client.eval(_TOUCH_IF_EXISTS, 1, self.record_key(key), str(last_seen))))

    def delete(self, key: str) -> bool:
        return bool(self._run(lambda client: client.delete(self.record_key(key))))


class LocalOperatorSessionStore:
    """The same semantics in this process's memory (``make run`` without Redis)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, tuple[OperatorSession, float]] = {}  # key -> (record, store deadline)

    def _live(self, key: str) -> OperatorSession | None:
        entry = self._records.get(key)
        if entry is None:
            return None
        if entry[1] <= time.time():
            del self._records[key]
            return None
        return entry[0]

    def create(self, record: OperatorSession, *, ttl: int) -> None:
        with self._lock:
            self._records[record.key] = (record, time.time() + ttl)

    def get(self, key: str) -> OperatorSession | None:
        with self._lock:
            return self._live(key)

    def touch(self, key: str, *, last_seen: float) -> bool:
        with self._lock:
            record = self._live(key)
            if record is None:
                return False
            self._records[key] = (replace(record, last_seen=last_seen), self._records[key][1])
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._records.pop(key, None) is not None


_local = LocalOperatorSessionStore()


def operator_session_store() -> OperatorSessionStore:
    if settings.SESSION_STORE == "redis":
        return RedisOperatorSessionStore(f"{settings.SESSION_STORE_PREFIX}:nexus")
    return _local


# --- Services -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorSessionState:
    """What a Nexus cookie amounts to: a live session and its operator, or nothing (``clear``: delete the cookie)."""

    operator: Operator | None = None
    record: OperatorSession | None = None
    clear: bool = False


NO_SESSION: Final = OperatorSessionState()
ENDED: Final = OperatorSessionState(clear=True)


def operator_session_start(
    *, operator: Operator, ip: str | None, user_agent: str, now: float | None = None
) -> tuple[str, OperatorSession]:
    """A new session (a new token every time: no fixation). Returns (token for the cookie, record)."""
    now = time.time() if now is None else now
    token = secrets.token_urlsafe(32)
    lifetime = int(settings.NEXUS_SESSION_ABSOLUTE_SECONDS)
    record = OperatorSession(
        key=session_key(token),
        operator_id=str(operator.pk),
        created=now,
        last_seen=now,
        absolute_expiry=now + lifetime,
        ip=ip or "",
        user_agent=user_agent[:256],
    )
    operator_session_store().create(record, ttl=lifetime)
    return token, record


def operator_session_authenticate(token: str | None, *, now: float | None = None) -> OperatorSessionState:
    """The operator behind a Nexus cookie: the record must exist, be live (absolute and idle deadlines) and belong
    to an active, enrolled operator. DB and store reads; sync. Raises ``SessionStoreUnavailable``."""
    if not token:
        return NO_SESSION
    if len(token) > MAX_TOKEN_LENGTH:
        return ENDED
    now = time.time() if now is None else now
    store = operator_session_store()
    record = store.get(session_key(token))
    if record is None:
        return ENDED
    operator = Operator.objects.filter(pk=record.operator_id, is_active=True, totp_enrolled_at__isnull=False).first()
    if operator is None or not record.is_live(now):
        store.delete(record.key)
        return ENDED
    if now - record.last_seen >= TOUCH_INTERVAL_SECONDS:
        if not store.touch(record.key, last_seen=now):
            return ENDED  # signed out in the meantime
        record = replace(record, last_seen=now)
    return OperatorSessionState(operator=operator, record=record)


def operator_session_end(record: OperatorSession) -> None:
    """Sign-out: the record is deleted server-side, so the cookie is worthless even if a copy survives."""
    operator_session_store().delete(record.key)
