"""Browser tests: a real ASGI server (daphne, in a subprocess) on the test database, and headless Chromium.

The server sees the rows the test writes (tests use ``transactional_db``), shares Redis (cache, sessions, channel
layer, with the same payload key) and reaches the provider simulator of this test process on loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

# The provider simulator fixtures, shared with tests/runs (a fixture is visible where its conftest is imported).
from tests.live_server import database_url, free_port, stop, wait_for_port
from tests.runs.conftest import simulator, simulator_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def asgi_server(request, transactional_db, tmp_path) -> Iterator[str]:
    """``http://127.0.0.1:<port>``: daphne serving CesaFlow on the test database. The executor is ``inline`` unless
    a test asks for ``worker`` (indirect parametrization): then a ``run_worker`` process executes the runs."""
    executor = getattr(request, "param", "inline")
    port = free_port()
    # Agent workspaces where the sandbox uid can reach them (pytest's tmp_path is 0700).
    workspaces = Path(tempfile.mkdtemp(prefix="cesaflow-e2e-ws-", dir="/tmp"))
    workspaces.chmod(0o711)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "cesaflow.settings",
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "CESAFLOW_CHANNEL_LAYER_KEY": settings.CHANNEL_LAYER_KEY,
        "CESAFLOW_EXECUTOR": executor,
        "CESAFLOW_WORKSPACE_ROOT": str(workspaces / "workspaces"),
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path / "daphne.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cesaflow.serve", "-b", "127.0.0.1", "-p", str(port), "tests.e2e.asgi:application"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    worker: subprocess.Popen[bytes] | None = None
    if executor == "worker":
        with (tmp_path / "worker.log").open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "manage.py", "run_worker"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
    try:
        wait_for_port(port, process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=20)
        stop(process)
        shutil.rmtree(workspaces, ignore_errors=True)
        # Kept in the failure report: what the server said (it never logs content or secrets).
        print(log.read_text(errors="replace")[-4000:])


@pytest.fixture
def browser_page(asgi_server) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        # Fail, not skip: a skipped browser test would let CI go green without it. .ci/run installs the package.
        pytest.fail(f"Browser tests need Debian's Chromium at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(base_url=asgi_server)
            context.set_default_timeout(10_000)
            yield context.new_page()
        finally:
            browser.close()
