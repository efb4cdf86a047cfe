"""CesaFlow's production server (``python -m cesaflow.serve``) in a subprocess on loopback, on the test database.

For tests that need the real socket layer (how a body arrives, what lands on disk). The server shares Redis (cache,
sessions, channel layer, with the same payload key) and the development keyring under ``var/`` with the test
process, and runs with a ``TMPDIR`` of its own so a test can look at everything it might write there.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.db import connection

from deploy.throwaway import free_port as free_port

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class LiveServer:
    port: int
    pid: int
    tmpdir: Path  # the server process's TMPDIR
    log: Path  # its stdout and stderr
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def database_url() -> str:
    """The test database (``test_…``) as a URL, from the connection the test process uses."""
    db = connection.settings_dict
    credentials = quote(db["USER"] or "", safe="")
    if db.get("PASSWORD"):
        credentials += ":" + quote(db["PASSWORD"], safe="")
    return f"postgres://{credentials}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or '5432'}/{db['NAME']}"


def fresh_clone_env(**settings: str) -> dict[str, str]:
    """This process's environment without its database, Redis and CesaFlow settings, as a fresh clone's processes
    see it (``make run``: SQLite, no Redis), with ``settings`` added."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CESAFLOW_", "DATABASE_URL", "REDIS_URL"))}
    return env | {"DJANGO_SETTINGS_MODULE": "cesaflow.settings", **settings}


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The server exited early:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"The server did not listen within {START_TIMEOUT} s.")


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@contextmanager
def live_server(workdir: Path, env: Mapping[str, str] | None = None) -> Iterator[LiveServer]:
    """Serve ``cesaflow.asgi:application`` with ``python -m cesaflow.serve`` until the block ends; ``env`` adds
    settings (``CESAFLOW_…``) for the server process. What the server said is printed afterwards (it never logs
    content or secrets), so a failure report shows it."""
    port = free_port()
    tmpdir = workdir / "server-tmp"
    tmpdir.mkdir()
    log = workdir / "server.log"
    server_env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "cesaflow.settings",
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "CESAFLOW_CHANNEL_LAYER_KEY": settings.CHANNEL_LAYER_KEY,
        "TMPDIR": str(tmpdir),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    argv = [sys.executable, "-m", "cesaflow.serve", "-v", "1", "-b", "127.0.0.1", "-p", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*argv, "cesaflow.asgi:application"], cwd=ROOT, env=server_env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port(port, process, log)
        yield LiveServer(port=port, pid=process.pid, tmpdir=tmpdir, log=log, process=process)
    finally:
        stop(process)
        print(log.read_text(errors="replace")[-4000:])
        shutil.rmtree(tmpdir, ignore_errors=True)
