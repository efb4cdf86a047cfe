"""Django's PostgreSQL backend (``ENGINE = "cesaflow.lib.postgresql"``), its connection pool checking a connection
on checkout with ``check_pooled_connection``, which skips the round trip for a connection handed back a moment ago.

Every request and every database hop takes a connection from the pool and hands it back (``cesaflow.lib.hops``), so
the check runs on each of them. psycopg_pool's own (``ConnectionPool.check_connection``, what Django installs for
``CONN_HEALTH_CHECKS``) sends an empty query and waits for the answer: a round trip each time, about 0.36 ms and
0.16 ms of CPU on these VMs (issue #13), most often to learn that a connection handed back a few milliseconds ago is
still there.

A connection the server ends (a restart or a shutdown, an operator's ``pg_terminate_backend``,
``idle_session_timeout``) gets the server's error and then the socket's end; CesaFlow never listens for
notifications, the only other thing an idle session receives. So a connection handed back less than
``QUIET_TRUSTED_S`` ago whose socket has nothing to read is one the server still held a moment ago: handed out
without a round trip. Anything else gets psycopg_pool's check: a socket with something to read (it reads what came,
raises for a connection the server ended, so the pool hands out another, and passes one that only received a notice:
nothing is discarded without the server saying so), and a connection idle for longer, whose server may have gone
without a word (a host that crashed, a failover that moved the address, a NAT entry that expired): there the round
trip meets the reset that the poll cannot see. The window is HikariCP's idea (``aliveBypassWindowMs``): a server that
vanishes silently within it fails the next statement, as it would fail one in flight.
"""

from __future__ import annotations

import select
import time
import weakref
from typing import Any, Final

import psycopg
from django.db.backends.postgresql import base
from psycopg_pool import ConnectionPool

QUIET_TRUSTED_S: Final = 1.0

# When Django handed each pooled connection back (``DatabaseWrapper._close``); connections the pool opened itself, or
# dropped, are simply absent.
_handed_back: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = weakref.WeakKeyDictionary()


def handed_back(conn: psycopg.Connection[Any], *, at: float | None = None) -> None:
    """Note that ``conn`` went back to the pool (now, or at ``at``, a ``time.monotonic()`` reading)."""
    _handed_back[conn] = time.monotonic() if at is None else at


def check_pooled_connection(conn: psycopg.Connection[Any]) -> None:
    """psycopg_pool's ``check``: return if ``conn`` may be handed out, raise if the server ended it."""
    returned_at = _handed_back.get(conn)
    if returned_at is not None and time.monotonic() - returned_at < QUIET_TRUSTED_S and not conn.closed:
        quiet = select.poll()
        quiet.register(conn.fileno(), select.POLLIN)
        if not quiet.poll(0):  # nothing to read, no hang-up, no error
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

    def _close(self) -> None:
        if self.connection is not None and self.pool is not None:
            handed_back(self.connection)
        super()._close()  # type: ignore[misc]  # not in django-stubs
