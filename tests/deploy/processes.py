"""A production-like CesaFlow behind the TLS proxy, as real processes on loopback, for the deployment tests.

* ``throwaway_tls`` (from ``deploy/throwaway.py``, shared with the drill): a CA and a ``localhost`` certificate it
  signed (``cryptography``), written under a directory.
* ``production_web``: ``python -m cesaflow.serve`` with ``CESAFLOW_ENV=production`` (fresh secrets, the test
  database and Redis, the test process's provider keyring so keys sealed by the test open there) behind a trusted
  proxy (``CESAFLOW_TRUST_X_FORWARDED_FOR=true``), on its own TMPDIR.
* ``caddy_proxy``: Caddy with ``deploy/proxy/Caddyfile`` and the environment that file reads (``caddy_env``, shared
  with the drill), its HOME and XDG directories under the test's directory so everything it writes can be inspected.

Each is a context manager that waits (bounded) for its port and kills its process on the way out.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from deploy import throwaway
from deploy.throwaway import CADDYFILE, SITE_HOST, TLSFiles, caddy_env
from tests.live_server import ROOT, database_url, free_port, stop, wait_for_port

STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class Process:
    port: int
    pid: int
    home: Path  # its TMPDIR (CesaFlow) or HOME with the XDG directories (Caddy)
    log: Path  # its stdout and stderr


def _test_keyring() -> str:
    """The test process's provider keyring in CESAFLOW_KEYRING form (primary first)."""
    ring = settings.KEYRING
    kids = [ring.primary_kid, *sorted(kid for kid in ring.keys if kid != ring.primary_kid)]
    return ",".join(f"{kid}:{base64.b64encode(ring.keys[kid]).decode()}" for kid in kids)


def production_env(workdir: Path, *, workspaces: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a production web process behind the proxy needs: fresh secrets, the test database and Redis (with the
    test process's keyring and channel-layer key, so the test reads what the server wrote)."""
    return throwaway.production_env(
        workdir=workdir,
        database_url=database_url(),
        redis_url=settings.REDIS_URL,
        allowed_hosts=SITE_HOST,
        keyring=_test_keyring(),
        channel_layer_key=settings.CHANNEL_LAYER_KEY,
        behind_tls_proxy=True,
        extra={
            "CESAFLOW_STATIC_ROOT": str(workdir / "static"),
            "CESAFLOW_WORKSPACE_ROOT": str(workspaces / "workspaces"),
            **(extra or {}),
        },
    )


def collectstatic(env: Mapping[str, str]) -> Path:
    """``manage.py collectstatic`` into the environment's CESAFLOW_STATIC_ROOT; returns that directory."""
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=dict(env),
        check=True,
        timeout=120,
        capture_output=True,
    )
    return Path(env["CESAFLOW_STATIC_ROOT"])


@contextmanager
def _running(
    argv: list[str], *, env: Mapping[str, str], port: int, home: Path, log: Path, cwd: Path = ROOT
) -> Iterator[Process]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process, log)
        yield Process(port=port, pid=process.pid, home=home, log=log)
    finally:
        stop(process, STOP_TIMEOUT)
        # Kept in a failure report: what the process said (neither logs content or secrets).
        print(f"--- {argv[0]} {log.name}\n{log.read_text(errors='replace')[-4000:]}")


@contextmanager
def production_web(workdir: Path, env: Mapping[str, str]) -> Iterator[Process]:
    """One CesaFlow web process (``python -m cesaflow.serve``) on 127.0.0.1 and a free port."""
    port = free_port()
    tmpdir = workdir / f"web-{port}-tmp"
    tmpdir.mkdir()
    argv = [sys.executable, "-m", "cesaflow.serve", "-v", "1", "-b", "127.0.0.1", "-p", str(port)]
    try:
        with _running(
            [*argv, "cesaflow.asgi:application"],
            env={**env, "TMPDIR": str(tmpdir)},
            port=port,
            home=tmpdir,
            log=workdir / f"web-{port}.log",
        ) as process:
            yield process
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@contextmanager
def caddy_proxy(
    workdir: Path, *, caddy: str, tls: TLSFiles, upstreams: list[int], static_root: Path
) -> Iterator[Process]:
    """Caddy serving deploy/proxy/Caddyfile on https://localhost:<free port>, bound to 127.0.0.1."""
    port = free_port()
    home = workdir / "caddy-home"
    (home / "tmp").mkdir(parents=True)
    env = caddy_env(port=port, tls=tls, upstreams=upstreams, static_root=static_root, home=home)
    argv = [caddy, "run", "--config", str(CADDYFILE), "--adapter", "caddyfile"]
    with _running(argv, env=env, port=port, home=home, log=workdir / "caddy.log", cwd=workdir) as process:
        yield process
