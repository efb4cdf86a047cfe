"""One redis-py client and pool per cache alias settings in the process (``cesaflow.lib.redis_clients``)."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
from django.core.cache import caches
from django_redis import get_redis_connection


def test_each_alias_keeps_its_own_timeouts():
    """django-redis shared one pool per URL, so the session store's 2 s timeouts were the default alias's none
    whenever the default alias connected first: a hung Redis would have hung signed-in requests."""
    default = get_redis_connection("default")
    sessions = get_redis_connection("sessions")
    assert default.connection_pool is not sessions.connection_pool
    assert sessions.connection_pool.connection_kwargs["socket_timeout"] == 2
    assert sessions.connection_pool.connection_kwargs["socket_connect_timeout"] == 2
    # The default alias waits for a hung Redis no longer than 5 s either (it waited without limit).
    assert default.connection_pool.connection_kwargs["socket_timeout"] == 5
    assert sessions.ping()
    assert default.ping()


def test_requests_in_other_threads_share_the_client_and_its_pool():
    """Each thread (each request) has cache instances of its own; they no longer build a client each."""
    here = get_redis_connection("default")
    there: list[object] = []
    thread = threading.Thread(target=lambda: there.append(get_redis_connection("default")))
    thread.start()
    thread.join()
    assert there == [here]
    caches["default"].set("redis-clients-probe", "1", timeout=5)  # and the shared client works from here
    assert caches["default"].get("redis-clients-probe") == "1"
    caches["default"].delete("redis-clients-probe")


def test_a_redis_that_hangs_is_given_up_on_sessions_fail_closed_and_the_generation_falls_back(settings):
    """A Redis that accepts connections and never answers: each alias gives up at its own timeout (the default
    alias waited without limit), the session store fails closed, the authorization generation says it cannot tell
    (callers then ask the database)."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from cesaflow.lib.row_cache import generation
    from orgs.sessions.store import SessionStoreUnavailable, redis_call

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []

    def accept_and_say_nothing() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(silent.accept()[0])

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    settings.CACHES = {alias: {**config, "LOCATION": url} for alias, config in settings.CACHES.items()}
    try:
        with pytest.raises(RedisTimeoutError):
            caches["default"].get("anything")
        with pytest.raises(SessionStoreUnavailable):
            redis_call(lambda redis: redis.get("anything"))
        assert generation() is None
    finally:
        silent.close()
        for connection in held:
            connection.close()
