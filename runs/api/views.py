"""REST API v1 for runs and the audit trail (read-only; the trail is written by services, never through the API).

Runs: ``POST /runs`` starts a chat run (201, status ``queued``; the executor picks it up at once), ``GET /runs``
lists them (filters ``status``, ``kind``, ``created_by``; cursor pagination), ``GET /runs/{id}`` reads one,
``POST /runs/{id}/cancel`` cancels one, ``GET /runs/{id}/events`` streams its events (``runs.api.sse``). Another
org's run is a 404 like a missing one; a provider key of another org is a 400 ``validation_error`` on
``provider_key`` ("No such provider key."), exactly like a key id that does not exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

from channels.db import database_sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.request import Request
from rest_framework.response import Response

from cesaflow.lib import row_cache
from cesaflow.lib.api import ApiError, error_responses
from orgs.api.base import OrgAPIView
from orgs.models import ApiKey
from orgs.permissions import AUDIT_READ, ORG_SUSPENDED, RUNS_READ, RUNS_WRITE
from runs.api.serializers import (
    AuditEventFilterSerializer,
    AuditEventSerializer,
    RunCreateSerializer,
    RunFilterSerializer,
    RunSerializer,
)
from runs.api.sse import EventStreamNegotiationMixin, event_stream_response, run_event_stream, wants_event_stream
from runs.models import Run, WorkspaceState
from runs.projects.selectors import project_get_for_org
from runs.projects.services import project_run_create
from runs.selectors import audit_events_for_org, run_get_for_org, runs_for_org
from runs.services import (
    NOT_CANCELLABLE,
    ORG_RUN_QUEUE_FULL,
    TOKEN_CAP_REACHED,
    run_create,
    run_request_cancel,
)
from runs.services.workspaces import (
    DOWNLOAD_LEASE,
    WORKSPACE_BUSY,
    run_workspace_download_abandoned,
    run_workspace_download_begin,
    run_workspace_download_renew,
    run_workspace_downloaded,
)
from runs.watching import remember_created
from runs.workspaces import usage, workspace_path, zip_chunks


class AuditEventListView(OrgAPIView):
    capabilities = {"GET": AUDIT_READ}

    @extend_schema(
        operation_id="audit_events_list",
        summary="The organization's audit trail, newest first",
        parameters=[AuditEventFilterSerializer],
        responses={200: AuditEventSerializer(many=True), **error_responses(400, 401, 403, 404)},
    )
    def get(self, request: Request) -> Response:
        filters = AuditEventFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        events = audit_events_for_org(org=self.org, **filters.validated_data)
        page = self.paginate_queryset(events)
        return self.get_paginated_response(AuditEventSerializer(page, many=True).data)


# --- Runs -----------------------------------------------------------------------------------------------------


class _RunObjectMixin(OrgAPIView):
    def get_run(self, run_id: Any) -> Run:
        run = run_get_for_org(org=self.org, run_id=run_id)
        if run is None:
            raise exceptions.NotFound("No such run.")
        return run


class RunListView(EventStreamNegotiationMixin, OrgAPIView):
    capabilities = {"GET": RUNS_READ, "POST": RUNS_WRITE}
    serializer_class = RunSerializer

    @extend_schema(
        operation_id="runs_list",
        summary="The organization's runs, newest first",
        parameters=[RunFilterSerializer],
        responses={200: RunSerializer(many=True), **error_responses(400, 401, 403, 404)},
    )
    def get(self, request: Request) -> Response:
        filters = RunFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        data = filters.validated_data
        created_by = data.get("created_by")
        runs = runs_for_org(
            org=self.org,
            status=data.get("status"),
            kind=data.get("kind"),
            created_by=str(created_by) if created_by else None,
        )
        page = self.paginate_queryset(runs)
        return self.get_paginated_response(RunSerializer(page, many=True).data)

    @extend_schema(
        operation_id="runs_create",
        summary="Start a chat run with one of the organization's provider keys",
        description="A run never loses its answer: a chat run is queued and calls the provider only once its "
        "stream is attached — `GET /runs/{id}/events` (SSE), the websocket `/ws/runs/{id}/`, or this request "
        "itself with `stream: true` (or `Accept: text/event-stream`), which answers 200 with the run's event "
        "stream, the first event carrying the new run's id. Nobody attached within the attach window: the run "
        "ends `cancelled` (`not_watched`) without calling the provider. `watch: false` starts it at once, "
        "unwatched. A provider key of another organization is refused like a missing one (400 "
        "`validation_error` on `provider_key`). 429 `token_cap_reached` when the organization's monthly token cap "
        "has no room for the run's first call, 429 `org_run_queue_full` when the organization already has as many "
        "runs waiting to start as it may (`CESAFLOW_RUN_ORG_MAX_QUEUED`).",
        request=RunCreateSerializer,
        responses={
            201: RunSerializer,
            (200, "text/event-stream"): OpenApiResponse(
                response=OpenApiTypes.STR, description="With `stream: true`: the new run's event stream."
            ),
            **error_responses(400, 401, 403, 404, 429),
        },
    )
    def post(self, request: Request) -> Response | StreamingHttpResponse:
        serializer = RunCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        stream = data["stream"] or wants_event_stream(request)
        # A streamed create watches from its first event, whatever the kind's default.
        watch = data.get("watch", True if stream else None)
        # An org API key's run is remembered for the stream its client opens next (``remember_created``), under the
        # generation read before the run's provider key is; a session's stream reads the run (nothing to read here).
        token = row_cache.generation() if not stream and isinstance(self.request.auth, ApiKey) else None
        try:
            if "project" in data:
                project = project_get_for_org(org=self.org, project_id=data["project"])
                if project is None:  # another org's project and a missing one look the same: 404, as everywhere
                    raise exceptions.NotFound("No such project.")
                run = project_run_create(
                    project=project,
                    actor=self.org_context.actor,
                    objective=data["objective"],
                    provider_key_id=data.get("provider_key"),
                    model=data.get("model", ""),
                    watch=watch,
                    limits=data.get("limits"),
                )
            else:
                run = run_create(
                    org=self.org,
                    actor=self.org_context.actor,
                    provider_key_id=data["provider_key"],
                    model=data["model"],
                    objective=data["objective"],
                    kind=data["kind"],
                    watch=watch,
                    limits=data.get("limits"),
                )
        except DjangoValidationError as exc:
            if getattr(exc, "code", None) in {TOKEN_CAP_REACHED, ORG_RUN_QUEUE_FULL}:
                raise ApiError(status.HTTP_429_TOO_MANY_REQUESTS, str(exc.code), exc.messages[0]) from None
            if getattr(exc, "code", None) == ORG_SUSPENDED:  # suspended after the gate let this request in
                raise ApiError(status.HTTP_403_FORBIDDEN, ORG_SUSPENDED, exc.messages[0]) from None
            raise
        location = f"/api/v1/runs/{run.id}"
        if stream:
            streamed = event_stream_response(
                run_event_stream(
                    context=self.org_context,
                    principal=self.principal,
                    run_id=run.id,
                    keepalive_s=float(settings.SSE_KEEPALIVE_SECONDS),
                    cancel_on_disconnect=self.org_context.actor if data["cancel_on_disconnect"] else None,
                    created=run,
                )
            )
            streamed["Location"] = location
            return streamed
        remember_created(run, token=token)
        response = Response(RunSerializer(run).data, status=status.HTTP_201_CREATED)
        response["Location"] = location
        return response


class RunDetailView(_RunObjectMixin):
    capabilities = {"GET": RUNS_READ}
    serializer_class = RunSerializer

    @extend_schema(
        operation_id="runs_retrieve",
        summary="One run's metadata (the answer itself is never stored)",
        responses={200: RunSerializer, **error_responses(401, 403, 404)},
    )
    def get(self, request: Request, run_id: Any) -> Response:
        return Response(RunSerializer(self.get_run(run_id)).data)


class RunCancelView(_RunObjectMixin):
    capabilities = {"POST": RUNS_WRITE}
    serializer_class = RunSerializer

    @extend_schema(
        operation_id="runs_cancel",
        summary="Cancel a run",
        description="A queued run ends `cancelled` at once. A running one shows `cancel_requested: true` and "
        "ends `cancelled` within a second, its provider call stopped. A finished run is returned unchanged.",
        request=None,
        responses={200: RunSerializer, **error_responses(401, 403, 404, 409)},
    )
    def post(self, request: Request, run_id: Any) -> Response:
        try:
            run = run_request_cancel(run=self.get_run(run_id), actor=self.org_context.actor)
        except DjangoValidationError as exc:
            raise ApiError(409, NOT_CANCELLABLE, exc.messages[0]) from None
        return Response(RunSerializer(run).data)


_R = TypeVar("_R", bound=HttpResponseBase)


class RunWorkspaceView(_RunObjectMixin):
    """``GET /runs/{id}/workspace``: an agent run's workspace as a zip built on the fly. The first complete download
    deletes the workspace; a later one is 410 ``workspace_deleted``."""

    capabilities = {"GET": RUNS_READ}

    @extend_schema(
        operation_id="runs_workspace",
        summary="Download an agent run's workspace (zip); the first complete download deletes it",
        description="Streams a zip of the files the agent left (regular files only: symlinks and special files are "
        "never followed or included). Available from the end of the run until `workspace_expires_at`; the first "
        "complete download deletes the workspace (a HEAD request does not). 409 `workspace_in_use` while the run "
        "executes, 409 `workspace_busy` while another download of it is in progress, 410 `workspace_deleted` once "
        "downloaded or expired, 404 for runs without a workspace.",
        responses={
            (200, "application/zip"): OpenApiResponse(response=OpenApiTypes.BINARY, description="The workspace."),
            **error_responses(401, 403, 404, 409, 410, 413, 503),
        },
    )
    def get(self, request: Request, run_id: Any) -> HttpResponse | StreamingHttpResponse:
        run = self.get_run(run_id)
        state = run.workspace_state
        if state == WorkspaceState.LIVE:
            raise ApiError(409, "workspace_in_use", "The run is still working in this workspace; try when it ends.")
        if state in (WorkspaceState.DOWNLOADED, WorkspaceState.EXPIRED):
            when = "downloaded" if state == WorkspaceState.DOWNLOADED else "expired"
            raise ApiError(410, "workspace_deleted", f"This workspace was {when} and deleted; it is gone for good.")
        if state not in (WorkspaceState.AVAILABLE, WorkspaceState.DOWNLOADING):
            raise exceptions.NotFound("This run has no workspace.")
        root = workspace_path(run.id)
        if not root.is_dir():
            # Recorded as downloadable but not on this machine: the workspace root must be shared by every web and
            # worker host (README). Never answer with an empty zip, and never count this as a download.
            raise ApiError(
                503, "workspace_unreachable", "This server cannot reach the workspace; ask your administrator."
            )
        size, _ = usage(root)
        if size > settings.WORKSPACE_MAX_BYTES:
            raise ApiError(413, "workspace_too_large", "This workspace is larger than the download limit.")
        filename = f"cesaflow-run-{run.id.hex[:12]}.zip"
        if request.method == "HEAD":
            # A probe (curl -I, a link preview) must not count as the one download that deletes the workspace.
            return _zip_headers(HttpResponse(content_type="application/zip"), filename)
        try:
            run_workspace_download_begin(run=run)
        except DjangoValidationError as exc:
            if exc.code == WORKSPACE_BUSY:
                raise ApiError(409, WORKSPACE_BUSY, exc.messages[0]) from None
            raise ApiError(410, "workspace_deleted", "This workspace is gone.") from None
        response = StreamingHttpResponse(workspace_zip_stream(run), content_type="application/zip")
        return _zip_headers(response, filename)


def _zip_headers(response: _R, filename: str) -> _R:
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    response["Cache-Control"] = "no-store"
    response["X-Accel-Buffering"] = "no"
    return response


async def workspace_zip_stream(run: Run) -> AsyncIterator[bytes]:
    """The zip of a leased run workspace. Reaching the end means the client received it all: the workspace is then
    deleted; anything else (the client went away, an error) gives the lease back."""
    complete = False

    async def renew() -> None:
        await database_sync_to_async(run_workspace_download_renew)(run=run)

    try:
        async for chunk in zip_body(workspace_path(run.id), every_s=DOWNLOAD_LEASE.total_seconds() / 4, tick=renew):
            yield chunk
        complete = True
    finally:
        if complete:
            await database_sync_to_async(run_workspace_downloaded)(run=run)
        else:
            await database_sync_to_async(run_workspace_download_abandoned)(run=run)


async def zip_body(
    root: Path, *, every_s: float = 0.0, tick: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[bytes]:
    """A workspace's zip, chunk by chunk, built in a worker thread (never on the event loop, never in a file).
    ``tick`` is awaited every ``every_s`` seconds while it streams (a download lease's renewal)."""
    chunks = zip_chunks(root, max_bytes=settings.WORKSPACE_MAX_BYTES)
    done = object()
    pending: asyncio.Future[Any] | None = None
    loop = asyncio.get_running_loop()
    ticked = loop.time()
    try:
        while True:
            if tick is not None and loop.time() - ticked > every_s:
                ticked = loop.time()
                await tick()
            pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, done))
            chunk = await pending
            pending = None
            if chunk is done:
                return
            yield chunk
    finally:
        if pending is not None:
            # Cancelled while the thread produces a chunk: let it finish before closing the generator it runs
            # (closing a generator that is executing raises, and would leak its open file).
            with suppress(BaseException):
                await asyncio.shield(pending)
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
