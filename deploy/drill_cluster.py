"""The drill's processes on loopback: throwaway PostgreSQL and Redis of its own (never the machine's: other
people's tests use those), the provider simulator, web processes (``python -m cesaflow.serve``) and ``run_worker``
processes, all with production settings and throwaway secrets generated per drill.

Every process is a child of the drill, started with a death signal so none outlives it, and its output goes to a
log under the drill's work directory (CesaFlow logs no content and no secret).

In front of the two web processes: Caddy with ``deploy/proxy/Caddyfile`` (the tested production configuration),
bound to 127.0.0.1 on a free port with a throwaway certificate for ``localhost`` (a CA of the drill's own, which
the clients trust); the web processes then run as production does behind it (``CESAFLOW_TRUST_X_FORWARDED_FOR``,
HTTPS redirect on, ``localhost`` the allowed host). Without Caddy installed the drill runs without the proxy, its
clients on the web processes' plain HTTP, and says so. ``Cluster.base_url(name)`` is the one place that says which
URL clients use for a web process (the proxy's, which picks one); ``direct_url`` is the process's own address.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deploy.throwaway import (
    CADDYFILE,
    HOST,
    ROOT,
    SITE_HOST,
    Child,
    TLSFiles,
    caddy_env,
    free_port,
    postgres_cluster,
    production_env,
    throwaway_tls,
)

PR_SET_PDEATHSIG = 1
# PostgreSQL and Redis get nothing of CesaFlow's environment.
SERVICE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the drill dies, however the drill dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class Timings:
    """Executor and stream settings; the bounded drill shortens them so its drills fit in a test's time."""

    heartbeat_s: float
    stale_after_s: float
    poll_s: float
    revalidate_s: int

    @property
    def lost_bound_s(self) -> float:
        """README "Executors": a dead worker's runs are ``worker_lost`` within stale-after plus one heartbeat."""
        return self.stale_after_s + self.heartbeat_s


@dataclass
class Cluster:
    workdir: Path
    timings: Timings
    children: dict[str, Child] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    pg_port: int = 0
    redis_port: int = 0
    # PostgreSQL's data and the workspaces: in a directory of their own directly under the temporary directory, so
    # the postgres user and the sandbox's uids can reach them wherever ``workdir`` is (pytest's is private to root).
    state: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cesaflow-drill-state-")))
    # The TLS proxy: Caddy's binary (None: not installed, the drill runs without the proxy), its port once started,
    # the throwaway certificate and the TLS context clients verify it with.
    caddy: str | None = field(default_factory=lambda: shutil.which("caddy"))
    proxy_port: int = 0
    tls: TLSFiles | None = None
    client_tls: ssl.SSLContext | None = None
    _pg_argv: list[str] = field(default_factory=list)
    _redis_argv: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state.chmod(0o711)  # traversable, not listable
        if self.caddy is not None:
            self.tls = throwaway_tls(self.workdir / "tls")
            self.client_tls = ssl.create_default_context(cafile=str(self.tls.ca))
            self.proxy_port = free_port()

    @property
    def proxied(self) -> bool:
        return self.caddy is not None

    @property
    def proxy_note(self) -> str:
        """What the drill's output says about the proxy."""
        if self.proxied:
            return f"through Caddy (deploy/proxy/Caddyfile) over TLS at {self.base_url('web-a')}"
        return "WITHOUT the TLS proxy (caddy not installed): clients on the web processes' plain HTTP"

    # --- Configuration ------------------------------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        return f"postgres://postgres@{HOST}:{self.pg_port}/cesaflow_drill"

    @property
    def workspace_root(self) -> Path:
        return self.state / "workspaces"

    def base_url(self, web: str) -> str:
        """The URL clients use for a web process (``web-a``, ``web-b``): the proxy's (which spreads requests over
        both), or without it the process's own."""
        if self.proxied:
            return f"https://{SITE_HOST}:{self.proxy_port}"
        return self.direct_url(web)

    def direct_url(self, web: str) -> str:
        """The web process's own address (plain HTTP on loopback), for a client that must pick the process."""
        return f"http://{HOST}:{self.children[web].port}"

    def origin(self) -> str:
        """What a browser on the site sends as ``Origin`` (the websocket consumer and CSRF check it): the proxy's
        https origin, whichever web process the connection reaches."""
        return self.base_url("web-a")

    def configure(self) -> None:
        """Production settings with throwaway secrets generated for this drill only."""
        self.workspace_root.mkdir(parents=True, exist_ok=True)
        self.workspace_root.chmod(0o711)  # the sandbox's uids must traverse it
        # Behind the proxy as production runs (it trusts the proxy's X-Forwarded-For and -Proto, the site's name is
        # the one allowed host); without it, plain HTTP on loopback.
        self.env = production_env(
            workdir=self.workdir,
            database_url=self.database_url,
            redis_url=f"redis://{HOST}:{self.redis_port}/0",
            allowed_hosts=SITE_HOST if self.proxied else HOST,
            behind_tls_proxy=self.proxied,
            extra={
                "TMPDIR": str(self.workdir / "tmp"),
                "CESAFLOW_CACHE_PREFIX": "cfdrill",
                "CESAFLOW_EXECUTOR": "worker",
                "CESAFLOW_WORKSPACE_ROOT": str(self.workspace_root),
                "CESAFLOW_RUN_HEARTBEAT_SECONDS": str(int(self.timings.heartbeat_s)),
                "CESAFLOW_RUN_STALE_AFTER_SECONDS": str(int(self.timings.stale_after_s)),
                "CESAFLOW_RUN_WORKER_POLL_SECONDS": str(int(self.timings.poll_s)),
                "CESAFLOW_STREAM_REVALIDATE_SECONDS": str(self.timings.revalidate_s),
                "CESAFLOW_DB_POOL_MAX": "10",
                "CESAFLOW_LOG_LEVEL": "INFO",
            },
        )
        (self.workdir / "tmp").mkdir(exist_ok=True)

    # --- Children -----------------------------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], *, port: int = 0, env: dict[str, str] | None = None) -> Child:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env if env is not None else self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        child = Child(name=name, process=process, port=port, log_path=log_path)
        self.children[name] = child
        return child

    def wait_until(self, child: Child, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not child.alive:
                raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} not ready within {timeout:.0f} s:\n{child.log_tail()}")
            time.sleep(0.1)

    def kill(self, name: str) -> Child:
        """SIGKILL, as the kernel's OOM killer or a power cut would: no shutdown code runs."""
        child = self.children[name]
        child.signal(signal.SIGKILL)
        child.process.wait(10)
        return child

    def close(self) -> None:
        for child in reversed(list(self.children.values())):
            child.stop()
        self.children.clear()
        shutil.rmtree(self.state, ignore_errors=True)

    # --- PostgreSQL and Redis -----------------------------------------------------------------------------------

    def start_postgres(self) -> None:
        data = self.state / "pg"
        run_as, bindir = postgres_cluster(data)
        self.pg_port = free_port()
        # Foreground child, not pg_ctl's daemon, so it dies with the drill. fsync off: a throwaway cluster, and the
        # restart drill stops it cleanly (a fast shutdown writes everything committed).
        self._pg_argv = [*run_as, str(bindir / "postgres"), "-D", str(data), "-h", HOST, "-p", str(self.pg_port)]
        self._pg_argv += ["-k", str(data), "-c", "max_connections=200", "-c", "fsync=off"]
        self._start_postgres()
        import psycopg

        with psycopg.connect(f"postgres://postgres@{HOST}:{self.pg_port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE cesaflow_drill")

    def _start_postgres(self) -> None:
        child = self.spawn("postgres", self._pg_argv, port=self.pg_port, env=SERVICE_ENV)
        self.wait_until(child, lambda: port_open(self.pg_port) and self._pg_accepts(), 60)

    def _pg_accepts(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(f"postgres://postgres@{HOST}:{self.pg_port}/postgres", connect_timeout=2):
                return True
        except psycopg.Error:
            return False

    def stop_postgres(self) -> None:
        """Fast shutdown (SIGINT): what a restart by the service manager does; committed rows are kept."""
        child = self.children["postgres"]
        # The postmaster itself (runuser, our child when running as root, does not pass SIGINT on).
        postmaster = int((self.state / "pg" / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGINT)
        child.process.wait(30)

    def start_postgres_again(self) -> None:
        self._start_postgres()

    def start_redis(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("No redis-server found: install it (Debian: apt-get install redis-server).")
        self.redis_port = free_port()
        # No persistence, as the README requires of a production Redis: a restart starts empty.
        self._redis_argv = [server, "--bind", HOST, "--port", str(self.redis_port), "--save", "", "--appendonly"]
        self._redis_argv += ["no", "--dir", str(self.workdir)]
        self._start_redis()

    def _start_redis(self) -> None:
        child = self.spawn("redis", self._redis_argv, port=self.redis_port, env=SERVICE_ENV)
        self.wait_until(child, lambda: port_open(self.redis_port), 30)

    def stop_redis(self) -> None:
        self.kill("redis")

    def start_redis_again(self) -> None:
        self._start_redis()

    # --- CesaFlow -----------------------------------------------------------------------------------------------

    def manage(self, *args: str, timeout: float = 300) -> str:
        completed = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{completed.stderr[-3000:]}")
        return completed.stdout

    def seed(self, orgs: int) -> list[dict[str, str]]:
        completed = subprocess.run(
            [sys.executable, str(ROOT / "deploy" / "drill_seed.py"), self.simulator_url, str(orgs)],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"Seeding failed:\n{completed.stderr[-3000:]}")
        seeded: list[dict[str, str]] = json.loads(completed.stdout.strip().splitlines()[-1])
        return seeded

    @property
    def simulator_url(self) -> str:
        return f"http://{HOST}:{self.children['simulator'].port}"

    def start_simulator(self, scenarios: list[dict[str, object]]) -> None:
        script = self.workdir / "scenarios.json"
        script.write_text(json.dumps({"scenarios": scenarios}))
        port = free_port()
        argv = [sys.executable, str(ROOT / "deploy" / "drill_simulator.py"), "--port", str(port)]
        child = self.spawn("simulator", [*argv, "--script", str(script)], port=port)
        self.wait_until(child, lambda: port_open(port), 30)

    def start_web(self, name: str, port: int = 0) -> Child:
        """``python -m cesaflow.serve`` (daphne with CesaFlow's request class), as the README deploys it."""
        port = port or free_port()
        argv = [sys.executable, "-m", "cesaflow.serve", "-v", "0", "-b", HOST, "-p", str(port)]
        child = self.spawn(name, [*argv, "cesaflow.asgi:application"], port=port)
        self.wait_until(child, lambda: port_open(port), 60)
        return child

    def start_proxy(self, webs: list[str]) -> None:
        """Caddy with deploy/proxy/Caddyfile in front of ``webs``, on 127.0.0.1 and ``proxy_port`` (no-op without
        Caddy). Its HOME and XDG directories are the drill's; static files from an empty directory (unused)."""
        if self.caddy is None or self.tls is None:
            return
        home = self.workdir / "caddy-home"
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        static_root = self.workdir / "static"
        static_root.mkdir(exist_ok=True)
        upstreams = [self.children[web].port for web in webs]
        env = caddy_env(port=self.proxy_port, tls=self.tls, upstreams=upstreams, static_root=static_root, home=home)
        argv = [self.caddy, "run", "--config", str(CADDYFILE), "--adapter", "caddyfile"]
        child = self.spawn("proxy", argv, port=self.proxy_port, env=env)
        self.wait_until(child, lambda: port_open(self.proxy_port), 30)

    def start_worker(self, name: str) -> Child:
        child = self.spawn(name, [sys.executable, str(ROOT / "manage.py"), "run_worker", "--concurrency", "50"])
        self.wait_until(child, lambda: "ready" in child.log_tail(50), 60)
        return child
