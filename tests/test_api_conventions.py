"""Conventions every API response keeps: the OpenAPI schema, the error shape, and the security headers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from drf_spectacular.drainage import GENERATOR_STATS, reset_generator_stats
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.validation import validate_schema
from rest_framework.test import APIClient

from cesaflow.lib.api import validation_error_from_django

pytestmark = pytest.mark.django_db

OUR_PATHS = {
    "/api/v1/org": {"get", "patch"},
    "/api/v1/members": {"get"},
    "/api/v1/members/{member_id}": {"get", "patch", "delete"},
    "/api/v1/api-keys": {"get", "post"},
    "/api/v1/api-keys/{api_key_id}": {"get", "delete"},
    "/api/v1/audit-events": {"get"},
}


def _schema() -> dict[str, Any]:
    response = APIClient().get("/api/v1/schema/?format=json")
    assert response.status_code == 200
    schema: dict[str, Any] = json.loads(response.content)
    return schema


def test_schema_is_openapi_3_and_lists_every_endpoint():
    schema = _schema()
    assert schema["openapi"].startswith("3.")
    for path, methods in OUR_PATHS.items():
        assert path in schema["paths"], path
        assert methods <= set(schema["paths"][path]), path


def test_schema_documents_auth_errors_and_pagination():
    schema = _schema()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["apiKeyAuth"] == {"type": "apiKey", "in": "header", "name": "x-api-key"}
    assert schemes["bearerAuth"]["scheme"] == "bearer"
    listing = schema["paths"]["/api/v1/audit-events"]["get"]
    params = {p["name"] for p in listing["parameters"]}
    assert {"event", "actor", "since", "until", "cursor", "limit"} <= params
    assert listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "PaginatedAuditEventList"
    )
    assert listing["responses"]["403"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    created = schema["paths"]["/api/v1/api-keys"]["post"]["responses"]["201"]
    assert created["content"]["application/json"]["schema"]["$ref"].endswith("/ApiKeyCreated")
    assert "key" not in schema["components"]["schemas"]["ApiKey"]["properties"]


def test_schema_generates_without_warnings_and_validates():
    reset_generator_stats()
    schema = SchemaGenerator().get_schema(request=None, public=True)
    warnings = dict(GENERATOR_STATS._warn_cache) | dict(GENERATOR_STATS._error_cache)
    assert not warnings, "\n".join(warnings)
    validate_schema(schema)


def test_docs_page_is_served():
    response = APIClient().get("/api/v1/docs/")
    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/v1/org/", "/api/v2/org", "/api/"])
def test_unknown_api_paths_are_a_json_404_in_the_error_shape(path):
    response = APIClient().get(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"error": {"code": "not_found", "message": "Not found.", "details": {}}}


def test_malformed_ids_are_the_same_404(cast):
    response = cast.admin_a.api().get("/api/v1/api-keys/not-a-uuid")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def _assert_security_headers(response) -> None:
    assert response["Cache-Control"] == "no-store"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"
    assert response["Referrer-Policy"] in {"no-referrer", "strict-origin-when-cross-origin", "same-origin"}
    assert response["Cross-Origin-Opener-Policy"] == "same-origin"
    assert response["X-XSS-Protection"] == "0"
    csp = {
        directive.split()[0]: directive.split()[1:]
        for directive in (part.strip() for part in response["Content-Security-Policy"].split(";"))
        if directive
    }
    assert "'unsafe-inline'" not in csp.get("script-src", csp["default-src"])
    assert csp["object-src"] == ["'none'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert "Server" not in response
    assert "X-Powered-By" not in response


def test_api_success_responses_carry_the_security_headers(cast):
    _assert_security_headers(cast.admin_a.api().get("/api/v1/org"))
    _assert_security_headers(cast.admin_a.session_api().get("/api/v1/members"))


def test_api_key_creation_is_never_cached(cast):
    response = cast.admin_a.api().post("/api/v1/api-keys", {"name": "ci"}, format="json")
    assert response.status_code == 201
    _assert_security_headers(response)


@pytest.mark.parametrize("path", ["/api/v1/org", "/api/v1/nope"])
def test_api_error_responses_carry_the_security_headers(path):
    _assert_security_headers(APIClient().get(path))


def test_schema_response_carries_the_security_headers():
    _assert_security_headers(APIClient().get("/api/v1/schema/?format=json"))


def test_service_validation_errors_keep_field_details():
    by_field = validation_error_from_django(ValidationError({"name": "Give the key a name."}))
    assert by_field.detail == {"name": ["Give the key a name."]}
    whole = validation_error_from_django(ValidationError("This invitation link is invalid."))
    assert whole.detail == {"non_field_errors": ["This invitation link is invalid."]}
