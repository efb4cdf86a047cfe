"""DRF authentication with org API keys: ``x-api-key: cf_live_…`` or ``Authorization: Bearer cf_live_…``.

Keys are accepted in headers only, never in a query string, cookie or body. Every failure is the same 401.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from orgs.models import ApiKey
from orgs.selectors import api_key_get_active_by_secret
from orgs.services import api_key_record_use
from orgs.tokens import MAX_KEY_LENGTH

if TYPE_CHECKING:
    from drf_spectacular.openapi import AutoSchema


class ApiKeyPrincipal:
    """``request.user`` for a request authenticated by an org API key (the key acts; no person does)."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    pk = None

    def __init__(self, api_key: ApiKey) -> None:
        self.api_key = api_key

    def __str__(self) -> str:
        return f"api-key:{self.api_key.prefix}"


def presented_api_key(headers: Any) -> str | None:
    """The credential from ``x-api-key`` or a Bearer ``Authorization`` header, if any."""
    value: str | None = headers.get("x-api-key")
    if value is None:
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            return None
        value = token
    return value.strip()


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[ApiKeyPrincipal, ApiKey] | None:
        presented = presented_api_key(request.headers)
        if presented is None:
            return None  # let session authentication try
        if not presented or len(presented) > MAX_KEY_LENGTH:
            raise exceptions.AuthenticationFailed("Invalid API key.")
        api_key = api_key_get_active_by_secret(secret=presented)
        if api_key is None:
            raise exceptions.AuthenticationFailed("Invalid API key.")
        api_key_record_use(api_key=api_key)
        return ApiKeyPrincipal(api_key), api_key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="cesaflow"'


# drf-spectacular registers extensions in an untyped __init_subclass__.
class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """Documents both ways of presenting an org API key in the OpenAPI schema (either one suffices)."""

    target_class = ApiKeyAuthentication
    name = ["apiKeyAuth", "bearerAuth"]

    def get_security_definition(self, auto_schema: AutoSchema) -> list[dict[str, str]]:
        return [
            {"type": "apiKey", "in": "header", "name": "x-api-key"},
            {"type": "http", "scheme": "bearer", "description": "The org API key as a Bearer token."},
        ]

    def get_security_requirement(self, auto_schema: AutoSchema) -> list[dict[str, list[Any]]]:
        return [{"apiKeyAuth": []}, {"bearerAuth": []}]
