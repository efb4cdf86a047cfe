"""REST API v1: the caller's organization, its members and its org API keys.

Every view subclasses ``OrgAPIView`` (the tenant gate): the org comes from the credential, each method needs
the capability it declares, objects are looked up inside ``self.org`` only (another org's id is a 404, exactly
like a missing one), and writes go through ``orgs.services``, which also record the audit trail.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.core.exceptions import ValidationError
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, status
from rest_framework.request import Request
from rest_framework.response import Response

from cesaflow.lib.api import ApiError, CursorPagination, StrictInputSerializer, error_responses
from orgs.api.base import OrgAPIView
from orgs.api.serializers import (
    ApiKeyCreatedSerializer,
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    MemberRemoveQuerySerializer,
    MemberSerializer,
    MemberUpdateSerializer,
    OrganizationSerializer,
    OrganizationUpdateSerializer,
)
from orgs.models import ApiKey, Membership
from orgs.permissions import API_KEYS_MANAGE, MEMBERS_READ, ORG_MANAGE, ORG_READ, TEAM_MANAGE
from orgs.selectors import api_key_get_for_org, api_keys_for_org, members_for_org, membership_get_for_org
from orgs.services import (
    LAST_ADMIN,
    api_key_create,
    api_key_revoke,
    membership_change_role,
    membership_remove,
    org_update,
)


def _validated(serializer_class: type[StrictInputSerializer], request: Request) -> dict[str, Any]:
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


@contextmanager
def _last_admin_is_a_conflict() -> Iterator[None]:
    """The last-Admin rule is about the org's current state, not the request's shape: 409 ``last_admin``."""
    try:
        yield
    except ValidationError as exc:
        if getattr(exc, "code", None) == LAST_ADMIN:
            raise ApiError(status.HTTP_409_CONFLICT, LAST_ADMIN, exc.messages[0]) from None
        raise


# --- Organization -----------------------------------------------------------------------------------


class OrganizationView(OrgAPIView):
    capabilities = {"GET": ORG_READ, "PATCH": ORG_MANAGE}

    @extend_schema(
        operation_id="org_retrieve",
        summary="The caller's organization",
        responses={200: OrganizationSerializer, **error_responses(401, 403, 404)},
    )
    def get(self, request: Request) -> Response:
        return Response(OrganizationSerializer(self.org).data)

    @extend_schema(
        operation_id="org_update",
        summary="Rename the organization",
        request=OrganizationUpdateSerializer,
        responses={200: OrganizationSerializer, **error_responses(400, 401, 403, 404)},
    )
    def patch(self, request: Request) -> Response:
        data = _validated(OrganizationUpdateSerializer, request)
        org = self.org
        if "name" in data:
            org = org_update(org=org, actor=self.org_context.actor, name=data["name"])
        return Response(OrganizationSerializer(org).data)


# --- Members ----------------------------------------------------------------------------------------


class MemberPagination(CursorPagination):
    """Members in the order they joined."""

    ordering = ("created_at", "id")


class MemberListView(OrgAPIView):
    capabilities = {"GET": MEMBERS_READ}
    pagination_class = MemberPagination

    @extend_schema(
        operation_id="members_list",
        summary="Members of the organization",
        responses={200: MemberSerializer(many=True), **error_responses(400, 401, 403, 404)},
    )
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(members_for_org(org=self.org))
        return self.get_paginated_response(MemberSerializer(page, many=True).data)


class MemberDetailView(OrgAPIView):
    capabilities = {"GET": MEMBERS_READ, "PATCH": TEAM_MANAGE, "DELETE": TEAM_MANAGE}

    def _membership(self, member_id: uuid.UUID) -> Membership:
        membership = membership_get_for_org(org=self.org, membership_id=member_id)
        if membership is None:
            raise exceptions.NotFound()
        return membership

    @extend_schema(
        operation_id="members_retrieve",
        summary="One member",
        responses={200: MemberSerializer, **error_responses(401, 403, 404)},
    )
    def get(self, request: Request, member_id: uuid.UUID) -> Response:
        return Response(MemberSerializer(self._membership(member_id)).data)

    @extend_schema(
        operation_id="members_update",
        summary="Change a member's role",
        description="The org API keys the member created lose the scopes the new role lacks (`scopes_clipped_at`); "
        "a member who may no longer manage the team has their pending invitations revoked. The last Admin cannot be "
        "demoted: 409 with code `last_admin`.",
        request=MemberUpdateSerializer,
        responses={200: MemberSerializer, **error_responses(400, 401, 403, 404, 409)},
    )
    def patch(self, request: Request, member_id: uuid.UUID) -> Response:
        membership = self._membership(member_id)
        data = _validated(MemberUpdateSerializer, request)
        with _last_admin_is_a_conflict():
            membership = membership_change_role(membership=membership, role=data["role"], actor=self.org_context.actor)
        return Response(MemberSerializer(membership).data)

    @extend_schema(
        operation_id="members_destroy",
        summary="Remove a member from the organization",
        description="The member's pending invitations are revoked, and the active org API keys they created unless "
        "`revoke_api_keys=false`. The last Admin cannot be removed: 409 with code `last_admin`.",
        parameters=[MemberRemoveQuerySerializer],
        request=None,
        responses={204: None, **error_responses(400, 401, 403, 404, 409)},
    )
    def delete(self, request: Request, member_id: uuid.UUID) -> Response:
        membership = self._membership(member_id)
        query = MemberRemoveQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        with _last_admin_is_a_conflict():
            membership_remove(
                membership=membership,
                actor=self.org_context.actor,
                revoke_api_keys=query.validated_data["revoke_api_keys"],
            )
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- Org API keys -----------------------------------------------------------------------------------


class ApiKeyListView(OrgAPIView):
    capabilities = {"GET": API_KEYS_MANAGE, "POST": API_KEYS_MANAGE}

    @extend_schema(
        operation_id="api_keys_list",
        summary="Org API keys (never their secrets)",
        responses={200: ApiKeySerializer(many=True), **error_responses(400, 401, 403, 404)},
    )
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(api_keys_for_org(org=self.org))
        return self.get_paginated_response(ApiKeySerializer(page, many=True).data)

    @extend_schema(
        operation_id="api_keys_create",
        summary="Create an org API key",
        description="The response carries the secret `key` once; it cannot be retrieved again. Scopes must be a "
        "subset of the caller's own capabilities.",
        request=ApiKeyCreateSerializer,
        responses={201: ApiKeyCreatedSerializer, **error_responses(400, 401, 403, 404)},
    )
    def post(self, request: Request) -> Response:
        data = _validated(ApiKeyCreateSerializer, request)
        api_key, secret = api_key_create(
            org=self.org,
            actor=self.org_context.actor,
            name=data["name"],
            scopes=data.get("scopes"),
            expires_at=data.get("expires_at"),
        )
        body = ApiKeyCreatedSerializer(api_key, context={"secret": secret}).data
        return Response(body, status=status.HTTP_201_CREATED)


class ApiKeyDetailView(OrgAPIView):
    capabilities = {"GET": API_KEYS_MANAGE, "DELETE": API_KEYS_MANAGE}

    def _api_key(self, api_key_id: uuid.UUID) -> ApiKey:
        api_key = api_key_get_for_org(org=self.org, api_key_id=api_key_id)
        if api_key is None:
            raise exceptions.NotFound()
        return api_key

    @extend_schema(
        operation_id="api_keys_retrieve",
        summary="One org API key (never its secret)",
        responses={200: ApiKeySerializer, **error_responses(401, 403, 404)},
    )
    def get(self, request: Request, api_key_id: uuid.UUID) -> Response:
        return Response(ApiKeySerializer(self._api_key(api_key_id)).data)

    @extend_schema(
        operation_id="api_keys_revoke",
        summary="Revoke an org API key",
        description="Takes effect on the next request made with the key. Revoking a revoked key is a no-op.",
        request=None,
        responses={204: None, **error_responses(401, 403, 404)},
    )
    def delete(self, request: Request, api_key_id: uuid.UUID) -> Response:
        api_key_revoke(api_key=self._api_key(api_key_id), actor=self.org_context.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)
