"""REST API v1 for the audit trail (read-only; the trail is written by services, never through the API)."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from cesaflow.lib.api import error_responses
from orgs.api.base import OrgAPIView
from orgs.permissions import AUDIT_READ
from runs.api.serializers import AuditEventFilterSerializer, AuditEventSerializer
from runs.selectors import audit_events_for_org


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
