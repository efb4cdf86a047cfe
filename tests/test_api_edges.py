"""The REST API's edges (issue #14 points 5 and 6): what schemathesis found, each pinned by a test.

Every response under /api/ is JSON in the one error shape (unknown paths with DEBUG on, unexpected errors); input
keeps to the schema (JSON types, ``limit``, blank and repeated query parameters); deeply nested JSON and NUL bytes
are a 400 naming the problem, never a 500; the schema documents every error an operation can give.

Not transactional: created runs are handed to the executor after commit, which never happens here.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from keys.models import Provider
from keys.services import provider_key_create
from runs.models import Run
from runs.projects.services import project_create
from runs.workspaces import project_workspace_create, write_file

pytestmark = pytest.mark.django_db


def _error(response: Any) -> dict[str, Any]:
    assert response["Content-Type"] == "application/json", response.content[:200]
    body: dict[str, Any] = json.loads(response.content)
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "details"}
    return error


def _fields(response: Any) -> dict[str, Any]:
    assert response.status_code == 400, response.content[:300]
    error = _error(response)
    assert error["code"] == "validation_error"
    fields: dict[str, Any] = error["details"]["fields"]
    return fields


@pytest.fixture
def key_a(cast):
    return provider_key_create(
        org=cast.org_a, actor=cast.admin_a.user, provider=Provider.OPENAI, label="a", secret="sk-test-a-0123456789abcd"
    )


def _run_body(key: Any, **extra: Any) -> dict[str, Any]:
    return {"objective": "Say hi.", "provider_key": str(key.id), "model": "gpt-4o", **extra}


# --- Every response under /api/ is JSON --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["get", "post", "patch", "delete"])
@pytest.mark.parametrize(
    "path", ["/api/v1/provider-keys/null,null", "/api/v1/runs/zzz/workspace", "/api/v1/nope", "/api/v2/org", "/api/"]
)
def test_unmatched_api_paths_are_a_json_404_even_with_debug(cast, settings, method, path):
    settings.DEBUG = True  # Django's debug 404 page is HTML and bypasses handler404
    response = getattr(cast.admin_a.api(), method)(path)
    assert response.status_code == 404
    assert _error(response) == {"code": "not_found", "message": "Not found.", "details": {}}


def test_an_unexpected_error_in_an_api_view_is_a_json_500_without_the_traceback(cast, settings, monkeypatch):
    settings.DEBUG = True  # with DEBUG, Django would answer its HTML traceback page

    def broken(**kwargs: Any) -> Any:
        raise RuntimeError("internal detail that must not reach the client")

    monkeypatch.setattr("orgs.api.views.members_for_org", broken)
    client = cast.admin_a.api()
    client.raise_request_exception = False
    response = client.get("/api/v1/members")
    assert response.status_code == 500
    assert _error(response)["code"] == "server_error"
    assert b"internal detail" not in response.content


# --- Input keeps to the schema -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "method", "body", "field"),
    [
        ("/api/v1/org", "patch", {"name": 0}, "name"),
        ("/api/v1/api-keys", "post", {"name": 5}, "name"),
        ("/api/v1/api-keys", "post", {"name": "ci", "scopes": "runs:read"}, "scopes"),
        ("/api/v1/projects", "post", {"name": ["p"]}, "name"),
    ],
)
def test_values_of_another_json_type_than_the_schema_says_are_400(cast, path, method, body, field):
    response = getattr(cast.admin_a.api(), method)(path, body, format="json")
    assert field in _fields(response)


@pytest.mark.parametrize(("field", "value"), [("watch", 1), ("stream", "true"), ("provider_key", 12), ("model", 4)])
def test_run_create_refuses_coerced_types(cast, key_a, field, value):
    response = cast.admin_a.api().post("/api/v1/runs", _run_body(key_a, **{field: value}), format="json")
    assert field in _fields(response)
    assert not Run.objects.exists()


@pytest.mark.parametrize("query", ["limit=abc", "limit=0", "limit=-1", "limit=201", "limit=1.5", "limit="])
def test_an_invalid_limit_is_400_not_the_default_page(cast, query):
    response = cast.admin_a.api().get(f"/api/v1/members?{query}")
    assert "limit" in _fields(response)


def test_a_valid_limit_pages(cast):
    response = cast.admin_a.api().get("/api/v1/members?limit=1")
    assert response.status_code == 200
    assert len(response.json()["results"]) == 1


@pytest.mark.parametrize(
    "path", ["/api/v1/members?limit=1&limit=2", "/api/v1/runs?status=queued&status=failed", "/api/v1/org?x=1&x=2"]
)
def test_a_repeated_query_parameter_is_400(cast, path):
    fields = _fields(cast.admin_a.api().get(path))
    assert list(fields.values()) == [["Give this parameter once."]]


@pytest.mark.parametrize(
    "path", ["/api/v1/runs?status=", "/api/v1/runs?kind=", "/api/v1/audit-events?event=", "/api/v1/usage?since="]
)
def test_an_empty_filter_is_400_not_no_filter(cast, path):
    name = path.rsplit("?", 1)[1].rstrip("=")
    assert name in _fields(cast.admin_a.api().get(path))


def test_an_empty_parameter_with_a_default_means_the_default_as_documented(cast):
    response = cast.admin_a.api().get("/api/v1/usage?group_by=")
    assert response.status_code == 200
    assert response.json()["group_by"] == "day"
    operations = {f"{method} {path}": operation for path, method, operation in _operations()}
    parameters = {p["name"]: p for p in operations["get /api/v1/usage"]["parameters"]}
    assert parameters["group_by"]["allowEmptyValue"] is True
    assert "allowEmptyValue" not in parameters["since"]


# --- Deep JSON and NUL bytes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [40, 100_000])
@pytest.mark.parametrize(("method", "path"), [("post", "/api/v1/runs"), ("patch", "/api/v1/org")])
def test_deeply_nested_json_is_a_400(cast, method, path, depth):
    body = "[" * depth + "]" * depth
    response = getattr(cast.admin_a.api(), method)(path, body, content_type="application/json")
    assert response.status_code == 400
    assert _error(response)["code"] == "parse_error"
    assert "nested" in _error(response)["message"]


def test_json_nested_as_deep_as_limits_need_is_accepted_as_json(cast, key_a):
    # An agent run's limits are one level: the depth limit leaves room for every body the API takes.
    body = _run_body(key_a, kind="agent", limits={"max_steps": 5})
    response = cast.admin_a.api().post("/api/v1/runs", body, format="json")
    assert response.status_code in (201, 400), response.content
    if response.status_code == 400:
        assert _error(response)["code"] == "validation_error"  # e.g. no sandbox: about the run, never the JSON


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"limits": {"max_steps\u0000": 5}, "kind": "agent"}, "limits"),
        ({"limits": {"max_steps": "5\u0000"}, "kind": "agent"}, "limits"),
        ({"objective": "hi\u0000there"}, "objective"),
        ({"model": "gpt\u00004o"}, "model"),
    ],
)
def test_nul_bytes_in_a_run_body_are_a_400_on_the_field(cast, key_a, body, field):
    response = cast.admin_a.api().post("/api/v1/runs", _run_body(key_a, **body), format="json")
    assert _fields(response)[field] == ["Null characters are not allowed."] or field in _fields(response)
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("path", "method", "body"),
    [
        ("/api/v1/org", "patch", {"name": "a\u0000b"}),
        ("/api/v1/api-keys", "post", {"name": "k\u0000"}),
        ("/api/v1/projects", "post", {"name": "p", "description": "d\u0000"}),
        ("/api/v1/provider-keys", "post", {"provider": "openai", "label": "l\u0000", "secret": "sk-0123456789abcdef"}),
    ],
)
def test_nul_bytes_in_names_and_labels_are_a_400(cast, path, method, body):
    response = getattr(cast.admin_a.api(), method)(path, body, format="json")
    assert response.status_code == 400
    assert _error(response)["code"] == "validation_error"


@pytest.mark.parametrize(
    "query",
    [
        "/api/v1/audit-events?actor=a%00b",
        "/api/v1/runs?status=queued%00",
        "/api/v1/members?cursor=%00",
        "/api/v1/runs?created_by=%00",
        "/api/v1/usage?since=2026-01-01%00",
        "/api/v1/org?x%00=1",
    ],
)
def test_nul_bytes_in_query_parameters_are_a_400(cast, query):
    response = cast.admin_a.api().get(query)
    assert response.status_code == 400, response.content
    assert _error(response)["code"] in {"validation_error", "invalid_cursor"}


@pytest.fixture
def project_a(cast, tmp_path: Path, settings):
    settings.WORKSPACE_ROOT = tmp_path / "workspaces"
    project = project_create(org=cast.org_a, actor=cast.admin_a.user, name="p")
    write_file(project_workspace_create(project.id), "notes.txt", "hello")
    return project


def test_a_nul_byte_in_a_path_parameter_is_a_400(cast, project_a):
    response = cast.admin_a.api().get(f"/api/v1/projects/{project_a.id}/files/notes%00.txt")
    assert response.status_code == 400
    assert _error(response)["code"] == "validation_error"


def test_a_missing_project_file_is_a_404(cast, project_a):
    client = cast.admin_a.api()
    assert client.get(f"/api/v1/projects/{project_a.id}/files/notes.txt").content == b"hello"
    for missing in ("absent.txt", "notes.txt/below"):
        response = client.get(f"/api/v1/projects/{project_a.id}/files/{missing}")
        assert response.status_code == 404, missing
        assert _error(response)["code"] == "not_found"


def test_project_files_are_a_plain_list_as_documented(cast, project_a):
    response = cast.admin_a.api().get(f"/api/v1/projects/{project_a.id}/files")
    assert response.json() == [{"path": "notes.txt", "bytes": 5}]
    schema = _schema()["paths"]["/api/v1/projects/{project_id}/files"]["get"]
    assert schema["responses"]["200"]["content"]["application/json"]["schema"]["type"] == "array"
    assert not {p["name"] for p in schema.get("parameters", [])} & {"cursor", "limit"}


# --- The schema documents what the server does -------------------------------------------------------------------


def _schema() -> dict[str, Any]:
    response = APIClient().get("/api/v1/schema/?format=json")
    assert response.status_code == 200
    schema: dict[str, Any] = json.loads(response.content)
    return schema


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, methods in _schema()["paths"].items()
        for method, operation in methods.items()
        if method in {"get", "post", "patch", "put", "delete"}
    ]


def test_every_operation_documents_the_errors_it_can_give_in_the_one_shape():
    operations = _operations()
    assert len(operations) >= 25
    for path, method, operation in operations:
        responses = operation["responses"]
        expected = {"400", "401", "403", "404", "406", "413", "429"} | ({"415"} if method != "get" else set())
        if method == "delete":
            expected -= {"415"}
        assert expected <= set(responses), (method, path, sorted(responses))
        for code, response in responses.items():
            if int(code) >= 400:
                assert set(response["content"]) == {"application/json"}, (method, path, code)
                assert response["content"]["application/json"]["schema"]["$ref"].endswith("/Error")


def test_every_operation_documents_429_with_retry_after():
    for path, method, operation in _operations():
        header = operation["responses"]["429"]["headers"]["Retry-After"]
        assert header["schema"] == {"type": "integer"}, (method, path)
        assert header["required"] is True


def test_strict_bodies_forbid_undeclared_properties_and_patch_bodies_say_what_is_required():
    schemas = _schema()["components"]["schemas"]
    for name in ("RunCreateRequest", "ApiKeyCreateRequest", "MemberUpdateRequest", "ProjectWriteRequest"):
        assert schemas[name]["additionalProperties"] is False, name
    assert schemas["MemberUpdateRequest"]["required"] == ["role"]  # the view validates it whole, not partially
    assert not any(name.startswith("Patched") for name in schemas)


def test_limit_is_documented_with_its_bounds_and_format_is_not_a_parameter():
    operations = {f"{method} {path}": operation for path, method, operation in _operations()}
    parameters = {p["name"]: p for p in operations["get /api/v1/runs"]["parameters"]}
    assert parameters["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 200}
    assert "format" not in parameters


def test_event_streams_describe_their_events():
    stream = _schema()["paths"]["/api/v1/runs/{run_id}/events"]["get"]["responses"]["200"]["content"]
    assert stream["text/event-stream"]["schema"]["required"] == ["data"]


def test_unexpected_keys_are_still_named(cast):
    fields = _fields(cast.admin_a.api().patch("/api/v1/org", {"name": "x", "org": str(uuid.uuid4())}, format="json"))
    assert fields == {"org": ["This field cannot be set here."]}


# --- The schema and docs in production ---------------------------------------------------------------------------

DOCS_PATHS = ["/api/v1/schema/?format=json", "/api/v1/docs/"]


@pytest.mark.parametrize("path", DOCS_PATHS)
def test_private_docs_need_an_org_api_key_or_a_session(cast, settings, path):
    settings.API_DOCS_PUBLIC = False
    anonymous = APIClient().get(path)
    assert anonymous.status_code == 401
    assert _error(anonymous)["code"] == "unauthenticated"
    bad_key = APIClient(HTTP_X_API_KEY="cf_live_nope_0000000000000000000000000000").get(path)
    assert bad_key.status_code == 401
    assert cast.dev_a.api().get(path).status_code == 200
    assert cast.dev_a.session_api().get(path).status_code == 200


@pytest.mark.parametrize("path", DOCS_PATHS)
def test_public_docs_need_nothing(settings, path):
    settings.API_DOCS_PUBLIC = True
    assert APIClient().get(path).status_code == 200


@pytest.mark.parametrize(("value", "expected"), [("", "False"), ("true", "True"), ("false", "False")])
def test_production_keeps_the_docs_private_unless_told(value, expected):
    import subprocess
    import sys

    from tests.test_settings import ROOT, _production_env

    env = _production_env(DJANGO_SETTINGS_MODULE="cesaflow.settings", CESAFLOW_API_DOCS_PUBLIC=value)
    code = "import django; django.setup(); from django.conf import settings; print(settings.API_DOCS_PUBLIC)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_development_keeps_the_docs_public_by_default(settings):
    from cesaflow import settings_api

    assert settings.PRODUCTION is False
    assert settings_api.API_DOCS_PUBLIC is True


def test_the_schema_says_strings_never_hold_a_nul_byte():
    operations = {f"{method} {path}": operation for path, method, operation in _operations()}
    pattern = "^[^\\u0000]*$"
    parameters = {p["name"]: p["schema"] for p in operations["get /api/v1/audit-events"]["parameters"]}
    assert parameters["actor"]["pattern"] == pattern
    assert parameters["cursor"]["pattern"] == pattern
    files = operations["get /api/v1/projects/{project_id}/files/{path}"]["parameters"]
    assert {p["name"]: p["schema"] for p in files}["path"]["pattern"] == pattern
    assert _schema()["components"]["schemas"]["RunCreateRequest"]["properties"]["objective"]["pattern"] == pattern
