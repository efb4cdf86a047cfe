"""REST API v1 for runs and the audit trail (read-only; the trail is written by services, never through the API).

Runs: ``POST /runs`` starts a chat run (201, status ``queued``; the executor picks it up at once), ``GET /runs``
lists them (filters ``status``, ``kind``, ``created_by``; cursor pagination), ``GET /runs/{id}`` reads one,
``POST /runs/{id}/cancel`` cancels one, ``GET /runs/{id}/events`` streams its events (``runs.api.sse``). Another
org's run is a 404 like a missing one; a provider key of another org is a 400 ``validation_error`` on
``provider_key`` ("No such provider key."), exactly like a key id that does not exist.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, status
from rest_framework.request import Request
from rest_framework.response import Response

from cesaflow.lib.api import ApiError, error_responses
from orgs.api.base import OrgAPIView
from orgs.permissions import AUDIT_READ, RUNS_READ, RUNS_WRITE
from runs.api.serializers import (
    AuditEventFilterSerializer,
    AuditEventSerializer,
    RunCreateSerializer,
    RunFilterSerializer,
    RunSerializer,
)
from runs.models import Run, RunKind
from runs.selectors import audit_events_for_org, run_get_for_org, runs_for_org
from runs.services import NOT_CANCELLABLE, run_create, run_request_cancel


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


class RunListView(OrgAPIView):
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
        description="The run is queued and executes at once; follow it with `GET /runs/{id}/events` (SSE) or the "
        "websocket `/ws/runs/{id}/`. A provider key of another organization is refused like a missing one "
        "(400 `validation_error` on `provider_key`). Once the organization's monthly token cap is reached: "
        "429 `token_cap_reached`.",
        request=RunCreateSerializer,
        responses={201: RunSerializer, **error_responses(400, 401, 403, 404, 429)},
    )
    def post(self, request: Request) -> Response:
        serializer = RunCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            run = run_create(
                org=self.org,
                actor=self.org_context.actor,
                provider_key_id=data["provider_key"],
                model=data["model"],
                objective=data["objective"],
                kind=RunKind.CHAT,
            )
        except DjangoValidationError as exc:
            if getattr(exc, "code", None) == "token_cap_reached":
                raise ApiError(status.HTTP_429_TOO_MANY_REQUESTS, "token_cap_reached", exc.messages[0]) from None
            raise
        response = Response(RunSerializer(run).data, status=status.HTTP_201_CREATED)
        response["Location"] = f"/api/v1/runs/{run.id}"
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
