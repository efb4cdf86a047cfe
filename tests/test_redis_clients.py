"""One redis-py client and pool per cache alias settings in the process (``cesaflow.lib.redis_clients``)."""

from __future__ import annotations

import threading

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
