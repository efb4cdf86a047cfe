#!/usr/bin/env python3
"""Find PostgreSQL and Redis for the test suite, or start throwaway ones, and print shell exports.

Order: the configured URLs if they answer; otherwise throwaway servers from the installed binaries under
var/test-services/ on spare ports; otherwise exit 1 naming exactly what to install.
Prints ``export CF_DATABASE_URL=…`` and ``export CF_REDIS_URL=…`` for ``eval``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / "var" / "test-services"
PG_PORT = 54329
REDIS_PORT = 63799


def reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def wait_for(port: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def log(message: str) -> None:
    print(message, file=sys.stderr)


def start_postgres() -> str | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = shutil.which("initdb") or (candidates[-1] if candidates else None)
    if initdb is None:
        return None
    bindir = Path(initdb).parent
    data = STATE / "pg"
    run_as: list[str] = []
    if os.geteuid() == 0:
        # initdb refuses to run as root; use the postgres system user the Debian package creates.
        if shutil.which("runuser") is None:
            return None
        run_as = ["runuser", "-u", "postgres", "--"]
    STATE.mkdir(parents=True, exist_ok=True)
    if run_as:
        shutil.chown(STATE, user="postgres")
    if not (data / "PG_VERSION").exists():
        subprocess.run(
            [*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    subprocess.run(
        [
            *run_as,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(STATE / "pg.log"),
            "-w",
            "start",
            "-o",
            f"-h 127.0.0.1 -p {PG_PORT} -k {data}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return f"postgres://postgres@127.0.0.1:{PG_PORT}/cesaflow" if wait_for(PG_PORT) else None


def start_redis() -> str | None:
    server = shutil.which("redis-server")
    if server is None:
        return None
    STATE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            server,
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            str(REDIS_PORT),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(STATE),
            "--logfile",
            str(STATE / "redis.log"),
        ],
        check=True,
    )
    return f"redis://127.0.0.1:{REDIS_PORT}/1" if wait_for(REDIS_PORT) else None


def ensure_database(database_url: str) -> None:
    """The configured database exists (pytest creates ``test_<name>`` beside it; the migrations check before pytest
    connects to ``<name>`` itself and would wait out the pool's timeout on a missing one)."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    if not name:
        return
    try:
        with psycopg.connect(parts._replace(path="/postgres").geturl(), autocommit=True, connect_timeout=5) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                log(f"Created the database {name!r}.")
    except psycopg.Error as exc:
        log(f"Could not check the database {name!r} ({type(exc).__name__}); pytest will say more.")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()

    database_url = args.database_url
    if not reachable(database_url, 5432):
        log(f"PostgreSQL not reachable at {urlsplit(database_url).netloc}; starting a throwaway instance.")
        started = start_postgres()
        if started is None:
            log("No PostgreSQL found. Install it (Debian: apt-get install postgresql) or set TEST_DATABASE_URL.")
            return 1
        database_url = started
    redis_url = args.redis_url
    if not reachable(redis_url, 6379):
        log(f"Redis not reachable at {urlsplit(redis_url).netloc}; starting a throwaway instance.")
        started = start_redis()
        if started is None:
            log("No Redis found. Install it (Debian: apt-get install redis-server) or set TEST_REDIS_URL.")
            return 1
        redis_url = started
    ensure_database(database_url)
    print(f"export CF_DATABASE_URL='{database_url}'")
    print(f"export CF_REDIS_URL='{redis_url}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
