"""The pool's check on checkout (``cesaflow.lib.postgresql``), against the real server: a connection handed back a
moment ago passes without a round trip (Django's own connections too), one idle for longer is asked, one the server
ended is refused and the pool hands out another, and one that only received something from the server is asked and
kept."""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from cesaflow.lib.postgresql.base import QUIET_TRUSTED_S, check_pooled_connection, handed_back

pytestmark = pytest.mark.usefixtures("django_db_setup")


@pytest.fixture
def params() -> dict[str, Any]:
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the pool is PostgreSQL's")
    return {**connection.get_connection_params(), "autocommit": True}


@pytest.fixture
def admin(params: dict[str, Any]) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(**params) as conn:
        yield conn


def _last_heard(admin: psycopg.Connection[Any], conn: psycopg.Connection[Any]) -> datetime:
    """When the server last saw ``conn`` start or finish a statement (each autocommit query reads afresh)."""
    row = admin.execute("SELECT state_change FROM pg_stat_activity WHERE pid = %s", (conn.info.backend_pid,)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def _wait_readable(conn: psycopg.Connection[Any]) -> None:
    deadline = time.monotonic() + 10
    while not select.select([conn.fileno()], [], [], 0.05)[0]:
        assert time.monotonic() < deadline, "the server never wrote to the idle connection"


def test_a_connection_handed_back_a_moment_ago_passes_without_a_round_trip(params, admin):
    with psycopg.connect(**params) as conn:
        conn.execute("SELECT 1")
        handed_back(conn)
        heard = _last_heard(admin, conn)
        check_pooled_connection(conn)
        assert _last_heard(admin, conn) == heard
        assert conn.execute("SELECT 1").fetchone() == (1,)  # and it works


def test_a_connection_idle_for_longer_or_never_handed_back_is_asked(params, admin):
    with psycopg.connect(**params) as conn:
        conn.execute("SELECT 1")
        heard = _last_heard(admin, conn)
        check_pooled_connection(conn)  # opened by the pool itself: no hand-back known
        assert _last_heard(admin, conn) > heard
        handed_back(conn, at=time.monotonic() - QUIET_TRUSTED_S - 1)
        heard = _last_heard(admin, conn)
        check_pooled_connection(conn)  # its server may have gone without a word since
        assert _last_heard(admin, conn) > heard


def test_a_connection_the_server_ended_is_refused(params, admin):
    with psycopg.connect(**params) as conn:
        conn.execute("SELECT 1")
        handed_back(conn)
        # Waits (up to 10 s) until the backend has gone: its error and the socket's end are then on the way.
        assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", (conn.info.backend_pid,)).fetchone() == (True,)
        _wait_readable(conn)
        with pytest.raises(psycopg.OperationalError):
            check_pooled_connection(conn)


def test_the_pool_replaces_a_connection_the_server_ended(params, admin):
    with ConnectionPool(kwargs=params, min_size=1, max_size=1, check=check_pooled_connection, open=True) as pool:
        with pool.connection() as conn:
            ended = conn.info.backend_pid
            handed_back(conn)
        assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", (ended,)).fetchone() == (True,)
        with pool.connection(timeout=10) as conn:  # the pool's only connection was the ended one
            assert conn.info.backend_pid != ended
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_connection_that_only_received_something_is_asked_and_kept(params, admin):
    with psycopg.connect(**params) as conn:
        conn.execute("LISTEN cesaflow_pool_check")
        admin.execute("NOTIFY cesaflow_pool_check")
        _wait_readable(conn)
        handed_back(conn)
        heard = _last_heard(admin, conn)
        check_pooled_connection(conn)  # does not raise
        assert _last_heard(admin, conn) > heard  # it asked the server, which answered
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.django_db(transaction=True)
def test_djangos_pooled_connections_are_checked_without_a_round_trip(admin):
    from django.db import connection

    if not connection.settings_dict["OPTIONS"].get("pool"):
        pytest.skip("no pool configured")
    size = connection.settings_dict["OPTIONS"]["pool"]["max_size"]
    for _ in range(size + 1):  # every idle connection taken and handed back just now
        connection.ensure_connection()
        connection.close()
    rows = admin.execute(
        "SELECT pid, state_change FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchall()
    pooled = dict(rows)
    connection.ensure_connection()  # a checkout, and its check; no statement
    try:
        taken = connection.connection.info.backend_pid
        assert taken in pooled, "the pool opened a new connection rather than reuse an idle one"
        assert _last_heard(admin, connection.connection) == pooled[taken]
    finally:
        connection.close()
