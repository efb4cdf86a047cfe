"""Named projects through the REST API: CRUD with the tenant gate, the workspace's files (confined like the agent's
tools), its zip, and agent runs on a project: they build on the previous run's files and run one at a time."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from runs.models import AuditEvent, Project, Run, RunStatus
from runs.projects.services import project_create
from runs.services import run_claim
from runs.workspaces import project_workspace_create, project_workspace_path, write_file
from tests.runs.test_execution_support import (
    EventWatcher,
    asim_key,
    async_isolation,  # noqa: F401 - a fixture, used below
    running_executor,
    sim_key,
    wait_for_status,
)
from tests.runs.workspaces.conftest import plant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_isolation")]


@pytest.fixture(autouse=True)
def workspace_root(settings) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="cesaflow-projects-", dir="/tmp"))
    base.chmod(0o711)
    settings.WORKSPACE_ROOT = base / "workspaces"
    settings.RUN_EXECUTOR = "worker"
    yield settings.WORKSPACE_ROOT
    shutil.rmtree(base, ignore_errors=True)


def url(project_id: Any, suffix: str = "") -> str:
    return f"/api/v1/projects/{project_id}{suffix}"


@pytest.fixture
def project_a(cast, simulator) -> Project:
    key = sim_key(cast.org_a, cast.admin_a.user, simulator)
    return project_create(
        org=cast.org_a, actor=cast.dev_a.user, name="Service", default_provider_key_id=key.id, default_model="m"
    )


def test_developers_create_and_edit_projects_admins_delete_them(cast, simulator):
    key = sim_key(cast.org_a, cast.admin_a.user, simulator)
    dev = cast.dev_a.api()
    created = dev.post(
        "/api/v1/projects",
        {"name": "Billing", "default_provider_key": str(key.id), "default_model": "fake/agent_demo"},
        format="json",
    )
    assert created.status_code == 201, created.content
    project_id = created.json()["id"]
    assert dev.post("/api/v1/projects", {"name": "billing"}, format="json").status_code == 400  # unique per org
    assert dev.patch(url(project_id), {"description": "Invoices"}, format="json").json()["description"] == "Invoices"
    assert [p["name"] for p in dev.get("/api/v1/projects").json()["results"]] == ["Billing"]
    assert dev.delete(url(project_id)).status_code == 403
    project_workspace_create(project_id)
    assert cast.admin_a.api().delete(url(project_id)).status_code == 204
    assert not project_workspace_path(project_id).exists()  # the workspace goes at once
    assert AuditEvent.objects.filter(event=AuditEvent.PROJECT_DELETED, org=cast.org_a).count() == 1


@pytest.mark.parametrize("suffix", ["", "/files", "/files/a.py", "/workspace"])
def test_another_orgs_project_is_404_everywhere(cast, project_a, suffix):
    write_file(project_workspace_create(project_a.id), "a.py", "x = 1\n")
    for client in (cast.admin_b.api(), cast.dev_b.api(), cast.outsider.session_api()):
        assert client.get(url(project_a.id, suffix)).status_code == 404
    assert client.get(url(uuid.uuid4(), suffix)).status_code == 404
    assert cast.admin_b.api().delete(url(project_a.id)).status_code == 404
    assert Project.objects.filter(id=project_a.id).exists()


def test_another_orgs_project_cannot_be_the_project_of_a_run(cast, project_a, simulator):
    key_b = sim_key(cast.org_b, cast.admin_b.user, simulator)
    response = cast.admin_b.api().post(
        "/api/v1/runs",
        {"kind": "agent", "objective": "x", "project": str(project_a.id), "provider_key": str(key_b.id), "model": "m"},
        format="json",
    )
    assert response.status_code == 404  # as for the project itself, and like a project that does not exist
    assert response.json()["error"] == {"code": "not_found", "message": "No such project.", "details": {}}
    assert not Run.objects.filter(project=project_a).exists()


def test_files_are_listed_and_read_confined_to_the_workspace(cast, project_a):
    root = project_workspace_create(project_a.id)
    write_file(root, "pkg/app.py", "print('hi')\n")
    plant(root, "ln -s /etc/passwd leak")
    client = cast.dev_a.api()
    assert client.get(url(project_a.id, "/files")).json() == [{"path": "pkg/app.py", "bytes": 12}]
    one = client.get(url(project_a.id, "/files/pkg/app.py"))
    assert (one.status_code, one.content) == (200, b"print('hi')\n")
    assert one["Content-Type"] == "text/plain; charset=utf-8"
    for bad in ("leak", "..%2F..%2Fetc%2Fpasswd", "pkg/../../x"):
        response = client.get(url(project_a.id, f"/files/{bad}"))
        assert response.status_code in (400, 404), bad
        assert b"root:" not in response.content
    assert client.get(url(project_a.id, "/files/leak")).json()["error"]["code"] == "invalid_path"


async def test_the_project_zip_downloads_and_stays(cast, project_a):
    root = await sync_to_async(project_workspace_create)(project_a.id)
    write_file(root, "main.py", "x = 1\n")
    response: Any = await AsyncClient().get(
        url(project_a.id, "/workspace"), headers={"x-api-key": cast.dev_a.api_secret}
    )  # a streaming response (the async test client types it as a plain one), read as the server streams it
    assert response.status_code == 200
    archive = zipfile.ZipFile(io.BytesIO(b"".join([chunk async for chunk in response.streaming_content])))
    assert archive.read("main.py") == b"x = 1\n"
    assert (root / "main.py").exists()


def test_runs_on_one_project_are_serialized(cast, project_a):
    first = sync_run(cast, project_a)
    second = sync_run(cast, project_a)
    assert run_claim(run_id=first.id, worker_id="w1") is not None
    # The second waits while the first executes, whoever asks.
    assert run_claim(run_id=second.id, worker_id="w2") is None
    Run.objects.filter(id=first.id).update(status=RunStatus.SUCCEEDED)
    assert run_claim(run_id=second.id, worker_id="w2") is not None


def sync_run(cast: Any, project: Project) -> Run:
    from runs.projects.services import project_run_create

    return project_run_create(project=project, actor=cast.dev_a.user, objective="work", watch=False)


async def post_project_run(member: Any, project_id: Any, model: str) -> dict[str, Any]:
    response = await AsyncClient().post(
        "/api/v1/runs",
        data=json.dumps({"kind": "agent", "objective": "Build.", "project": str(project_id), "model": model}),
        content_type="application/json",
        headers={"x-api-key": member.api_secret},
    )
    assert response.status_code == 201, response.content
    created: dict[str, Any] = response.json()
    return created


async def test_a_second_run_builds_on_the_first_runs_files(cast, simulator):
    key = await asim_key(cast.org_a, cast.admin_a.user, simulator)
    project = await sync_to_async(project_create)(
        org=cast.org_a, actor=cast.dev_a.user, name="Greeter", default_provider_key_id=key.id
    )
    first = await post_project_run(cast.dev_a, project.id, "fake/agent_demo")
    async with running_executor(claim_queued=True, poll_s=0.1):
        await wait_for_status(first["id"], {RunStatus.SUCCEEDED}, timeout=30)
        # The second run lists what the first left: the same workspace, not a fresh one.
        simulator.enqueue(
            "openai",
            {"turns": [{"tool_calls": [{"name": "run_command", "arguments": {"command": "ls greeting tests"}}]}]},
        )
        simulator.enqueue(
            "openai", {"turns": [{}, {"tool_calls": [{"name": "finish", "arguments": {"summary": "ok"}}]}]}
        )
        second = await post_project_run(cast.dev_a, project.id, "fake/x")
        async with EventWatcher(uuid.UUID(second["id"])) as watcher:
            await watcher.until_finished(30)
    output = "".join(e["text"] for e in watcher.of_type("command.output"))
    assert "__init__.py" in output
    assert "test_greeting.py" in output
    project = await Project.objects.aget(id=project.id)
    assert project.workspace_bytes > 0
    assert project.last_run_at is not None
    # Project workspaces are never downloaded-and-deleted with a run.
    run = await Run.objects.aget(id=first["id"])
    assert run.workspace_state == ""
    assert (project_workspace_path(project.id) / "greeting" / "__init__.py").exists()


def test_a_backlog_on_one_busy_project_does_not_hold_up_other_runs(cast, project_a, simulator):
    from runs.services import runs_claim_queued

    first = sync_run(cast, project_a)
    assert run_claim(run_id=first.id, worker_id="w1") is not None
    backlog = [sync_run(cast, project_a) for _ in range(6)]
    key_b = sim_key(cast.org_b, cast.admin_b.user, simulator)
    from runs.services import run_create

    other = run_create(
        org=cast.org_b, actor=cast.admin_b.user, provider_key_id=key_b.id, model="m", objective="x", kind="agent"
    )
    claimed = runs_claim_queued(worker_id="w2", limit=1)
    assert [r.id for r in claimed] == [other.id]
    assert all(Run.objects.get(id=r.id).status == RunStatus.QUEUED for r in backlog)


def test_the_sweep_removes_the_workspace_of_a_project_that_no_longer_exists(cast, project_a):
    from runs.services.workspaces import workspaces_purge

    kept = project_workspace_create(project_a.id)
    orphan = project_workspace_create(uuid.uuid4())  # its project was deleted while a command still wrote in it
    assert workspaces_purge() == 1
    assert not orphan.exists()
    assert kept.exists()
