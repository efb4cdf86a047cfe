"""Agent runs end to end: ``POST /api/v1/runs {"kind": "agent"}``, an executor running the loop against the provider
simulator in a real bwrap sandbox, the live events, the zip download that deletes the workspace, the retention
sweep, and the canary that must be nowhere once the workspace is gone."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.test import AsyncClient
from django.utils import timezone

from orgs.services import org_update
from runs.models import Run, RunKind, RunStatus, TokenBudget, WorkspaceState
from runs.services import runs_reap_lost
from runs.services.tokens import run_first_call_estimate
from runs.services.workspaces import workspaces_purge
from runs.workspaces import workspace_create, workspace_path
from tests.keys import canary
from tests.runs.test_execution_support import (
    EventWatcher,
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
    running_executor,
)
from tests.signin import sign_in

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]


@pytest.fixture(autouse=True)
def workspace_root(settings) -> Iterator[Path]:
    """Workspaces under a fresh 0o711 directory in /tmp: the sandbox uid must be able to traverse to them."""
    base = Path(tempfile.mkdtemp(prefix="cesaflow-agent-runs-", dir="/tmp"))
    base.chmod(0o711)
    settings.WORKSPACE_ROOT = base / "workspaces"
    settings.SANDBOX_MODE = "bwrap"
    settings.RUN_EXECUTOR = "worker"  # the test's own executor runs them
    yield settings.WORKSPACE_ROOT
    shutil.rmtree(base, ignore_errors=True)


async def create_agent_run(member: Any, key: Any, *, model: str = "fake/agent_demo", **fields: Any) -> dict[str, Any]:
    body = {"kind": "agent", "objective": "Build a greeting package.", "provider_key": str(key.id), "model": model}
    response = await AsyncClient().post(
        "/api/v1/runs",
        data=json.dumps({**body, **fields}),
        content_type="application/json",
        headers={"x-api-key": member.api_secret},
    )
    assert response.status_code == 201, response.content
    created: dict[str, Any] = response.json()
    return created


async def run_to_end(run_id: str, timeout: float = 30.0) -> tuple[Run, EventWatcher]:
    async with EventWatcher(uuid.UUID(run_id)) as watcher, running_executor(claim_queued=True, poll_s=0.1):
        await watcher.until_finished(timeout)
    return await Run.objects.aget(id=run_id), watcher


async def download(run_id: Any, secret: str) -> Any:
    response = await AsyncClient().get(f"/api/v1/runs/{run_id}/workspace", headers={"x-api-key": secret})
    if response.status_code == 200:
        streamed: Any = response  # a streaming response (the async test client types it as a plain one)
        streamed.zip_bytes = b"".join([chunk async for chunk in streamed.streaming_content])
    return response


@pytest.mark.parametrize("flavour", ["openai", "groq", "anthropic"])
async def test_agent_demo_writes_tests_and_runs_them_live_then_the_zip_is_downloaded_once(cast, simulator, flavour):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator, flavour=flavour)
    created = await create_agent_run(cast.dev_a, key)
    # Agent runs are unwatched by default: their result is the workspace.
    assert (created["kind"], created["watch"], created["limits"]["max_steps"]) == ("agent", False, 40)

    run, watcher = await run_to_end(created["id"])
    assert (run.status, run.error_kind) == (RunStatus.SUCCEEDED, "")
    assert run.workspace_state == WorkspaceState.AVAILABLE
    assert run.sandbox_mode == "bwrap"
    assert run.input_tokens > 0
    assert await run.usage_records.acount() == 5  # one ledger row per model call
    # Each turn read its answer to the end: the five calls came on one connection.
    calls = [r for r in simulator.requests() if r["method"] == "POST"]
    assert len(calls) == 5
    assert len({r["connection"] for r in calls}) == 1

    kinds = {e["type"] for e in watcher.events}
    assert {"agent.step", "tool.call", "tool.result", "command.output", "file.changed", "text.delta"} <= kinds
    writes = [e for e in watcher.of_type("tool.call") if e["name"] == "write_file"]
    assert writes[0]["arguments"]["path"] == "greeting/__init__.py"
    assert "content" not in writes[0]["arguments"]  # the size, never the code
    command = next(e for e in watcher.of_type("tool.result") if e["name"] == "run_command")
    assert (command["ok"], command["summary"]) == (True, "exit 0")
    output = "".join(e["text"] for e in watcher.of_type("command.output"))
    assert "OK" in output
    assert "test_greeting" in output
    changed = {e["path"] for e in watcher.of_type("file.changed")}
    assert {"greeting/__init__.py", "tests/test_greeting.py", "README.md"} <= changed
    steps = watcher.of_type("agent.step")
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert watcher.events[-1]["workspace_state"] == "available"

    response = await download(run.id, cast.dev_a.api_secret)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    assert response["Content-Disposition"] == f'attachment; filename="cesaflow-run-{run.id.hex[:12]}.zip"'
    archive = zipfile.ZipFile(io.BytesIO(response.zip_bytes))
    assert "greeting/__init__.py" in archive.namelist()
    assert "Hello, " in archive.read("greeting/__init__.py").decode()
    # The first complete download deleted it.
    assert not workspace_path(run.id).exists()
    run = await Run.objects.aget(id=run.id)
    assert run.workspace_state == WorkspaceState.DOWNLOADED
    assert run.workspace_deleted_at is not None
    again = await download(run.id, cast.dev_a.api_secret)
    assert again.status_code == 410
    assert again.json()["error"]["code"] == "workspace_deleted"


async def test_another_orgs_workspace_is_404_and_a_chat_run_has_none(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    created = await create_agent_run(cast.dev_a, key, model="fake/tool_write")
    run, _ = await run_to_end(created["id"])
    assert run.workspace_state == WorkspaceState.AVAILABLE
    for secret in (cast.admin_b.api_secret, cast.dev_b.api_secret):
        response = await download(run.id, secret)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert workspace_path(run.id).exists()  # nothing happened to it
    chat = await AsyncClient().post(
        "/api/v1/runs",
        data=json.dumps({"objective": "hi", "provider_key": str(key.id), "model": "fake/echo"}),
        content_type="application/json",
        headers={"x-api-key": cast.dev_a.api_secret},
    )
    response = await download(chat.json()["id"], cast.dev_a.api_secret)
    assert response.status_code == 404
    anonymous = await AsyncClient().get(f"/api/v1/runs/{run.id}/workspace")
    assert anonymous.status_code == 401
    outsider = AsyncClient()
    await sync_to_async(sign_in)(outsider, cast.outsider.user)
    assert (await outsider.get(f"/api/v1/runs/{run.id}/workspace")).status_code == 404
    assert workspace_path(run.id).exists()


async def test_a_symlink_planted_by_a_command_is_not_in_the_zip(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    created = await create_agent_run(cast.dev_a, key, model="fake/agent_symlink_escape")
    run, watcher = await run_to_end(created["id"])
    refused = [e for e in watcher.of_type("tool.result") if e["name"] in ("read_file", "write_file")]
    assert refused
    assert not any(e["ok"] for e in refused)
    response = await download(run.id, cast.dev_a.api_secret)
    archive = zipfile.ZipFile(io.BytesIO(response.zip_bytes))
    assert "leak" not in archive.namelist()
    assert b"root:" not in response.zip_bytes


async def test_bad_limits_and_limits_on_chat_runs_are_field_errors(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    for fields in (
        {"kind": "agent", "limits": {"max_steps": 0}},
        {"kind": "agent", "limits": {"hack": 1}},
        {"limits": {"max_steps": 3}},
    ):
        body = {"objective": "x", "provider_key": str(key.id), "model": "fake/echo", **fields}
        response = await AsyncClient().post(
            "/api/v1/runs",
            data=json.dumps(body),
            content_type="application/json",
            headers={"x-api-key": cast.dev_a.api_secret},
        )
        assert response.status_code == 400, body
        assert "limits" in response.json()["error"]["details"]["fields"]
    assert not await Run.objects.aexists()


async def test_a_step_limit_ends_the_run_with_limit_steps_and_keeps_the_workspace_downloadable(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    created = await create_agent_run(cast.dev_a, key, model="fake/loop_forever", limits={"max_steps": 2})
    run, _ = await run_to_end(created["id"])
    assert (run.status, run.error_kind) == (RunStatus.FAILED, "limit_steps")
    assert run.workspace_state == WorkspaceState.AVAILABLE


async def test_commands_off_for_the_org_means_run_command_is_not_offered(cast, simulator):
    await sync_to_async(org_update)(org=cast.org_a, actor=cast.admin_a.user, agents_may_run_commands=False)
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    created = await create_agent_run(cast.dev_a, key)
    await run_to_end(created["id"])
    tools = {t["function"]["name"] for r in simulator.requests() for t in (r["body"] or {}).get("tools", [])}
    assert "write_file" in tools
    assert "run_command" not in tools


async def test_cancel_kills_the_running_command_within_a_second(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    created = await create_agent_run(cast.dev_a, key, model="fake/agent_sleep")
    async with EventWatcher(uuid.UUID(created["id"])) as watcher, running_executor(claim_queued=True, poll_s=0.1):
        await watcher.until(lambda e: e["type"] == "tool.call" and e["name"] == "run_command", 20)
        response = await AsyncClient().post(
            f"/api/v1/runs/{created['id']}/cancel", headers={"x-api-key": cast.dev_a.api_secret}
        )
        assert response.status_code == 200
        finished = await watcher.until(lambda e: e["type"] == "run.finished", 3)
    assert finished["status"] == RunStatus.CANCELLED


# --- Retention ------------------------------------------------------------------------------------------------


async def test_the_window_ending_deletes_the_workspace(cast, simulator, settings):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    created = await create_agent_run(cast.dev_a, key, model="fake/tool_write")
    run, _ = await run_to_end(created["id"])
    assert workspace_path(run.id).exists()
    await Run.objects.filter(id=run.id).aupdate(workspace_expires_at=timezone.now() - timedelta(seconds=1))
    assert await sync_to_async(workspaces_purge)() == 1
    assert not workspace_path(run.id).exists()
    run = await Run.objects.aget(id=run.id)
    assert run.workspace_state == WorkspaceState.EXPIRED
    response = await download(run.id, cast.dev_a.api_secret)
    assert response.status_code == 410


def test_after_a_crash_the_dead_runs_workspace_and_orphans_go_at_the_next_start(cast, simulator, settings):
    from runs.services import run_claim, run_create
    from runs.services.workspaces import run_workspace_opened

    key_run = run_create(
        org=cast.org_a,
        actor=cast.dev_a.user,
        provider_key_id=sim_key_sync(cast, simulator).id,
        model="fake/agent_demo",
        objective="x",
        kind="agent",
    )
    run_claim(run_id=key_run.id, worker_id="crashed")
    run_workspace_opened(run_id=key_run.id, sandbox_mode="bwrap")
    live = workspace_create(key_run.id)
    (live / "half.py").write_text("x = 1\n")
    orphan = workspace_create(uuid.uuid4())
    # The process died: nothing closed the workspace. A still-running run's workspace is kept.
    assert workspaces_purge() == 1
    assert not orphan.exists()
    assert live.exists()
    Run.objects.filter(id=key_run.id).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    assert [r.id for r in runs_reap_lost(stale_after=timedelta(seconds=30))] == [key_run.id]
    assert workspaces_purge() == 1
    assert not live.exists()
    assert Run.objects.get(id=key_run.id).workspace_state == WorkspaceState.EXPIRED


def sim_key_sync(cast: Any, simulator: Any) -> Any:
    from tests.runs.test_execution_support import sim_key

    return sim_key(cast.org_a, cast.admin_a.user, simulator)


# --- The canary -------------------------------------------------------------------------------------------------


async def test_generated_code_and_command_output_are_nowhere_once_the_workspace_is_gone(cast, simulator, settings):
    settings.DEBUG = True  # worst case: every SQL statement logged with its parameters
    word = f"cfcanary-code-{secrets.token_hex(16)}"
    # Queued scenarios serve one request each: one copy per model call of the run.
    script = {
        "turns": [
            {"tool_calls": [{"name": "write_file", "arguments": {"path": "secret.py", "content": f"W = '{word}'\n"}}]},
            {"tool_calls": [{"name": "run_command", "arguments": {"command": "cat secret.py"}}]},
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}]},
        ]
    }
    simulator.enqueue("openai", script, script, script)
    with canary.debug_logging() as logs:
        key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
        created = await create_agent_run(cast.dev_a, key, model="fake/canary")
        run, watcher = await run_to_end(created["id"])
        # It was really produced and streamed: the command printed it live.
        assert word in "".join(e["text"] for e in watcher.of_type("command.output"))
        response = await download(run.id, cast.dev_a.api_secret)
        assert word in zipfile.ZipFile(io.BytesIO(response.zip_bytes)).read("secret.py").decode()

    collected = canary.Collected()
    await sync_to_async(canary.collect_pg_dump)(collected)
    await sync_to_async(canary.collect_pg_files)(collected)
    await sync_to_async(canary.collect_redis)(collected)
    await sync_to_async(canary.collect_directories)(collected)
    var = Path(django_settings.VAR_DIR)
    for path in var.rglob("*"):
        # Not CesaFlow's data: the test services' own files, and the virtualenvs `make bench` makes (`var/bench-*`:
        # LiteLLM, py-spy, the servers' production dependencies).
        top = path.relative_to(var).parts[0]
        if top == "test-services" or top.startswith("bench-"):
            continue
        if path.is_file() and path.stat().st_size < 50_000_000:
            collected.add("var", path.read_bytes())
    collected.add("logs", logs.text())
    assert str(run.id).encode() in collected.blobs["pg_dump"]
    hits = canary.scan(collected, [word])
    assert hits == [], f"generated code or command output was stored: {hits}"


async def test_an_executor_starting_up_deletes_orphaned_workspaces_at_once(cast, simulator):
    orphan = await sync_to_async(workspace_create)(uuid.uuid4())
    (orphan / "left-behind.py").write_text("x = 1\n")
    # A restarted server or worker: its first supervision tick sweeps, before any run is claimed.
    async with running_executor(reap=True, heartbeat_s=0.1):
        deadline = asyncio.get_running_loop().time() + 5
        while orphan.exists() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
    assert not orphan.exists()


async def test_the_monthly_token_cap_stops_an_agent_run_before_a_step_it_has_no_room_for(cast, simulator):
    # Room for what the first model call can cost (reserved when the run is created), not for a second one.
    first_call = run_first_call_estimate(kind=RunKind.AGENT, objective="Build a greeting package.")
    await sync_to_async(org_update)(org=cast.org_a, actor=cast.admin_a.user, monthly_token_cap=first_call + 100)
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    created = await create_agent_run(cast.dev_a, key)
    run, watcher = await run_to_end(created["id"])
    assert (run.status, run.error_kind) == (RunStatus.FAILED, "token_cap_reached")
    assert [s["step"] for s in watcher.of_type("agent.step")] == [1]
    assert await run.usage_records.acount() == 1
    budget = await TokenBudget.objects.aget(org=cast.org_a)
    assert (budget.used, budget.reserved) == (run.total_tokens, 0)


async def finished_tool_write_run(cast: Any, simulator: Any) -> Run:
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    created = await create_agent_run(cast.dev_a, key, model="fake/tool_write")
    run, _ = await run_to_end(created["id"])
    assert run.workspace_state == WorkspaceState.AVAILABLE
    return run


async def test_a_head_request_does_not_count_as_the_download(cast, simulator):
    run = await finished_tool_write_run(cast, simulator)
    response = await AsyncClient().head(
        f"/api/v1/runs/{run.id}/workspace", headers={"x-api-key": cast.dev_a.api_secret}
    )
    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    assert workspace_path(run.id).exists()
    assert (await Run.objects.aget(id=run.id)).workspace_state == WorkspaceState.AVAILABLE
    assert (await download(run.id, cast.dev_a.api_secret)).status_code == 200


async def test_a_second_download_while_one_streams_is_409_until_the_first_ones_lease_lapses(cast, simulator):
    run = await finished_tool_write_run(cast, simulator)
    first = await AsyncClient().get(f"/api/v1/runs/{run.id}/workspace", headers={"x-api-key": cast.dev_a.api_secret})
    assert first.status_code == 200
    assert (await Run.objects.aget(id=run.id)).workspace_state == WorkspaceState.DOWNLOADING
    second = await download(run.id, cast.dev_a.api_secret)
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "workspace_busy"
    # The retention sweep leaves a workspace alone while it is being downloaded, even past its window.
    await Run.objects.filter(id=run.id).aupdate(workspace_expires_at=timezone.now() - timedelta(seconds=1))
    assert await sync_to_async(workspaces_purge)() == 0
    assert workspace_path(run.id).exists()
    # The first client vanished without reading a byte: once its lease lapses, the next download goes ahead (and,
    # complete, deletes the workspace).
    await Run.objects.filter(id=run.id).aupdate(workspace_lease_until=timezone.now() - timedelta(seconds=1))
    third = await download(run.id, cast.dev_a.api_secret)
    assert third.status_code == 200
    assert "main.py" in zipfile.ZipFile(io.BytesIO(third.zip_bytes)).namelist()
    assert not workspace_path(run.id).exists()


async def test_a_workspace_this_server_cannot_see_is_503_and_not_marked_downloaded(cast, simulator):
    run = await finished_tool_write_run(cast, simulator)
    hidden = workspace_path(run.id).with_name("elsewhere")
    workspace_path(run.id).rename(hidden)  # as if it lived on another host's disk
    response = await download(run.id, cast.dev_a.api_secret)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "workspace_unreachable"
    assert (await Run.objects.aget(id=run.id)).workspace_state == WorkspaceState.AVAILABLE


async def test_a_streamed_agent_create_waits_for_its_own_stream_and_misses_nothing(cast, simulator):
    from tests.runs.test_start_on_attach import AsgiStream

    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    body = {
        "kind": "agent",
        "objective": "Write a file.",
        "provider_key": str(key.id),
        "model": "fake/tool_write",
        "stream": True,
    }
    async with running_executor(claim_queued=True, poll_s=0.05):
        stream = await AsgiStream("POST", "/api/v1/runs", secret=cast.dev_a.api_secret, body=body).open()
        events = await stream.until_finished(30)
    assert (events[0]["type"], events[0]["status"]) == ("run.status", "queued")
    assert [e["step"] for e in events if e["type"] == "agent.step"] == [1, 2]
    assert (await Run.objects.aget(id=events[0]["run_id"])).watch is True


async def test_each_model_call_is_in_the_ledger_as_it_happens_not_only_at_the_end(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    created = await create_agent_run(cast.dev_a, key, model="fake/agent_sleep")
    async with EventWatcher(uuid.UUID(created["id"])) as watcher, running_executor(claim_queued=True, poll_s=0.1):
        await watcher.until(lambda e: e["type"] == "tool.call" and e["name"] == "run_command", 20)
        # Mid-run (the command sleeps): the first call is billed already, so a crash now would not lose it.
        run = await Run.objects.aget(id=created["id"])
        assert run.status == RunStatus.RUNNING
        assert await run.usage_records.acount() == 1
        assert run.input_tokens > 0
        response = await AsyncClient().post(
            f"/api/v1/runs/{created['id']}/cancel", headers={"x-api-key": cast.dev_a.api_secret}
        )
        assert response.status_code == 200
        await watcher.until_finished(5)
    run = await Run.objects.aget(id=created["id"])
    assert await run.usage_records.acount() == 1  # not recorded a second time at the end
    records = [r async for r in run.usage_records.all()]
    assert run.input_tokens == sum(r.input_tokens for r in records)
