"""A real ASGI server (uvicorn) in a thread, serving CesaFlow against the test database, for the proxy's tests.

The stock ``openai`` SDK and raw HTTP clients talk to it over loopback, so streaming, status codes and client
disconnects behave as in production (Django's test clients buffer responses and cannot hang up mid-stream).
Tests that use it need ``@pytest.mark.django_db(transaction=True)``: the server's own connections only see
committed rows.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn
from django.db import connection, connections


class AsgiServer:
    """``cesaflow.asgi.application`` on 127.0.0.1 and an ephemeral port, on its own event loop."""

    def __init__(self) -> None:
        from cesaflow.asgi import application  # Django is set up by pytest-django before this runs

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(application, lifespan="off", log_level="warning", access_log=False, loop="asyncio")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="asgi-test-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/api/v1"

    def _run(self) -> None:
        self._server.run(sockets=[self._socket])

    def start(self, timeout: float = 10.0) -> AsgiServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("The ASGI test server did not start.")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


@contextlib.contextmanager
def serving(django_db_blocker: object) -> Iterator[AsgiServer]:
    """Run the server for a test module; afterwards, close the connections its request threads left behind.

    Under ASGI every request runs its sync database work in a thread of its own; with persistent connections
    those would outlive the request and keep the test database from being dropped at the end of the session.
    """
    settings_dict = connections["default"].settings_dict
    saved_max_age = settings_dict.get("CONN_MAX_AGE", 0)
    settings_dict["CONN_MAX_AGE"] = 0  # close at the end of each request, as Django advises under ASGI
    server = AsgiServer().start()
    try:
        yield server
    finally:
        server.stop()
        settings_dict["CONN_MAX_AGE"] = saved_max_age
        with django_db_blocker.unblock(), connection.cursor() as cursor:  # type: ignore[attr-defined]
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            terminated = [row[0] for row in cursor.fetchall()]
            # Its own statement: in one WHERE clause the planner may call pg_terminate_backend before the filter.
            cursor.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [terminated])
            # pg_terminate_backend only signals: until those backends are gone, a pooled connection to one of them
            # still passes the pool's check on checkout, and the next test's queries die on it ("terminating
            # connection due to administrator command", CI's failure). Wait until they have exited.
            deadline = time.monotonic() + 10
            while terminated and time.monotonic() < deadline:
                cursor.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", [terminated])
                terminated = [row[0] for row in cursor.fetchall()]
                if terminated:
                    time.sleep(0.02)


def wait_until(predicate: object, timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll ``predicate()`` (the server works in another thread) until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
