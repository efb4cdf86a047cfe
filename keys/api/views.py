"""Provider-key API: list and add (``/api/v1/provider-keys``), read and revoke (``/{id}``), check (``/{id}/check``).

Every view goes through the tenant gate (``OrgAPIView``): the org comes from the credential, never the URL or
body; another org's key id answers 404 exactly like a missing one.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.utils.decorators import method_decorator
from django.views.decorators.debug import sensitive_post_parameters, sensitive_variables
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from cesaflow.lib.api import ApiError, error_responses
from keys import checking, selectors, services
from keys.api.serializers import ProviderKeyCreateSerializer, ProviderKeySerializer
from keys.models import KeyStatus, ProviderKey
from keys.providers import ProbeStatus
from orgs.api.base import OrgAPIView
from orgs.permissions import KEYS_READ, KEYS_WRITE


def _field_errors(exc: DjangoValidationError) -> serializers.ValidationError:
    """Service validation errors, keyed by field, in the API's ``validation_error`` shape."""
    if hasattr(exc, "error_dict"):
        return serializers.ValidationError({field: messages for field, messages in exc.message_dict.items()})
    return serializers.ValidationError({"non_field_errors": exc.messages})


class _ProviderKeyObjectMixin(OrgAPIView):
    def get_key(self, key_id: Any) -> ProviderKey:
        key = selectors.provider_key_get_for_org(org=self.org, key_id=key_id)
        if key is None:
            raise exceptions.NotFound("No such provider key.")
        return key


@method_decorator(sensitive_post_parameters("secret"), name="dispatch")
class ProviderKeyListView(OrgAPIView):
    capabilities = {"GET": KEYS_READ, "POST": KEYS_WRITE}
    serializer_class = ProviderKeySerializer

    @extend_schema(responses=ProviderKeySerializer(many=True), summary="List the org's provider keys")
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(selectors.provider_keys_for_org(org=self.org))
        return self.get_paginated_response(ProviderKeySerializer(page, many=True).data)

    @extend_schema(
        request=ProviderKeyCreateSerializer,
        responses={201: ProviderKeySerializer},
        summary="Add a provider key (sealed before it is stored; never returned)",
    )
    @sensitive_variables("secret", "data", "serializer", "request")
    def post(self, request: Request) -> Response:
        serializer = ProviderKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            key = services.provider_key_create(
                org=self.org,
                actor=self.org_context.actor,
                provider=data["provider"],
                label=data["label"],
                secret=data["secret"],
                base_url=data.get("base_url") or "",
            )
        except DjangoValidationError as exc:
            raise _field_errors(exc) from None
        return Response(ProviderKeySerializer(key).data, status=status.HTTP_201_CREATED)


class ProviderKeyDetailView(_ProviderKeyObjectMixin):
    capabilities = {"GET": KEYS_READ, "DELETE": KEYS_WRITE}
    serializer_class = ProviderKeySerializer

    @extend_schema(responses=ProviderKeySerializer, summary="A provider key (metadata only)")
    def get(self, request: Request, key_id: Any) -> Response:
        return Response(ProviderKeySerializer(self.get_key(key_id)).data)

    @extend_schema(responses={204: None}, summary="Revoke a provider key (its ciphertext is wiped)")
    def delete(self, request: Request, key_id: Any) -> Response:
        services.provider_key_revoke(key=self.get_key(key_id), actor=self.org_context.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


_CHECK_RESPONSE = inline_serializer(
    name="ProviderKeyCheckResult",
    fields={
        **ProviderKeySerializer().get_fields(),
        "check": inline_serializer(
            name="ProviderKeyCheck",
            fields={
                "status": serializers.ChoiceField(
                    choices=[s.value for s in ProbeStatus],
                    help_text="valid, restricted (valid but may not list models), invalid, or unreachable "
                    "(the provider could not be asked; the key's status is unchanged).",
                ),
                "message": serializers.CharField(help_text="The provider's explanation, if any (never the key)."),
                "models": serializers.ListField(child=serializers.CharField(), help_text="Model ids, if listed."),
            },
        ),
    },
)


class ProviderKeyCheckView(_ProviderKeyObjectMixin):
    """Check a key against its provider's model list now (no tokens billed) and record the outcome."""

    capabilities = {"POST": KEYS_WRITE}
    serializer_class = ProviderKeySerializer

    @extend_schema(
        request=None,
        responses={200: _CHECK_RESPONSE, **error_responses(401, 403, 404, 409)},
        summary="Check a provider key against the provider (sets valid / restricted / invalid)",
    )
    def post(self, request: Request, key_id: Any) -> Response:
        key = self.get_key(key_id)
        if key.status == KeyStatus.REVOKED:
            raise ApiError(409, "key_revoked", "This provider key has been revoked; there is nothing to check.")
        try:
            result = checking.provider_key_check(key=key, actor=self.org_context.actor)
        except services.ProviderKeyUnavailable:
            raise ApiError(
                409, "key_revoked", "This provider key has been revoked; there is nothing to check."
            ) from None
        except services.ProviderKeyDecryptionError as exc:
            raise ApiError(409, "key_unreadable", str(exc)) from None
        data = dict(ProviderKeySerializer(key).data)
        data["check"] = {"status": result.status.value, "message": result.message, "models": list(result.models)}
        return Response(data)
