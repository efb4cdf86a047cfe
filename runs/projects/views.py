"""Dashboard views for projects: the list (and create form), the project page (facts, edit, start a run, its runs
live, the workspace's files, GitHub settings and recent deliveries), the workspace as a zip, and delete.

Every view resolves the project inside the session's org (another org's project is a 404 like a missing one).
Reading needs ``runs:read``; creating, editing and starting runs ``runs:write``; deleting and the GitHub settings
``projects:manage`` (Admins). The workspace is the agents' output: its files are shown escaped, never as HTML.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db.models import Count, Max
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.utils.text import slugify
from django.views import View

from orgs import permissions
from orgs.forms import apply_service_errors
from orgs.mixins import OrgViewMixin
from runs.models import Project
from runs.projects.forms import GitHubConnectForm, ProjectDeleteForm, ProjectForm, ProjectRunForm
from runs.projects.selectors import project_deliveries, project_get_for_org, project_runs, projects_for_org
from runs.projects.services import project_create, project_delete, project_run_create, project_update
from runs.views import _models_by_key, _usable_keys, run_creator
from runs.webhooks.services import project_github_connect, project_github_disconnect, project_github_rotate
from runs.workspaces import WorkspaceError, project_workspace_path, read_file, tree, usage, zip_chunks
from runs.workspaces.files import TREE_MAX_ENTRIES

PROJECT_RUNS_SHOWN = 50
DELIVERIES_SHOWN = 20
# read_file numbers lines like ``cat -n``: six right-aligned digits and a tab.
_NUMBERED_LINE = re.compile(r"^ *(\d+)\t(.*)$", re.S)


def _split_numbered(text: str) -> list[tuple[str, str]]:
    """read_file's text as (line number, line) pairs, so the page shows the numbers in a gutter that copying leaves
    out; its notes (truncation, an empty file) have no number."""
    rows: list[tuple[str, str]] = []
    for line in text.split("\n"):
        match = _NUMBERED_LINE.match(line)
        rows.append((match.group(1), match.group(2)) if match else ("", line))
    return rows


def hook_url(request: HttpRequest, project: Project) -> str:
    """The payload URL to paste into GitHub, as this request reached us (scheme and host)."""
    return f"{request.scheme}://{request.get_host()}/hooks/github/{project.id}/"


class ProjectListView(OrgViewMixin, View):
    """The org's projects with their size and activity, and the form that creates one."""

    template_name = "runs/projects/project_list.html"
    capabilities = {"GET": permissions.RUNS_READ, "POST": permissions.RUNS_WRITE}

    def _form(self, data: Any = None) -> ProjectForm:
        return ProjectForm(data, provider_keys=_usable_keys(self.org))

    def get(self, request: HttpRequest) -> HttpResponse:
        return self._render(request, self._form())

    def post(self, request: HttpRequest) -> HttpResponse:
        form = self._form(request.POST)
        if form.is_valid():
            data = form.cleaned_data
            try:
                project = project_create(
                    org=self.org,
                    actor=self.org_context.actor,
                    name=data["name"],
                    description=data["description"],
                    default_provider_key_id=data["default_provider_key"] or None,
                    default_model=data["default_model"],
                )
            except ValidationError as exc:
                apply_service_errors(form, exc)
            else:
                messages.success(request, f"Project “{project.name}” created. Start a run on it below.")
                return redirect("runs:project_detail", project_id=project.id)
        return self._render(request, form, status=400)

    def _render(self, request: HttpRequest, form: ProjectForm, status: int = 200) -> HttpResponse:
        projects = projects_for_org(org=self.org).annotate(runs_count=Count("runs"), last_run=Max("runs__created_at"))
        data = {
            "org": self.org,
            "projects": projects,
            "form": form,
            "can_create": self.org_context.can(permissions.RUNS_WRITE),
        }
        return render(request, self.template_name, data, status=status)


class _ProjectViewMixin(OrgViewMixin):
    """Resolves ``project_id`` in the session's org (404 otherwise) and renders the project page, with whatever
    bound form or one-time secret the calling action has to show."""

    template_name = "runs/projects/project_detail.html"

    def get_project(self, project_id: uuid.UUID) -> Project:
        project = project_get_for_org(org=self.org, project_id=project_id)
        if project is None:
            raise Http404
        return project

    def render_page(self, request: HttpRequest, project: Project, status: int = 200, **extra: Any) -> HttpResponse:
        keys = _usable_keys(self.org)
        models_by_key = _models_by_key(self.org, keys)
        can_write = self.org_context.can(permissions.RUNS_WRITE)
        can_manage = self.org_context.can(permissions.PROJECTS_MANAGE)
        root = project_workspace_path(project.id)
        files = tree(root)
        size, file_count = usage(root)
        data: dict[str, Any] = {
            "org": self.org,
            "project": project,
            "can_write": can_write,
            "can_manage": can_manage,
            "has_keys": bool(keys),
            "edit_form": ProjectForm(initial=ProjectForm.initial_for(project), provider_keys=keys),
            "run_form": ProjectRunForm(project=project, provider_keys=keys, models_by_key=models_by_key),
            "models_by_key": models_by_key,
            "runs": [(run, run_creator(run)) for run in project_runs(project=project, limit=PROJECT_RUNS_SHOWN)],
            "runs_shown": PROJECT_RUNS_SHOWN,
            "files": files,
            "files_capped": len(files) >= TREE_MAX_ENTRIES,
            "workspace_bytes": size,
            "workspace_files": file_count,
            "deliveries": project_deliveries(project=project, limit=DELIVERIES_SHOWN),
            "hook_url": hook_url(request, project),
            "connect_form": GitHubConnectForm(),
            "delete_form": ProjectDeleteForm(project=project),
            **self._selected_file(request, root),
            **extra,
        }
        return render(request, self.template_name, data, status=status)

    @staticmethod
    def _selected_file(request: HttpRequest, root: Path) -> dict[str, Any]:
        path = request.GET.get("path", "")
        if not path:
            return {}
        try:
            text = read_file(root, path)
        except WorkspaceError as exc:
            # Binary, a directory, a link, outside the workspace: the confinement's own words, which never name
            # a host path or file content.
            return {"selected_path": path, "file_error": str(exc)}
        return {"selected_path": path, "file_lines": _split_numbered(text)}


class ProjectDetailView(_ProjectViewMixin, View):
    capability = permissions.RUNS_READ

    def get(self, request: HttpRequest, project_id: uuid.UUID) -> HttpResponse:
        return self.render_page(request, self.get_project(project_id))


class ProjectRunsView(_ProjectViewMixin, View):
    """The project's runs table alone: project-live.js fetches it when a new run appears in the org's feed (the
    feed's events do not say which project a run is on, so the server decides what belongs here)."""

    capability = permissions.RUNS_READ

    def get(self, request: HttpRequest, project_id: uuid.UUID) -> HttpResponse:
        project = self.get_project(project_id)
        rows = [(run, run_creator(run)) for run in project_runs(project=project, limit=PROJECT_RUNS_SHOWN)]
        return render(request, "runs/projects/_runs.html", {"project": project, "runs": rows})


class ProjectEditView(_ProjectViewMixin, View):
    http_method_names = ["post"]
    capability = permissions.RUNS_WRITE

    def post(self, request: HttpRequest, project_id: uuid.UUID) -> HttpResponse:
        project = self.get_project(project_id)
        form = ProjectForm(request.POST, provider_keys=_usable_keys(self.org))
        if form.is_valid():
            data = form.cleaned_data
            try:
                project_update(
                    project=project,
                    actor=self.org_context.actor,
                    name=data["name"],
                    description=data["description"],
                    default_provider_key_id=data["default_provider_key"] or None,
                    default_model=data["default_model"],
                )
            except ValidationError as exc:
                apply_service_errors(form, exc)
                project.refresh_from_db()  # the page shows what is stored, not the refused change
            else:
                messages.success(request, "Project saved.")
                return redirect("runs:project_detail", project_id=project.id)
        return self.render_page(request, project, status=400, edit_form=form, edit_open=True)


class ProjectRunCreateView(_ProjectViewMixin, View):
    """Start an agent run on the project. Like the new-run page, it leads to the run page, which attaches its
    stream; the run starts then (or once the project's current run has ended)."""

    http_method_names = ["post"]
    capability = permissions.RUNS_WRITE

    def post(self, request: HttpRequest, project_id: uuid.UUID) -> HttpResponse:
        project = self.get_project(project_id)
        keys = _usable_keys(self.org)
        models_by_key = _models_by_key(self.org, keys)
        form = ProjectRunForm(request.POST, project=project, provider_keys=keys, models_by_key=models_by_key)
        if form.is_valid():
            data = form.cleaned_data
            try:
                run = project_run_create(
                    project=project,
                    actor=self.org_context.actor,
                    objective=data["objective"],
                    provider_key_id=data["provider_key"],
                    model=data["model"],
                    watch=True,
                )
            except ValidationError as exc:
                apply_service_errors(
                    form, exc, field_map={"model": "custom_model"} if not form.has_model_list else None
                )
            else:
                return redirect("runs:run_detail", run_id=run.id)
        return self.render_page(request, project, status=400, run_form=form)


class ProjectWorkspaceView(_ProjectViewMixin, View):
    """The project's workspace as a zip built on the fly. Unlike a one-off run's workspace, downloading it deletes
    nothing: the workspace lives as long as the project."""

    capability = permissions.RUNS_READ

    def get(self, request: HttpRequest, project_id: uuid.UUID) -> HttpResponseBase:
        project = self.get_project(project_id)
        root = project_workspace_path(project.id)
        size, _ = usage(root)
        if size > settings.WORKSPACE_MAX_BYTES:
            messages.error(request, "This workspace is larger than the download limit.")
            return redirect("runs:project_detail", project_id=project.id)
        name = slugify(project.name)[:40] or project.id.hex[:12]
        response = StreamingHttpResponse(project_zip_stream(root), content_type="application/zip")
        response["Content-Disposition"] = f'attachment; filename="cesaflow-project-{name}.zip"'
        response["Cache-Control"] = "no-store"
        response["X-Accel-Buffering"] = "no"
        return response


async def project_zip_stream(root: Path) -> AsyncIterator[bytes]:
    """The zip, chunk by chunk, built in a worker thread (never on the event loop, never in a file)."""
    chunks: Iterator[bytes] = zip_chunks(root, max_bytes=settings.WORKSPACE_MAX_BYTES)
    done: Any = object()
    try:
        while True:
            chunk = await asyncio.to_thread(next, chunks, done)
            if chunk is done:
                break
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # a generator: releases the open file and the zip writer at once


class ProjectDeleteView(_ProjectViewMixin, View):
    """Delete a project after its name was typed: its workspace goes at once, its runs keep their metadata."""

    http_method_names = ["post"]
    capability = permissions.PROJECTS_MANAGE

    def post(self, request: HttpRequest, project_id: uuid.UUID) -> HttpResponse:
        project = self.get_project(project_id)
        form = ProjectDeleteForm(request.POST, project=project)
        if not form.is_valid():
            return self.render_page(request, project, status=400, delete_form=form)
        name = project.name
        cancelled = project_delete(project=project, actor=self.org_context.actor)
        text = f"Project “{name}” deleted. Its workspace was deleted with it: its files are gone for good."
        if cancelled:
            text += f" Runs still going on it were cancelled ({cancelled})."
        messages.success(request, text + " Its runs keep their metadata on the Runs page.")
        return redirect("runs:project_list")


class ProjectGitHubConnectView(_ProjectViewMixin, View):
    """Connect a repository: the webhook secret is generated and shown in this response only."""

    http_method_names = ["post"]
    capability = permissions.PROJECTS_MANAGE

    def post(self, request: HttpRequest, project_id: uuid.UUID) -> HttpResponse:
        project = self.get_project(project_id)
        form = GitHubConnectForm(request.POST)
        if form.is_valid():
            try:
                secret = project_github_connect(
                    project=project,
                    actor=self.org_context.actor,
                    repository=form.cleaned_data["repository"],
                    label=form.cleaned_data["label"],
                )
            except ValidationError as exc:
                apply_service_errors(form, exc)
            else:
                return self.render_page(request, project, new_secret=secret, github_change="connected")
        return self.render_page(request, project, status=400, connect_form=form)


class ProjectGitHubRotateView(_ProjectViewMixin, View):
    """A new webhook secret, shown in this response only."""

    http_method_names = ["post"]
    capability = permissions.PROJECTS_MANAGE

    def post(self, request: HttpRequest, project_id: uuid.UUID) -> HttpResponse:
        project = self.get_project(project_id)
        try:
            secret = project_github_rotate(project=project, actor=self.org_context.actor)
        except ValidationError as exc:
            messages.error(request, exc.messages[0])
            return redirect("runs:project_detail", project_id=project.id)
        return self.render_page(request, project, new_secret=secret, github_change="rotated")


class ProjectGitHubDisconnectView(_ProjectViewMixin, View):
    http_method_names = ["post"]
    capability = permissions.PROJECTS_MANAGE

    def post(self, request: HttpRequest, project_id: uuid.UUID) -> HttpResponse:
        project = self.get_project(project_id)
        try:
            project_github_disconnect(project=project, actor=self.org_context.actor)
        except ValidationError as exc:
            messages.error(request, exc.messages[0])
        else:
            messages.success(
                request,
                "GitHub disconnected: deliveries to this project's hook are refused from now on. "
                "Remove the webhook in the repository's settings too.",
            )
        return redirect("runs:project_detail", project_id=project.id)
