"""`make run` as a new user meets it: SQLite under ``var/``, no Redis, the provider simulator beside the server.

The rest of the suite runs against PostgreSQL and Redis, so a statement only PostgreSQL knows (issue #13's first
batched run ends used ``UPDATE … FROM UNNEST``) passed every other test and failed the first completion on a fresh
clone. This walks the README's first steps against ``python -m cesaflow.serve runserver`` in a subprocess, on a
fresh ``CESAFLOW_VAR_DIR``: the demo org, an org API key, a streamed completion through the OpenAI-compatible
endpoint and its run read back, a chat run streamed over SSE, an agent run and its workspace's zip (downloaded
once, then gone).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.throwaway import HOST, free_port
from tests.live_server import ROOT, fresh_clone_env, stop, wait_for_port

pytestmark = pytest.mark.timeout(240)
SETTLE_S = 15.0  # how long a run may take to be read back finished (it ends within milliseconds here)


@pytest.fixture
def dev_env() -> Iterator[dict[str, str]]:
    """The environment of a fresh clone: none of this process's database, Redis or CesaFlow settings; its ``var/``
    in a directory the sandbox's uid may traverse (pytest's own temporary directories are ``0700``)."""
    clone = Path(tempfile.mkdtemp(prefix="cesaflow-make-run-", dir="/tmp"))
    clone.chmod(0o711)
    yield fresh_clone_env(CESAFLOW_VAR_DIR=str(clone / "var"), PYTHONUNBUFFERED="1")
    shutil.rmtree(clone, ignore_errors=True)


def _manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"manage.py {args[0]}: {done.stderr[-3000:]}"
    return done.stdout


@contextmanager
def _process(argv: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process, log)
        yield
    finally:
        stop(process)
        if sys.exc_info()[0] is not None:  # a failure: the server's side of it, shown with the report
            print(f"--- the end of {log.name} ---\n{log.read_text(errors='replace')[-4000:]}")


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The run events of an SSE response, in order, until ``run.finished``."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            event: dict[str, Any] = json.loads(line[len("data: ") :])
            yield event
            if event.get("type") == "run.finished":
                return


def _settled(client: httpx.Client, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + SETTLE_S
    while True:
        run: dict[str, Any] = client.get(f"/api/v1/runs/{run_id}").json()
        if run["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="agent runs need bubblewrap (.ci/run installs it)")
def test_a_fresh_clone_serves_the_readme_walkthrough_from_sqlite(dev_env: dict[str, str], tmp_path: Path):
    _manage(dev_env, "migrate", "--noinput")
    simulator_port, port = free_port(), free_port()
    simulator = [sys.executable, "manage.py", "provider_simulator", "--port", str(simulator_port)]
    with _process(simulator, dev_env, simulator_port, tmp_path / "simulator.log"):
        _manage(dev_env, "ensure_demo", "--simulator-url", f"http://{HOST}:{simulator_port}")
        created = _manage(dev_env, "create_api_key", "--org", "demo", "--name", "smoke")
        secret = created.strip().splitlines()[-1]
        assert secret.startswith("cf_")
        server = [sys.executable, "-m", "cesaflow.serve", "runserver", f"{HOST}:{port}"]
        with (
            _process(server, dev_env | {"CESAFLOW_DEBUG": "true"}, port, tmp_path / "server.log"),
            httpx.Client(base_url=f"http://{HOST}:{port}", headers={"x-api-key": secret}, timeout=30) as client,
        ):
            keys = {key["label"]: key["id"] for key in client.get("/api/v1/provider-keys").json()["results"]}
            assert "demo-openai" in keys

            # The OpenAI-compatible endpoint, streamed; the run's end is written after [DONE].
            completion = {
                "model": "demo-openai/fake/echo",
                "messages": [{"role": "user", "content": "hello from a fresh clone"}],
                "stream": True,
            }
            bearer = {"authorization": f"Bearer {secret}"}
            with client.stream("POST", "/api/v1/chat/completions", json=completion, headers=bearer) as answer:
                assert answer.status_code == 200
                run_id = answer.headers["x-cesaflow-run-id"]
                frames = [line for line in answer.iter_lines() if line.startswith("data: ")]
            assert frames[-1] == "data: [DONE]"
            ended = _settled(client, run_id)
            assert (ended["status"], ended["kind"]) == ("succeeded", "completion")
            assert ended["input_tokens"] > 0
            assert ended["output_tokens"] > 0

            # A chat run, created and then watched over SSE (start on attach).
            chat = {"objective": "hello", "provider_key": keys["demo-openai"], "model": "fake/echo"}
            made = client.post("/api/v1/runs", json=chat)
            assert made.status_code == 201, made.text
            with client.stream("GET", f"/api/v1/runs/{made.json()['id']}/events") as stream:
                kinds = [event["type"] for event in _events(stream)]
            assert "text.delta" in kinds
            assert kinds[-1] == "run.finished"
            assert _settled(client, made.json()["id"])["status"] == "succeeded"

            # An agent run in the sandbox, streamed from its creation; its workspace downloads once.
            agent = {"kind": "agent", "objective": "demo", "provider_key": keys["demo-openai"]}
            agent |= {"model": "fake/agent_demo", "stream": True}
            with client.stream("POST", "/api/v1/runs", json=agent) as stream:
                assert stream.status_code == 200
                events = list(_events(stream))
            assert events[-1]["status"] == "succeeded", events[-1]
            run_id = events[-1]["run_id"]
            assert {"tool.call", "command.output", "file.changed"} <= {event["type"] for event in events}
            assert all(event["ok"] for event in events if event["type"] == "tool.result")  # the tests ran, and passed
            download = client.get(f"/api/v1/runs/{run_id}/workspace")
            assert download.status_code == 200
            names = zipfile.ZipFile(io.BytesIO(download.content)).namelist()
            assert any(name.endswith("test_greeting.py") for name in names)
            assert client.get(f"/api/v1/runs/{run_id}/workspace").status_code == 410
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in log
    assert " ERROR " not in log
