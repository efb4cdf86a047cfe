"""django-redis's connection factory (``CACHES[…]["OPTIONS"]["CONNECTION_FACTORY"]``) with one redis-py client,
and one pool, per distinct set of connection settings in the process.

Django gives every request (every thread and async context) cache instances of its own, and django-redis builds
a redis-py client for each on its first cache call: ``Redis.__init__`` fills a response-callback table of some two
hundred entries, ~150 µs of CPU, once per alias per request (issue #13: 5 % of a plain API request). redis-py's
client is thread-safe (every command takes a connection from the pool and gives it back), so one per settings
serves every request.

django-redis keys its pools by the URL alone, so two aliases on one Redis (``default`` and ``sessions``) shared
whichever pool was built first, with that alias's timeouts: the session store's short ones (fail closed within
2 s when Redis hangs) were silently the default alias's none whenever the default alias connected first. Here the
key is a digest of every connection setting (a URL's password stays out of the dict's keys).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, ClassVar

from django_redis.pool import ConnectionFactory
from redis import ConnectionPool, Redis


def _key(params: dict[str, Any]) -> str:
    return hashlib.sha256(repr(sorted(params.items())).encode()).hexdigest()


class SharedClientConnectionFactory(ConnectionFactory):  # type: ignore[misc]  # django-redis is untyped to mypy here
    _shared_pools: ClassVar[dict[str, ConnectionPool]] = {}
    _clients: ClassVar[dict[str, Redis]] = {}
    _lock: ClassVar = threading.Lock()

    def get_or_create_connection_pool(self, params: dict[str, Any]) -> ConnectionPool:
        key = _key(params)
        with self._lock:
            pool = self._shared_pools.get(key)
            if pool is None:
                pool = self._shared_pools[key] = self.get_connection_pool(params)
        return pool

    def get_connection(self, params: dict[str, Any]) -> Redis:
        key = _key(params)
        client = self._clients.get(key)
        if client is None:
            pool = self.get_or_create_connection_pool(params)
            with self._lock:
                client = self._clients.get(key)
                if client is None:
                    client = self._clients[key] = self.redis_client_cls(
                        connection_pool=pool, **self.redis_client_cls_kwargs
                    )
        return client
