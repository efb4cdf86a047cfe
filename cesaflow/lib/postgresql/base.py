"""Django's PostgreSQL backend (``ENGINE = "cesaflow.lib.postgresql"``), its connection pool checking a connection
on checkout with ``check_pooled_connection`` rather than a round trip to the server.

Every request and every database hop takes a connection from the pool and hands it back (``cesaflow.lib.hops``), so
the check runs on each of them. psycopg_pool's own (``ConnectionPool.check_connection``, what Django installs for
``CONN_HEALTH_CHECKS``) sends an empty query and waits for the answer: a round trip each time, about 0.36 ms and
0.16 ms of CPU on these VMs (issue #13), most often to learn that a connection handed back a moment ago is still
there.

An idle connection hears nothing from the server unless the server ends it: a restart or a shutdown, an operator's
``pg_terminate_backend``, ``idle_session_timeout`` (each sends its error, then closes the socket; CesaFlow never
listens for notifications, the only other thing an idle session receives). So a connection whose socket has nothing
to read is one the server still holds, known without a round trip; one with something to read (or closed) gets
psycopg_pool's check, which reads what came and raises for a connection the server has ended (the pool then hands
out another), and passes one that only received a notice. Nothing is discarded without the server saying so. What
neither check can tell is a peer gone silently (no packet back): the round trip would wait there too, until the
connection's timeouts.
"""

from __future__ import annotations

import select
from typing import Any

import psycopg
from django.db.backends.postgresql import base
from psycopg_pool import ConnectionPool


def check_pooled_connection(conn: psycopg.Connection[Any]) -> None:
    """psycopg_pool's ``check``: return if ``conn`` may be handed out, raise if the server ended it."""
    if not conn.closed:
        idle = select.poll()
        idle.register(conn.fileno(), select.POLLIN)
        if not idle.poll(0):  # nothing to read, no hang-up, no error
            return
    ConnectionPool.check_connection(conn)


class DatabaseWrapper(base.DatabaseWrapper):
    @property
    def pool(self) -> ConnectionPool[Any] | None:
        """Django's pool (built with ``CONN_HEALTH_CHECKS``' check, psycopg_pool's), checking with
        ``check_pooled_connection`` instead. psycopg_pool takes its check only when the pool is built, which Django
        does, so it is set on the pool Django built; if psycopg_pool ever keeps it elsewhere, the pool goes on with
        its own check (slower, as correct; ``tests/test_db_pool.py`` says so)."""
        pool: ConnectionPool[Any] | None = super().pool  # type: ignore[misc]  # not in django-stubs
        if pool is not None and getattr(pool, "_check", None) is ConnectionPool.check_connection:
            pool._check = check_pooled_connection
        return pool
