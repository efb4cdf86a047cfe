"""REST API v1 for named projects: ``/projects`` (list, create), ``/projects/{id}`` (read, update, delete),
``/projects/{id}/files`` (the workspace's tree), ``/projects/{id}/files/{path}`` (one text file) and
``/projects/{id}/workspace`` (a zip; unlike a run's, downloading it deletes nothing). Another org's project is a 404
like a missing one everywhere, including as the ``project`` of a new run (``runs.api.views``)."""

from __future__ import annotations

import errno
from typing import Any

from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from cesaflow.lib.api import ApiError, StrictInputSerializer, error_responses
from orgs.api.base import OrgAPIView
from orgs.permissions import PROJECTS_MANAGE, RUNS_READ, RUNS_WRITE
from runs.api.views import zip_body
from runs.models import Project
from runs.projects.selectors import project_get_for_org, projects_for_org
from runs.projects.services import (
    DESCRIPTION_MAX_CHARS,
    NAME_MAX_CHARS,
    project_create,
    project_delete,
    project_update,
)
from runs.services import MODEL_MAX_CHARS
from runs.workspaces import (
    WorkspaceError,
    project_workspace_create,
    project_workspace_path,
    read_text,
    tree,
    usage,
)

FILE_MAX_BYTES = 1024 * 1024


class ProjectSerializer(serializers.ModelSerializer[Project]):
    default_provider_key = serializers.UUIDField(source="default_provider_key_id", read_only=True, allow_null=True)
    github_connected = serializers.BooleanField(read_only=True)

    class Meta:
        model = Project
        fields = [
            "id",
            "name",
            "description",
            "default_provider_key",
            "default_model",
            "created_by_label",
            "created_at",
            "updated_at",
            "workspace_bytes",
            "last_run_at",
            "github_repository",
            "github_connected",
            "github_label",
        ]
        read_only_fields = fields


class ProjectWriteSerializer(StrictInputSerializer):
    name = serializers.CharField(max_length=NAME_MAX_CHARS)
    description = serializers.CharField(max_length=DESCRIPTION_MAX_CHARS, required=False, allow_blank=True)
    default_provider_key = serializers.UUIDField(required=False, allow_null=True)
    default_model = serializers.CharField(max_length=MODEL_MAX_CHARS, required=False, allow_blank=True)


class ProjectUpdateSerializer(ProjectWriteSerializer):
    name = serializers.CharField(max_length=NAME_MAX_CHARS, required=False)


class ProjectFileSerializer(serializers.Serializer[Any]):
    path = serializers.CharField()
    bytes = serializers.IntegerField()


class _ProjectMixin(OrgAPIView):
    def get_project(self, project_id: Any) -> Project:
        project = project_get_for_org(org=self.org, project_id=project_id)
        if project is None:
            raise exceptions.NotFound("No such project.")
        return project


class ProjectListView(OrgAPIView):
    capabilities = {"GET": RUNS_READ, "POST": RUNS_WRITE}
    serializer_class = ProjectSerializer

    @extend_schema(
        operation_id="projects_list",
        summary="The organization's projects",
        responses={200: ProjectSerializer(many=True), **error_responses(400, 401, 403)},
    )
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(projects_for_org(org=self.org))
        return self.get_paginated_response(ProjectSerializer(page, many=True).data)

    @extend_schema(
        operation_id="projects_create",
        summary="Create a project (a persistent workspace that agent runs build on)",
        request=ProjectWriteSerializer,
        responses={201: ProjectSerializer, **error_responses(400, 401, 403)},
    )
    def post(self, request: Request) -> Response:
        serializer = ProjectWriteSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        project = project_create(
            org=self.org,
            actor=self.org_context.actor,
            name=data["name"],
            description=data.get("description", ""),
            default_provider_key_id=data.get("default_provider_key"),
            default_model=data.get("default_model", ""),
        )
        response = Response(ProjectSerializer(project).data, status=status.HTTP_201_CREATED)
        response["Location"] = f"/api/v1/projects/{project.id}"
        return response


class ProjectDetailView(_ProjectMixin):
    capabilities = {"GET": RUNS_READ, "PATCH": RUNS_WRITE, "DELETE": PROJECTS_MANAGE}
    serializer_class = ProjectSerializer

    @extend_schema(
        operation_id="projects_retrieve",
        summary="One project",
        responses={200: ProjectSerializer, **error_responses(401, 403, 404)},
    )
    def get(self, request: Request, project_id: Any) -> Response:
        return Response(ProjectSerializer(self.get_project(project_id)).data)

    @extend_schema(
        operation_id="projects_update",
        summary="Rename a project or change its defaults",
        request=ProjectUpdateSerializer,
        responses={200: ProjectSerializer, **error_responses(400, 401, 403, 404)},
    )
    def patch(self, request: Request, project_id: Any) -> Response:
        project = self.get_project(project_id)
        serializer = ProjectUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        changes: dict[str, Any] = {
            name: data[name] for name in ("name", "description", "default_model") if name in data
        }
        if "default_provider_key" in data:
            changes["default_provider_key_id"] = data["default_provider_key"]
        project = project_update(project=project, actor=self.org_context.actor, **changes)
        return Response(ProjectSerializer(project).data)

    @extend_schema(
        operation_id="projects_destroy",
        summary="Delete a project and its workspace (Admins); its runs keep their metadata",
        responses={204: None, **error_responses(401, 403, 404)},
    )
    def delete(self, request: Request, project_id: Any) -> Response:
        project_delete(project=self.get_project(project_id), actor=self.org_context.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ProjectFilesView(_ProjectMixin):
    capabilities = {"GET": RUNS_READ}
    pagination_class = None  # the whole tree (capped at 2,000 files), not pages

    @extend_schema(
        operation_id="projects_files",
        summary="The project workspace's files (regular files, with sizes; links and special files left out)",
        responses={200: ProjectFileSerializer(many=True), **error_responses(401, 403, 404)},
    )
    def get(self, request: Request, project_id: Any) -> Response:
        project = self.get_project(project_id)
        root = project_workspace_path(project.id)
        files = tree(root) if root.is_dir() else []
        return Response([{"path": path, "bytes": size} for path, size in files])


class ProjectFileView(_ProjectMixin):
    capabilities = {"GET": RUNS_READ}

    @extend_schema(
        operation_id="projects_file",
        summary="One text file of the project's workspace (UTF-8, at most 1 MiB)",
        description="The path is relative to the workspace and confined to it like the agent's tools: `..`, "
        "absolute paths and symlinks are refused (400 `invalid_path`), as are binary and oversized files.",
        responses={
            (200, "text/plain"): OpenApiResponse(response=OpenApiTypes.STR, description="The file."),
            **error_responses(400, 401, 403, 404),
        },
    )
    def get(self, request: Request, project_id: Any, path: str) -> Any:
        project = self.get_project(project_id)
        root = project_workspace_path(project.id)
        if not root.is_dir():
            raise exceptions.NotFound("This project's workspace is empty.")
        try:
            text = read_text(root, path, max_bytes=FILE_MAX_BYTES)
        except WorkspaceError as exc:
            # The file tools say "No such file" as an error of the path; to an API client it is a missing resource.
            missing = isinstance(exc.__context__, OSError) and exc.__context__.errno in {errno.ENOENT, errno.ENOTDIR}
            if missing:
                raise exceptions.NotFound("No such file.") from None
            raise ApiError(400, "invalid_path", str(exc)) from None
        except FileNotFoundError:
            raise exceptions.NotFound("No such file.") from None
        response = HttpResponse(text, content_type="text/plain; charset=utf-8")
        # Generated content is shown as text, never rendered or sniffed as something else.
        response["X-Content-Type-Options"] = "nosniff"
        response["Content-Disposition"] = "inline"
        return response


class ProjectWorkspaceView(_ProjectMixin):
    capabilities = {"GET": RUNS_READ}

    @extend_schema(
        operation_id="projects_workspace",
        summary="Download the project's workspace as a zip (it stays in place)",
        responses={
            (200, "application/zip"): OpenApiResponse(response=OpenApiTypes.BINARY, description="The workspace."),
            **error_responses(401, 403, 404, 413),
        },
    )
    def get(self, request: Request, project_id: Any) -> StreamingHttpResponse:
        project = self.get_project(project_id)
        root = project_workspace_create(project.id)
        size, _ = usage(root)
        if size > settings.WORKSPACE_MAX_BYTES:
            raise ApiError(413, "workspace_too_large", "This workspace is larger than the download limit.")
        response = StreamingHttpResponse(zip_body(root), content_type="application/zip")
        response["Content-Disposition"] = f'attachment; filename="cesaflow-project-{project.id.hex[:12]}.zip"'
        response["Cache-Control"] = "no-store"
        return response
