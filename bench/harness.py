"""Processes under test: the provider simulator, CesaFlow and the floor under daphne and uvicorn.

Every child gets ``PR_SET_PDEATHSIG`` (it dies with the benchmark, even on ``kill -9``) and, when the machine has
more than one core, a CPU affinity: the server under test alone on core 0, the simulator and the load generator
on the others, so "per worker process" figures are not diluted by the load generator stealing the server's core.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from deploy.throwaway import HOST, ROOT, Child, free_port, postgres_cluster, production_env

BIN = Path(sys.executable).parent
PRIVATE_POSTGRES = "private"  # --database-url value: a throwaway cluster started for the run

# Tokens are 4 characters (the simulator's text_chunk_chars); one token = one SSE event.
TOKEN_CHARS = 4
PACED_EVENT_MS = 20  # 50 tokens/s


def _text(tokens: int) -> str:
    return ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * (tokens // 10 + 1))[: tokens * TOKEN_CHARS]


def _scenario(name: str, tokens: int, per_event_ms: int = 0) -> dict[str, object]:
    return {
        "name": name,
        "turns": [{"text": _text(tokens)}],
        "timing": {"first_token_ms": 0, "per_event_ms": per_event_ms},
        "stream_shape": {"text_chunk_chars": TOKEN_CHARS},
    }


# Model names (fake/<scenario>) and what they stream.
SCENARIOS = {
    "fast": _scenario("bench_fast", 10),  # sequential TTFT: a short answer, unpaced
    "burst": _scenario("bench_burst", 100),  # saturation: medium answers, unpaced
    "long": _scenario("bench_long", 2000),  # one long stream, unpaced
    "paced": _scenario("bench_paced", 50, PACED_EVENT_MS),  # 50 tokens/s for one second
    "paced_long": _scenario("bench_paced_long", 500, PACED_EVENT_MS),  # disconnect mid-stream
    "hold": _scenario("bench_hold", 300, 200),  # open streams for the memory figures (5 tokens/s)
}


# Every core this benchmark may use, read before ``pin_self`` moves it to the load's.
ALL_CPUS = set(os.sched_getaffinity(0))


def _cpu_sets() -> tuple[set[int] | None, set[int] | None]:
    cpus = sorted(ALL_CPUS)
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


SERVER_CPUS, LOAD_CPUS = _cpu_sets()


def pin_self(enabled: bool) -> None:
    """Move the benchmark (the load generator) off the server's core."""
    if enabled and LOAD_CPUS is not None:
        os.sched_setaffinity(0, LOAD_CPUS)


def _preexec(cpus: set[int] | None) -> Callable[[], None]:
    def run() -> None:
        # Die with the benchmark (PR_SET_PDEATHSIG = 1): no orphaned servers after a crash.
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)
        # An unpinned child (PostgreSQL) gets every core back: it would otherwise inherit this process's pin to the
        # load's core and share it with the load generator and the simulator (it did until 2026-12-02).
        os.sched_setaffinity(0, cpus if cpus is not None else ALL_CPUS)

    return run


@dataclass
class Harness:
    """Owns every child process and the generated configuration; ``close()`` stops them all."""

    workdir: Path
    database_url: str
    redis_url: str
    pin: bool = True
    # Where the servers under test, ``manage.py`` and the seeding run from (``bench.servers``); the simulator and
    # the load generator stay in this process's virtualenv.
    server_bin: Path = BIN
    children: list[Child] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    env_path: str = field(default_factory=lambda: os.environ.get("PATH", "/usr/bin:/bin"))

    def __post_init__(self) -> None:
        if self.database_url == PRIVATE_POSTGRES:
            self.database_url = self.start_private_postgres()
        # Production settings with throwaway secrets, generated per run: nothing here is reused anywhere.
        self.env = production_env(
            workdir=self.workdir,
            database_url=self.database_url,
            redis_url=self.redis_url,
            extra={
                "PATH": self.env_path,
                "CESAFLOW_CACHE_PREFIX": "cfbench",
                # The benchmark's one key makes thousands of calls a minute: limits far above that keep the rate
                # limit check's cost in the figures without ever refusing a call.
                "CESAFLOW_RATE_LIMIT_GATEWAY_KEY": "100000000/60",
                "CESAFLOW_RATE_LIMIT_GATEWAY_ORG": "100000000/60",
                "CESAFLOW_RATE_LIMIT_API_KEY": "100000000/60",
                "CESAFLOW_RATE_LIMIT_API_ORG": "100000000/60",
            },
        )

    # --- Services -------------------------------------------------------------------------------------------------

    def start_private_postgres(self) -> str:
        """A throwaway PostgreSQL cluster for this run only; returns the URL of its ``cesaflow_bench`` database.

        The proxy holds one database connection per open stream, and the memory figures open hundreds: on a shared
        server (max_connections 100, other people's test suites) that would fail their connections and ours.
        """
        data = self.workdir / "pg"
        try:
            run_as, bindir = postgres_cluster(data)
        except RuntimeError as exc:
            raise SystemExit(f"{exc} Or pass --database-url of an existing server.") from None
        port = free_port()
        # Run in the foreground as our child (not pg_ctl's daemon), so it dies with the benchmark like the rest.
        argv = [*run_as, str(bindir / "postgres"), "-D", str(data), "-h", HOST, "-p", str(port), "-k", str(data)]
        argv += ["-c", "max_connections=1000", "-c", "shared_buffers=128MB"]
        child = self.spawn("postgres", argv, port, {"PATH": self.env_path, "LANG": "C.UTF-8"}, None)
        wait_for_port(child, timeout=60)
        return f"postgres://postgres@{HOST}:{port}/cesaflow_bench"

    def reset_database(self) -> None:
        """Drop and recreate the bench database, then migrate it: every run starts from the same empty state."""
        import psycopg
        from psycopg import sql

        parts = urlsplit(self.database_url)
        name = parts.path.lstrip("/")
        if not name or "bench" not in name:
            raise SystemExit(f"Refusing to drop {name!r}: the bench database name must contain 'bench'.")
        admin_url = urlunsplit(parts._replace(path="/postgres"))
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._manage("migrate", "--noinput")

    def reset_redis(self) -> None:
        import redis

        redis.Redis.from_url(self.redis_url).flushdb()

    def _manage(self, *args: str) -> str:
        completed = subprocess.run(
            [str(self.server_bin / "python"), str(ROOT / "manage.py"), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if completed.returncode != 0:
            raise SystemExit(f"manage.py {' '.join(args)} failed:\n{completed.stderr[-2000:]}")
        return completed.stdout

    def seed_cesaflow(self, *, simulator_url: str, tap_url: str) -> dict[str, str]:
        """Org, org API key and provider keys (labels ``bench`` and ``benchtap``) via CesaFlow's services."""
        completed = subprocess.run(
            [str(self.server_bin / "python"), str(ROOT / "bench" / "cesaflow_setup.py"), simulator_url, tap_url],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if completed.returncode != 0:
            raise SystemExit(f"Seeding CesaFlow failed:\n{completed.stderr[-2000:]}")
        seeded: dict[str, str] = json.loads(completed.stdout.strip().splitlines()[-1])
        return seeded

    # --- Children -------------------------------------------------------------------------------------------------

    def spawn(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str],
        cpus: set[int] | None,
        *,
        cwd: Path = ROOT,
    ) -> Child:
        """Start a child (its output in ``<workdir>/<name>.log``) that dies with the benchmark."""
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # preexec_fn (not thread-safe with threads; the benchmark spawns before starting any) is the
                # only way to set the death signal and the affinity before the server's first instruction.
                preexec_fn=_preexec(cpus if self.pin else None),
            )
        child = Child(name=name, process=process, port=port, log_path=log_path)
        self.children.append(child)
        return child

    def start_simulator(self) -> Child:
        script = self.workdir / "scenarios.json"
        script.write_text(json.dumps({"scenarios": list(SCENARIOS.values())}))
        port = free_port()
        argv = [sys.executable, "-m", "bench.simulator", "--port", str(port)]
        child = self.spawn("simulator", [*argv, "--script", str(script)], port, self.env, LOAD_CPUS)
        wait_for_port(child, timeout=30)
        return child

    def start_server(
        self,
        *,
        app: str,
        server: str,
        name: str,
        floor_env: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Child:
        """``app`` is ``cesaflow`` or ``floor``; ``server`` is ``daphne`` or ``uvicorn``; one process, no workers.
        ``extra_env``: more CesaFlow settings (``CESAFLOW_EXECUTOR=worker``)."""
        port = free_port()
        if app == "cesaflow":
            env, target = self.env | (extra_env or {}), "cesaflow.asgi:application"
        else:
            env = {k: v for k, v in self.env.items() if not k.startswith(("CESAFLOW_", "DATABASE_", "REDIS_"))} | (
                floor_env or {}
            )
            env["DJANGO_SETTINGS_MODULE"] = "bench.floor.settings"
            target = "bench.floor.asgi:application"
        if server == "daphne":
            # CesaFlow's production server (daphne with bounded, in-memory request bodies); the floor stays on plain
            # daphne. Verbosity 0: at 1 (the default) daphne writes an access log to stdout.
            command = (
                [str(self.server_bin / "python"), "-m", "cesaflow.serve"]
                if app == "cesaflow"
                else [str(self.server_bin / "daphne")]
            )
            argv = [*command, "-v", "0", "-b", HOST, "-p", str(port), target]
        elif server == "uvicorn":
            argv = [
                str(self.server_bin / "uvicorn"),
                target,
                "--host",
                HOST,
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
                "--lifespan",
                "off",
            ]
        else:
            raise ValueError(server)
        child = self.spawn(name, argv, port, env, SERVER_CPUS)
        wait_for_port(child, timeout=60)
        return child

    def start_run_worker(self, *, name: str, ready: str = "ready", timeout: float = 60) -> Child:
        """``manage.py run_worker`` (``CESAFLOW_EXECUTOR=worker``) on the server's core; returns once it is ready."""
        argv = [str(self.server_bin / "python"), str(ROOT / "manage.py"), "run_worker"]
        # Unbuffered: its "ready" line must reach the log file now, not when a buffer fills.
        env = self.env | {"CESAFLOW_EXECUTOR": "worker", "PYTHONUNBUFFERED": "1"}
        child = self.spawn(name, argv, 0, env, SERVER_CPUS)
        deadline = time.monotonic() + timeout
        while ready not in child.log_tail(50):
            if child.process.poll() is not None:
                raise SystemExit(f"{name} exited with {child.process.returncode}:\n{child.log_tail()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} was not ready within {timeout:.0f} s:\n{child.log_tail()}")
            time.sleep(0.1)
        return child

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def discard(self, child: Child) -> None:
        child.stop()
        with contextlib.suppress(ValueError):
            self.children.remove(child)


def wait_for_port(child: Child, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise SystemExit(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
        try:
            with socket.create_connection((HOST, child.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{child.name} did not listen on {child.port} within {timeout:.0f} s:\n{child.log_tail()}")


@contextlib.contextmanager
def harness(
    workdir: Path, *, database_url: str, redis_url: str, pin: bool, server_bin: Path = BIN
) -> Iterator[Harness]:
    h = Harness(workdir=workdir, database_url=database_url, redis_url=redis_url, pin=pin, server_bin=server_bin)
    try:
        yield h
    finally:
        h.close()
