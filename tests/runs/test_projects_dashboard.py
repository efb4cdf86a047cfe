"""The projects dashboard: the list and create form, the project page (edit, start a run, its runs, the file
browser, the zip, GitHub settings, recent deliveries) and delete with typed confirmation, each behind the tenant
gate. Nothing executes (``RUN_EXECUTOR=worker`` and no worker); workspaces live under a fresh directory in /tmp."""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from keys.models import ProviderKey
from runs.models import AuditEvent, Project, Run, RunKind, RunStatus
from runs.projects.services import project_create, project_run_create
from runs.services import run_create
from runs.webhooks.services import project_github_connect, webhook_delivery_receive
from runs.workspaces import project_workspace_create, project_workspace_path, write_file
from tests.runs.test_execution_support import sim_key

pytestmark = pytest.mark.django_db

PROJECT_LIST = reverse("runs:project_list")


@pytest.fixture(autouse=True)
def workspace_root(settings) -> Iterator[Path]:
    """Workspaces under a fresh 0o711 directory in /tmp; nothing is handed to an executor."""
    base = Path(tempfile.mkdtemp(prefix="cesaflow-projects-dash-", dir="/tmp"))
    base.chmod(0o711)
    settings.WORKSPACE_ROOT = base / "workspaces"
    settings.RUN_EXECUTOR = "worker"
    yield settings.WORKSPACE_ROOT
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def key_a(cast, simulator) -> ProviderKey:
    return sim_key(cast.org_a, cast.admin_a.user, simulator)


@pytest.fixture
def project(cast, key_a) -> Project:
    return project_create(
        org=cast.org_a,
        actor=cast.dev_a.user,
        name="Website",
        description="The marketing site.",
        default_provider_key_id=key_a.id,
        default_model="fake/agent_demo",
    )


def url(name: str, project: Project) -> str:
    return reverse(f"runs:{name}", kwargs={"project_id": project.id})


def zip_bytes(response: Any) -> bytes:
    """The streamed zip (an async iterator: the view builds it in a worker thread)."""

    async def collect(chunks: AsyncIterator[bytes]) -> bytes:
        return b"".join([chunk async for chunk in chunks])

    assert response.is_async
    data: bytes = async_to_sync(collect)(response.streaming_content)
    return data


def flash(response: Any) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


# --- The tenant gate ----------------------------------------------------------------------------------------------

# (method, route name or None for the list, what it needs): "read", "write" (Developers) or "manage" (Admins).
ROUTES: list[tuple[str, str | None, str]] = [
    ("get", None, "read"),
    ("post", None, "write"),
    ("get", "project_detail", "read"),
    ("get", "project_runs", "read"),
    ("get", "project_workspace", "read"),
    ("post", "project_edit", "write"),
    ("post", "project_run_new", "write"),
    ("post", "project_delete", "manage"),
    ("post", "project_github_connect", "manage"),
    ("post", "project_github_rotate", "manage"),
    ("post", "project_github_disconnect", "manage"),
]
PROJECT_ROUTES = [route for route in ROUTES if route[1] is not None]


def _url(route: tuple[str, str | None, str], project: Project) -> str:
    return PROJECT_LIST if route[1] is None else url(route[1], project)


def _untouched(project: Project) -> None:
    fresh = Project.objects.get(id=project.id)
    assert (fresh.name, fresh.github_repository) == ("Website", "")
    assert not Run.objects.filter(project=project).exists()
    assert Project.objects.filter(org=project.org).count() == 1


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r[0]}-{r[1] or 'project_list'}")
def test_anonymous_visitors_are_sent_to_log_in(cast, project, client, route):
    response = getattr(client, route[0])(_url(route, project), {"name": "Website", "confirm_name": "Website"})
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("orgs:login"))
    _untouched(project)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r[0]}-{r[1] or 'project_list'}")
def test_outsider_without_an_org_is_sent_to_create_one(cast, project, route):
    response = getattr(cast.outsider.client(), route[0])(_url(route, project), {"confirm_name": "Website"})
    assert response.status_code == 302
    assert response["Location"] == reverse("orgs:org_create")
    _untouched(project)


@pytest.mark.parametrize("route", PROJECT_ROUTES, ids=lambda r: f"{r[0]}-{r[1]}")
def test_another_orgs_admin_gets_404_for_every_project_route(cast, project, route):
    data = {"confirm_name": "Website", "repository": "acme/site", "label": "cesaflow", "name": "Mine"}
    response = getattr(cast.admin_b.client(), route[0])(_url(route, project), data)
    assert response.status_code == 404
    _untouched(project)


@pytest.mark.parametrize("route", PROJECT_ROUTES, ids=lambda r: f"{r[0]}-{r[1]}")
def test_another_orgs_developer_gets_404_or_403_for_admin_actions(cast, project, route):
    response = getattr(cast.dev_b.client(), route[0])(_url(route, project), {"confirm_name": "Website"})
    # The capability is checked before the project is looked up, so a 403 says nothing about the id.
    assert response.status_code == (403 if route[2] == "manage" else 404)
    _untouched(project)


@pytest.mark.parametrize("route", [r for r in ROUTES if r[2] == "manage"], ids=lambda r: r[1] or "")
def test_developer_cannot_delete_a_project_or_manage_its_github_settings(cast, project, route):
    data = {"confirm_name": "Website", "repository": "acme/site", "label": "cesaflow"}
    response = getattr(cast.dev_a.client(), route[0])(_url(route, project), data)
    assert response.status_code == 403
    _untouched(project)


def test_a_missing_project_is_404_and_a_bad_id_does_not_route(cast):
    client = cast.admin_a.client()
    missing = reverse("runs:project_detail", kwargs={"project_id": uuid.uuid4()})
    assert client.get(missing).status_code == 404
    assert client.get("/projects/123/").status_code == 404


def test_developer_sees_no_admin_forms_and_admin_sees_them(cast, project):
    page = cast.dev_a.client().get(url("project_detail", project)).content.decode()
    assert url("project_delete", project) not in page
    assert url("project_github_connect", project) not in page
    assert url("project_run_new", project) in page
    page = cast.admin_a.client().get(url("project_detail", project)).content.decode()
    assert url("project_delete", project) in page
    assert url("project_github_connect", project) in page


# --- The list and create ------------------------------------------------------------------------------------------


def test_list_shows_the_orgs_projects_with_their_facts_and_not_another_orgs(cast, project, key_a):
    project_create(org=cast.org_b, actor=cast.admin_b.user, name="Org B's secret project")
    project_run_create(project=project, actor=cast.dev_a.user, objective="Add a page.", watch=False)
    response = cast.dev_a.client().get(PROJECT_LIST)
    assert response.status_code == 200
    content = response.content.decode()
    assert url("project_detail", project) in content
    assert "The marketing site." in content
    assert "fake/agent_demo" in content
    row = re.search(r"<tr>\s*<td class=\"project-name-cell\">(.*?)</tr>", content, re.S)
    assert row is not None
    assert re.search(r'<td class="num">1</td>', row.group(1))  # one run
    assert "secret project" not in content
    # Projects sit between Runs and Usage in the top bar, current here.
    nav = re.search(r'<nav class="main-nav".*?</nav>', content, re.S)
    assert nav is not None
    links = re.findall(r">(\w[\w ]*)</a>", nav.group(0))
    assert links[links.index("Runs") + 1 : links.index("Runs") + 3] == ["Projects", "Usage"]
    assert f'href="{PROJECT_LIST}" aria-current="page"' in nav.group(0)


def test_list_query_count_does_not_grow_with_the_number_of_projects(cast, project, key_a):
    client = cast.admin_a.client()
    client.get(PROJECT_LIST)

    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert client.get(PROJECT_LIST).status_code == 200
        return len(queries)

    few = count()
    for n in range(5):
        other = project_create(org=cast.org_a, actor=cast.admin_a.user, name=f"P{n}", default_provider_key_id=key_a.id)
        project_run_create(project=other, actor=cast.admin_a.user, objective="x", model="m", watch=False)
    assert count() == few


def test_developer_creates_a_project_and_lands_on_its_page(cast, key_a):
    client = cast.dev_a.client()
    response = client.post(
        PROJECT_LIST,
        {"name": "  API  ", "description": "Backend", "default_provider_key": str(key_a.id), "default_model": "m1"},
    )
    project = Project.objects.get(org=cast.org_a)
    assert response.status_code == 302
    assert response["Location"] == url("project_detail", project)
    assert (project.name, project.description, project.default_provider_key_id, project.default_model) == (
        "API",
        "Backend",
        key_a.id,
        "m1",
    )
    assert project.created_by == cast.dev_a.user
    assert AuditEvent.objects.filter(event=AuditEvent.PROJECT_CREATED, target_id=str(project.id)).exists()
    assert client.get(response["Location"]).status_code == 200


def test_creating_a_duplicate_name_is_a_field_error(cast, project):
    response = cast.dev_a.client().post(PROJECT_LIST, {"name": "website"})
    assert response.status_code == 400
    assert "A project with this name already exists." in response.context["form"].errors["name"]
    assert Project.objects.filter(org=cast.org_a).count() == 1
    # The same name in another org is another project.
    assert cast.admin_b.client().post(PROJECT_LIST, {"name": "Website"}).status_code == 302


def test_another_orgs_key_as_the_default_is_refused(cast, simulator):
    key_b = sim_key(cast.org_b, cast.admin_b.user, simulator)
    response = cast.admin_a.client().post(PROJECT_LIST, {"name": "X", "default_provider_key": str(key_b.id)})
    assert response.status_code == 400
    assert response.context["form"].errors["default_provider_key"]
    assert not Project.objects.filter(org=cast.org_a).exists()


# --- Edit ---------------------------------------------------------------------------------------------------------


def test_edit_changes_name_description_and_defaults(cast, project):
    response = cast.dev_a.client().post(
        url("project_edit", project),
        {"name": "Website v2", "description": "", "default_provider_key": "", "default_model": "fake/echo"},
    )
    assert response.status_code == 302
    project.refresh_from_db()
    assert (project.name, project.description, project.default_provider_key_id, project.default_model) == (
        "Website v2",
        "",
        None,
        "fake/echo",
    )
    assert AuditEvent.objects.filter(event=AuditEvent.PROJECT_UPDATED, target_id=str(project.id)).exists()


def test_edit_to_a_duplicate_name_is_a_field_error_and_changes_nothing(cast, project):
    project_create(org=cast.org_a, actor=cast.admin_a.user, name="Docs")
    write_file(project_workspace_create(project.id), "a.py", "x")
    response = cast.dev_a.client().post(url("project_edit", project), {"name": "DOCS", "default_model": "other"})
    assert response.status_code == 400
    assert "A project with this name already exists." in response.context["edit_form"].errors["name"]
    assert response.context["edit_open"] is True
    # The page rendered under the edit URL still links its files to the project page.
    content = response.content.decode()
    assert f'href="{url("project_detail", project)}?path=a.py#files"' in content
    project.refresh_from_db()
    assert (project.name, project.default_model) == ("Website", "fake/agent_demo")


# --- Start a run --------------------------------------------------------------------------------------------------


def test_starting_a_run_creates_a_watched_agent_run_on_the_project_and_opens_its_page(cast, project, key_a):
    client = cast.dev_a.client()
    page = client.get(url("project_detail", project))
    form = page.context["run_form"]
    assert form.initial["provider_key"] == str(key_a.id)
    assert "kind" not in form.fields
    # No model given: the project's default.
    response = client.post(
        url("project_run_new", project), {"objective": "Add a contact page.", "provider_key": key_a.id}
    )
    run = Run.objects.get(project=project)
    assert response.status_code == 302
    assert response["Location"] == reverse("runs:run_detail", kwargs={"run_id": run.id})
    assert (run.kind, run.watch, run.status, run.model, run.objective) == (
        RunKind.AGENT,
        True,
        RunStatus.QUEUED,
        "fake/agent_demo",
        "Add a contact page.",
    )
    assert (run.created_by_user, run.provider_key_id) == (cast.dev_a.user, key_a.id)
    run_page = client.get(response["Location"]).content.decode()
    assert url("project_detail", project) in run_page
    assert "persistent workspace" in run_page
    assert "Waiting for the project's current run to end." in run_page
    # The project page lists it.
    assert f'data-run-id="{run.id}"' in client.get(url("project_detail", project)).content.decode()


def test_a_run_with_a_typed_model_and_a_run_without_objective(cast, project, key_a):
    client = cast.dev_a.client()
    data = {"objective": "Fix it", "provider_key": str(key_a.id), "custom_model": "fake/echo"}
    assert client.post(url("project_run_new", project), data).status_code == 302
    assert Run.objects.get(project=project).model == "fake/echo"
    response = client.post(url("project_run_new", project), {"objective": "", "provider_key": str(key_a.id)})
    assert response.status_code == 400
    assert response.context["run_form"].errors["objective"]
    assert Run.objects.filter(project=project).count() == 1


def test_a_project_without_a_default_model_needs_one(cast, key_a):
    bare = project_create(org=cast.org_a, actor=cast.dev_a.user, name="Bare")
    response = cast.dev_a.client().post(url("project_run_new", bare), {"objective": "Go", "provider_key": key_a.id})
    assert response.status_code == 400
    assert not Run.objects.exists()


def test_the_project_runs_table_lists_only_this_projects_runs(cast, project, key_a):
    other = project_create(org=cast.org_a, actor=cast.dev_a.user, name="Other", default_provider_key_id=key_a.id)
    mine = project_run_create(project=project, actor=cast.dev_a.user, objective="Mine", watch=False)
    theirs = project_run_create(project=other, actor=cast.dev_a.user, objective="Theirs", model="m", watch=False)
    chat = run_create(org=cast.org_a, actor=cast.dev_a.user, provider_key_id=key_a.id, model="m", objective="c")
    response = cast.dev_a.client().get(url("project_runs", project))
    assert response.status_code == 200
    content = response.content.decode()
    assert f'data-run-id="{mine.id}"' in content
    assert str(theirs.id) not in content
    assert str(chat.id) not in content
    assert "<html" not in content  # a fragment for project-live.js
    page = cast.dev_a.client().get(url("project_detail", project)).content.decode()
    assert 'data-ws-path="/ws/org/runs/"' in page
    assert f'data-runs-url="{url("project_runs", project)}"' in page
    assert 'src="/static/js/project-live.js"' in page


# --- The file browser and the zip ---------------------------------------------------------------------------------


def test_file_browser_lists_files_with_sizes_and_shows_one_escaped(cast, project):
    root = project_workspace_create(project.id)
    write_file(root, "a.py", "<script>x</script>")
    write_file(root, "src/b.txt", "line one\nline two\n")
    client = cast.dev_a.client()
    page = client.get(url("project_detail", project))
    assert page.context["files"] == [("a.py", 18), ("src/b.txt", 18)]
    content = page.content.decode()
    assert f'href="{url("project_detail", project)}?path=a.py#files"' in content
    assert f'href="{url("project_detail", project)}?path=src/b.txt#files"' in content

    response = client.get(url("project_detail", project), {"path": "a.py"})
    assert response.status_code == 200
    content = response.content.decode()
    assert "&lt;script&gt;x&lt;/script&gt;" in content
    assert "<script>x</script>" not in content
    assert '<span class="ln">1</span>&lt;script&gt;' in content
    response = client.get(url("project_detail", project), {"path": "src/b.txt"})
    assert response.context["file_lines"] == [("1", "line one"), ("2", "line two")]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../outside.txt", "it points outside the workspace"),
        ("src/../../x", "it points outside the workspace"),
        ("/etc/passwd", "absolute paths are not allowed"),
        ("leak", "it points outside the workspace"),
        ("src", "is a directory"),
        ("missing.py", "No such file"),
        ("blob.bin", "looks like a binary file"),
    ],
)
def test_file_browser_refuses_what_the_tools_refuse(cast, project, path, message):
    root = project_workspace_create(project.id)
    write_file(root, "src/b.txt", "hello")
    (root / "blob.bin").write_bytes(b"\x00\x01binary")
    os.symlink("/etc/passwd", root / "leak")
    response = cast.dev_a.client().get(url("project_detail", project), {"path": path})
    assert response.status_code == 200
    assert message in response.context["file_error"]
    content = response.content.decode()
    assert "root:" not in content
    assert "data-file-error" in content
    # The planted link is not listed either.
    assert "leak" not in [name for name, _size in response.context["files"]]


def test_an_empty_workspace_says_so(cast, project):
    response = cast.dev_a.client().get(url("project_detail", project))
    assert response.context["files"] == []
    assert "The workspace is empty" in response.content.decode()


def test_the_zip_holds_the_files_and_leaves_the_workspace_in_place(cast, project):
    root = project_workspace_create(project.id)
    write_file(root, "a.py", "<script>x</script>")
    os.symlink("/etc/passwd", root / "leak")
    response = cast.dev_a.client().get(url("project_workspace", project))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    assert response["Content-Disposition"] == 'attachment; filename="cesaflow-project-website.zip"'
    assert response["Cache-Control"] == "no-store"
    data = zip_bytes(response)
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.namelist() == ["a.py"]
    assert archive.read("a.py") == b"<script>x</script>"
    assert b"root:" not in data
    # Downloading deletes nothing: the workspace lives as long as the project.
    assert (root / "a.py").read_text() == "<script>x</script>"
    assert zipfile.ZipFile(
        io.BytesIO(zip_bytes(cast.dev_a.client().get(url("project_workspace", project))))
    ).namelist() == ["a.py"]


def test_a_workspace_over_the_download_limit_is_refused_with_a_message(cast, project, settings):
    root = project_workspace_create(project.id)
    write_file(root, "big.txt", "x" * 100)
    settings.WORKSPACE_MAX_BYTES = 10
    response = cast.dev_a.client().get(url("project_workspace", project))
    assert response.status_code == 302
    assert response["Location"] == url("project_detail", project)
    assert flash(response) == ["This workspace is larger than the download limit."]


# --- GitHub -------------------------------------------------------------------------------------------------------


def test_admin_connects_a_repository_and_sees_the_secret_once_with_the_payload_url(cast, project):
    client = cast.admin_a.client()
    response = client.post(url("project_github_connect", project), {"repository": "acme/site", "label": "cesaflow"})
    assert response.status_code == 200
    secret = response.context["new_secret"]
    assert len(secret) >= 20
    content = response.content.decode()
    assert secret in content
    assert f"http://testserver/hooks/github/{project.id}/" in content
    assert 'data-copy-target="github-secret"' in content
    assert "it will not be shown again" in content
    project.refresh_from_db()
    assert (project.github_repository, project.github_label, project.github_connected) == (
        "acme/site",
        "cesaflow",
        True,
    )
    assert secret not in project.github_secret_sealed
    # Never again.
    again = client.get(url("project_detail", project)).content.decode()
    assert secret not in again
    assert "acme/site" in again
    assert f"http://testserver/hooks/github/{project.id}/" in again


def test_connecting_a_malformed_repository_is_a_field_error(cast, project):
    response = cast.admin_a.client().post(
        url("project_github_connect", project), {"repository": "not a repo", "label": "x"}
    )
    assert response.status_code == 400
    assert response.context["connect_form"].errors["repository"]
    assert "new_secret" not in response.context
    project.refresh_from_db()
    assert not project.github_connected


def test_admin_rotates_then_disconnects(cast, project):
    client = cast.admin_a.client()
    first = client.post(url("project_github_connect", project), {"repository": "acme/site", "label": "go"})
    response = client.post(url("project_github_rotate", project))
    assert response.status_code == 200
    rotated = response.context["new_secret"]
    assert rotated != first.context["new_secret"]
    assert rotated in response.content.decode()
    assert "previous secret keeps verifying" in response.content.decode()
    response = client.post(url("project_github_disconnect", project))
    assert response.status_code == 302
    assert "GitHub disconnected" in flash(response)[0]
    project.refresh_from_db()
    assert not project.github_connected
    assert (project.github_secret_sealed, project.github_previous_secret_sealed) == ("", "")
    events = set(AuditEvent.objects.filter(target_id=str(project.id)).values_list("event", flat=True))
    assert {AuditEvent.GITHUB_CONNECTED, AuditEvent.GITHUB_SECRET_ROTATED, AuditEvent.GITHUB_DISCONNECTED} <= events


def test_rotating_without_a_repository_says_so(cast, project):
    response = cast.admin_a.client().post(url("project_github_rotate", project))
    assert response.status_code == 302
    assert flash(response) == ["Connect a GitHub repository before rotating its secret."]


def test_the_project_page_lists_recent_deliveries_without_payloads(cast, project):
    project_github_connect(project=project, actor=cast.admin_a.user, repository="acme/site")
    repo = {"full_name": "acme/site"}
    ping = {"zen": "Keep it logically awesome.", "hook_id": 1, "repository": repo}
    webhook_delivery_receive(
        project_id=project.id, delivery_id="d-ping-1", event="ping", payload=ping, body_sha256="a" * 64
    )
    opened = {"action": "opened", "issue": {"title": "Payload title"}, "repository": repo}
    webhook_delivery_receive(
        project_id=project.id, delivery_id="d-open-2", event="issues", payload=opened, body_sha256="b" * 64
    )
    content = cast.dev_a.client().get(url("project_detail", project)).content.decode()
    table = re.search(r'<table class="table deliveries-table">.*?</table>', content, re.S)
    assert table is not None
    rows = table.group(0)
    assert "d-ping-1" in rows
    assert "pong" in rows
    assert "d-open-2" in rows
    assert "issues.opened" in rows
    assert "ignored" in rows
    assert "deliveries do not start runs" in rows
    assert "logically awesome" not in content
    assert "Payload title" not in content


# --- Delete -------------------------------------------------------------------------------------------------------


def test_delete_needs_the_typed_name(cast, project):
    root = project_workspace_create(project.id)
    write_file(root, "a.py", "print(1)")
    client = cast.admin_a.client()
    for typed in ("", "website", "Websit"):
        response = client.post(url("project_delete", project), {"confirm_name": typed})
        assert response.status_code == 400
        assert response.context["delete_form"].errors["confirm_name"]
    assert "That is not the project&#x27;s name: nothing was deleted." in response.content.decode()
    assert Project.objects.filter(id=project.id).exists()
    assert (root / "a.py").exists()


def test_delete_removes_the_project_and_its_workspace_keeps_runs_and_says_so(cast, project):
    root = project_workspace_create(project.id)
    write_file(root, "a.py", "print(1)")
    run = project_run_create(project=project, actor=cast.dev_a.user, objective="Build", watch=False)
    response = cast.admin_a.client().post(url("project_delete", project), {"confirm_name": " Website "})
    assert response.status_code == 302
    assert response["Location"] == PROJECT_LIST
    [message] = flash(response)
    assert "Project “Website” deleted" in message
    assert "workspace was deleted" in message
    assert "cancelled (1)" in message
    assert not Project.objects.filter(id=project.id).exists()
    assert not project_workspace_path(project.id).exists()
    run.refresh_from_db()
    assert (run.project_id, run.status, run.objective) == (None, RunStatus.CANCELLED, "Build")
    assert AuditEvent.objects.filter(event=AuditEvent.PROJECT_DELETED, target_id=str(project.id)).exists()
    # The run page no longer links to a project.
    assert (
        "persistent workspace"
        not in cast.admin_a.client().get(reverse("runs:run_detail", kwargs={"run_id": run.id})).content.decode()
    )


def test_project_pages_have_no_inline_script_and_carry_the_csp(cast, project):
    for page in (PROJECT_LIST, url("project_detail", project)):
        response = cast.admin_a.client().get(page)
        assert "'unsafe-inline'" not in response["Content-Security-Policy"]
        assert response["Cache-Control"] == "no-store"
        content = response.content.decode()
        for attributes, _body in re.findall(r"<script\b([^>]*)>(.*?)</script>", content, flags=re.S):
            assert "src=" in attributes or 'type="application/json"' in attributes, attributes
