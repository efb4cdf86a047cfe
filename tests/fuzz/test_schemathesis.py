"""Schemathesis over the OpenAPI schema, against the real server (issue #14 point 6; security.md T31, T35).

Authenticated as org A with an org API key holding every scope, while org B's provider keys, runs, projects, API
keys and members exist beside it (``tests.fuzz.world``). Every check schemathesis has, plus ours
(``tests.fuzz.hooks.no_cross_org_read``): no server error, the schema and the validators agree (status codes,
content types, bodies, negative data rejected and valid data accepted), and nothing of org B ever reaches org A.

``make test`` runs a bounded pass (``CESAFLOW_FUZZ_EXAMPLES``, default 3 examples per operation, no stateful
phase); ``make fuzz`` runs the full one (25 examples per operation and every phase). Provider keys point at the
provider simulator on loopback, and the fuzzer's own ``base_url`` values are replaced by it: nothing leaves the
machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runs.simulator import SimulatorThread
from tests.fuzz.world import Seeded, seed
from tests.live_server import LiveServer, live_server
from tests.signin import session_cookies_for

ROOT = Path(__file__).resolve().parents[2]
HOOKS = Path(__file__).with_name("hooks.py")
EXAMPLES = int(os.environ.get("CESAFLOW_FUZZ_EXAMPLES", "3"))
FULL = os.environ.get("CESAFLOW_FUZZ_FULL", "") == "1"
SERVER_ENV = {
    "CESAFLOW_EXECUTOR": "inline",  # runs execute in the server, against the simulator, and end
    "CESAFLOW_RUN_ATTACH_WINDOW_SECONDS": "2",  # a watched run nobody attaches to ends soon
    # The fuzzer sends hundreds of requests a minute, many with a bad key on purpose: with the limits on, how many
    # reach the validators (and whether a bad-key request meets 401 or 429) depended on how fast the machine was.
    # The fuzzer is here for validation and tenancy; the limits have their own tests (tests/test_rate_limits.py).
    **{
        f"CESAFLOW_RATE_LIMIT_{name}": "off"
        for name in ("API_UNAUTHENTICATED", "API_KEY", "API_ORG", "GATEWAY_KEY", "GATEWAY_ORG")
    },
}
# The whole run's budget: a stuck stream or a slow phase fails the test instead of hanging it.
FUZZ_TIMEOUT_SECONDS = 1500 if FULL else 300

CONFIG = """\
workers = 1  # hypothesis describes strategies with ast.parse, which is not thread-safe on Python 3.11
request-timeout = 20
max-stream-events = 20
seed = {seed}

[auth.openapi.apiKeyAuth]
api_key = "${{CESAFLOW_FUZZ_API_KEY}}"

[generation]
max-examples = {examples}
no-shrink = {no_shrink}

[checks]
enabled = true

[phases.examples]
enabled = true

[phases.coverage]
enabled = true

[phases.fuzzing]
enabled = true

[phases.stateful]
enabled = {full}
"""


@pytest.fixture(scope="module")
def simulator_urls() -> Iterator[dict[str, str]]:
    thread = SimulatorThread().start()
    yield thread.base_urls
    thread.stop()


@pytest.fixture(scope="module")
def server(django_db_setup, tmp_path_factory) -> Iterator[LiveServer]:
    workdir = tmp_path_factory.mktemp("fuzz")
    env = {**SERVER_ENV, "CESAFLOW_WORKSPACE_ROOT": str(workdir / "workspaces")}
    with live_server(workdir, env) as running:
        yield running


@pytest.fixture
def seeded(transactional_db, server: LiveServer, simulator_urls: dict[str, str]) -> Seeded:
    return seed(server.url, simulator_urls)


def _st(seeded: Seeded, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    world = seeded.world.dump(workdir / "world.json")
    config = workdir / "schemathesis.toml"
    seed_value = int(os.environ.get("CESAFLOW_FUZZ_SEED", "20261130"))
    config.write_text(
        CONFIG.format(seed=seed_value, examples=EXAMPLES, no_shrink=str(not FULL).lower(), full=str(FULL).lower())
    )
    env = {
        **os.environ,
        "CESAFLOW_FUZZ_WORLD": str(world),
        "CESAFLOW_FUZZ_API_KEY": seeded.api_key_a,
        "SCHEMATHESIS_HOOKS": str(HOOKS),
    }
    argv = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(config),
        "run",
        f"{seeded.world.base_url}/api/v1/schema/?format=json",
        "--url",
        seeded.world.base_url,
        "--checks",
        "all",
        "--report-dir",
        str(workdir / "report"),
        *args,
    ]
    return subprocess.run(
        argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=FUZZ_TIMEOUT_SECONDS, check=False
    )


@pytest.mark.timeout(FUZZ_TIMEOUT_SECONDS + 120)
def test_schemathesis_finds_no_failures_and_no_cross_org_read(seeded: Seeded, tmp_path: Path):
    result = _st(seeded, tmp_path)
    output = tmp_path / "schemathesis.txt"
    output.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"{result.stdout[-20000:]}{result.stderr[-5000:]}\n(all of it: {output})"


def test_the_cross_org_check_catches_a_leak_and_a_non_404(seeded: Seeded, tmp_path: Path):
    """The check is not vacuous: with org A's own org id and run ids counted as org B's, a read of org A's
    organization is a cross-org read, and a run of org A's drawn into the path answers 200 where 404 is due."""
    world = seeded.world
    world.foreign_ids = [*world.foreign_ids, str(seeded.org_a.id), *world.own["run_id"]]
    world.foreign["run_id"] = world.own["run_id"]
    # With every check on, as in the fuzzing test: ours is among them.
    result = _st(seeded, tmp_path, "--include-path", "/api/v1/org", "--include-path", "/api/v1/runs/{run_id}")
    assert result.returncode == 1, result.stdout[-5000:]
    assert "A response to org A carries ids of org B" in result.stdout
    assert "answered 200, not 404" in result.stdout


OBJECT_PATHS = {
    "member_id": ["members/{}"],
    "api_key_id": ["api-keys/{}"],
    "key_id": ["provider-keys/{}", "provider-keys/{}/check"],
    "project_id": ["projects/{}", "projects/{}/files", "projects/{}/files/README.md", "projects/{}/workspace"],
    "run_id": ["runs/{}", "runs/{}/cancel", "runs/{}/events", "runs/{}/workspace"],
}


def test_unknown_ids_with_cookies_are_a_404_through_the_server(seeded: Seeded):
    """Issue #14 saw a SynchronousOnlyOperation (a 500) when a request for an unknown id also carried a Cookie
    header. Every object path, each method, with a key and with the cookies a client may hold besides it: a
    browser's session, a CSRF cookie, garbage. Through the real (async) server."""
    alice = seeded.org_a.memberships.get(role="admin").user
    session = "; ".join(f"{name}={value}" for name, value in session_cookies_for(alice).items())
    cookies = ["a=b", "csrftoken=abc", "cf_session=garbage; cf_refresh=garbage", session]
    base = f"{seeded.world.base_url}/api/v1/"
    answered = 0
    with httpx.Client(base_url=base, headers={"x-api-key": seeded.api_key_a}) as client:
        for templates in OBJECT_PATHS.values():
            for template in templates:
                for cookie in cookies:
                    for method in ("GET", "POST", "PATCH", "DELETE"):
                        path = template.format(uuid.uuid4())
                        response = client.request(method, path, headers={"Cookie": cookie}, json={})
                        assert response.status_code in (404, 405), (method, path, response.status_code)
                        assert response.headers["content-type"] == "application/json"
                        answered += response.status_code == 404
    assert answered >= 50


def test_org_b_ids_are_a_404_on_every_object_path(seeded: Seeded):
    """The fuzzer draws org B's ids sometimes; here each of them meets each method of its path once."""
    paths = OBJECT_PATHS
    world = seeded.world
    probed = 0
    with httpx.Client(base_url=f"{world.base_url}/api/v1/", headers={"x-api-key": seeded.api_key_a}) as client:
        for name, templates in paths.items():
            for identifier in world.foreign[name]:
                for template in templates:
                    for method in ("GET", "POST", "PATCH", "DELETE"):
                        response = client.request(method, template.format(identifier), json={})
                        if response.status_code == 405:
                            continue
                        assert response.status_code == 404, (method, template, response.text)
                        assert response.json()["error"]["code"] == "not_found"
                        probed += 1
    assert probed >= 30
