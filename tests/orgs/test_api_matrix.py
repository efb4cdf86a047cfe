"""The isolation matrix for every REST endpoint of the orgs and audit APIs (NetBox's generated tests, Sentry's
org-bound keys): anonymous -> 401, a Developer on an Admin action -> 403, another org's object -> the same 404 as a
random id, an outsider -> 404, lists never show another org's rows. Each case runs with an API key and a session.

Adding an endpoint to ``orgs/api/urls.py`` or ``runs/api/urls.py`` without listing it here fails
``test_every_api_route_is_in_the_matrix``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.conf import settings
from django.urls import get_resolver, reverse
from django.utils.crypto import get_random_string
from rest_framework.test import APIClient

from orgs.models import ApiKey, Membership, Organization
from runs.models import AuditEvent
from tests.conftest import Cast, Member
from tests.signin import sign_in


@dataclass(frozen=True)
class Endpoint:
    method: str
    name: str
    #: which org-A object the URL addresses: "member" (the Developer's membership), "api_key" (their key) or None
    target: str | None = None
    admin_only: bool = False
    body: dict[str, Any] = field(default_factory=dict)
    ok: int = 200

    def __str__(self) -> str:
        return f"{self.method} {self.name}"


ENDPOINTS = [
    Endpoint("GET", "orgs_api:org"),
    Endpoint("PATCH", "orgs_api:org", admin_only=True, body={"name": "Renamed"}),
    Endpoint("GET", "orgs_api:member-list"),
    Endpoint("GET", "orgs_api:member-detail", target="member"),
    Endpoint("PATCH", "orgs_api:member-detail", target="member", admin_only=True, body={"role": "admin"}),
    Endpoint("DELETE", "orgs_api:member-detail", target="member", admin_only=True, ok=204),
    Endpoint("GET", "orgs_api:api-key-list", admin_only=True),
    Endpoint("POST", "orgs_api:api-key-list", admin_only=True, body={"name": "ci"}, ok=201),
    Endpoint("GET", "orgs_api:api-key-detail", target="api_key", admin_only=True),
    Endpoint("DELETE", "orgs_api:api-key-detail", target="api_key", admin_only=True, ok=204),
    Endpoint("GET", "runs_api:audit-event-list", admin_only=True),
    Endpoint("GET", "runs_api:usage"),
]
# Routes whose isolation matrix lives next to their own fixtures (runs need provider keys and a simulator; the
# OpenAI-compatible proxy answers in OpenAI's error shape and accepts API keys only).
COVERED_ELSEWHERE = {
    "runs_api:run-list": "tests/runs/test_runs_api.py",
    "runs_api:run-detail": "tests/runs/test_runs_api.py",
    "runs_api:run-cancel": "tests/runs/test_runs_api.py",
    "runs_api:run-events": "tests/runs/test_sse.py",
    "runs_api:run-workspace": "tests/runs/test_agent_runs.py",
    "runs_api:project-list": "tests/runs/test_projects_api.py",
    "runs_api:project-detail": "tests/runs/test_projects_api.py",
    "runs_api:project-files": "tests/runs/test_projects_api.py",
    "runs_api:project-file": "tests/runs/test_projects_api.py",
    "runs_api:project-workspace": "tests/runs/test_projects_api.py",
    "runs_api:chat-completions": "tests/runs/test_proxy.py",
    "runs_api:models": "tests/runs/test_proxy.py",
}
LISTS = [e for e in ENDPOINTS if e.method == "GET" and e.name.endswith("-list")]
WRITES = [e for e in ENDPOINTS if e.method != "GET"]
TARGETED = [e for e in ENDPOINTS if e.target]
AUTH_STYLES = ["api_key", "session"]

pytestmark = pytest.mark.django_db


def _client(member: Member, auth: str) -> APIClient:
    return member.api() if auth == "api_key" else member.session_api()


def _target_id(cast: Cast, target: str, org: str = "a") -> uuid.UUID:
    dev = cast.dev_a if org == "a" else cast.dev_b
    if target == "member":
        return Membership.objects.get(user=dev.user, org=dev.org).id
    assert dev.api_key is not None
    return dev.api_key.id


def _url(endpoint: Endpoint, object_id: uuid.UUID | None = None) -> str:
    if endpoint.target is None:
        return reverse(endpoint.name)
    kwarg = "member_id" if endpoint.target == "member" else "api_key_id"
    return reverse(endpoint.name, kwargs={kwarg: object_id})


def _call(client: APIClient, endpoint: Endpoint, url: str, **extra: Any):
    method = getattr(client, endpoint.method.lower())
    if endpoint.method in {"POST", "PATCH"}:
        return method(url, endpoint.body, format="json", **extra)
    return method(url, **extra)


def _state() -> tuple[Any, ...]:
    """Everything an endpoint here could change, to prove a refused request changed nothing."""
    return (
        sorted(Organization.objects.values_list("id", "name")),
        sorted(Membership.objects.values_list("id", "role")),
        sorted((k.id, k.revoked_at) for k in ApiKey.objects.all()),
        AuditEvent.objects.count(),
    )


def _assert_error(response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body


def test_every_api_route_is_in_the_matrix():
    covered = {e.name for e in ENDPOINTS}
    routes = set()
    for namespace in ("orgs_api", "runs_api"):
        _, resolver = get_resolver().namespace_dict[namespace]
        routes |= {f"{namespace}:{name}" for name in resolver.reverse_dict if isinstance(name, str)}
    assert routes == covered | set(COVERED_ELSEWHERE)
    assert not covered & set(COVERED_ELSEWHERE)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_anonymous_gets_401_with_the_error_shape(cast, endpoint):
    before = _state()
    target = _target_id(cast, endpoint.target) if endpoint.target else None
    response = _call(APIClient(), endpoint, _url(endpoint, target))
    _assert_error(response, 401, "unauthenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert _state() == before


@pytest.mark.parametrize("auth", AUTH_STYLES)
@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e.admin_only], ids=str)
def test_developer_gets_403_on_admin_only_actions(cast, endpoint, auth):
    client = _client(cast.dev_a, auth)  # a session login is itself audited: snapshot after it
    before = _state()
    target = _target_id(cast, endpoint.target) if endpoint.target else None
    response = _call(client, endpoint, _url(endpoint, target))
    _assert_error(response, 403, "permission_denied")
    assert _state() == before


@pytest.mark.parametrize("auth", AUTH_STYLES)
@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if not e.admin_only], ids=str)
def test_developer_may_use_member_endpoints(cast, endpoint, auth):
    target = _target_id(cast, endpoint.target) if endpoint.target else None
    response = _call(_client(cast.dev_a, auth), endpoint, _url(endpoint, target))
    assert response.status_code == endpoint.ok, response.content


@pytest.mark.parametrize("auth", AUTH_STYLES)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_admin_may_use_every_endpoint(cast, endpoint, auth):
    target = _target_id(cast, endpoint.target) if endpoint.target else None
    response = _call(_client(cast.admin_a, auth), endpoint, _url(endpoint, target))
    assert response.status_code == endpoint.ok, response.content


@pytest.mark.parametrize("auth", AUTH_STYLES)
@pytest.mark.parametrize("endpoint", TARGETED, ids=str)
def test_another_orgs_object_is_a_404_identical_to_a_random_id(cast, endpoint, auth):
    client = _client(cast.admin_b, auth)
    before = _state()
    foreign = _call(client, endpoint, _url(endpoint, _target_id(cast, endpoint.target, org="a")))
    missing = _call(client, endpoint, _url(endpoint, uuid.uuid4()))
    _assert_error(foreign, 404, "not_found")
    assert foreign.status_code == missing.status_code
    assert foreign.json() == missing.json()
    assert _state() == before


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_outsider_session_gets_404(cast, endpoint):
    client = cast.outsider.session_api()
    before = _state()
    target = _target_id(cast, endpoint.target) if endpoint.target else None
    response = _call(client, endpoint, _url(endpoint, target))
    _assert_error(response, 404, "not_found")
    assert _state() == before


@pytest.mark.parametrize("auth", AUTH_STYLES)
@pytest.mark.parametrize("endpoint", LISTS, ids=str)
def test_lists_never_show_another_orgs_rows(cast, endpoint, auth):
    org_a_ids = {
        *map(str, Membership.objects.filter(org=cast.org_a).values_list("id", flat=True)),
        *map(str, ApiKey.objects.filter(org=cast.org_a).values_list("id", flat=True)),
        *map(str, AuditEvent.objects.filter(org=cast.org_a).values_list("id", flat=True)),
        *map(str, [cast.admin_a.user.id, cast.dev_a.user.id]),
    }
    assert AuditEvent.objects.filter(org=cast.org_a).exists()
    response = _call(_client(cast.admin_b, auth), endpoint, _url(endpoint))
    assert response.status_code == 200
    results = response.json()["results"]
    assert results, "org B has rows of its own"
    assert not org_a_ids & {str(row["id"]) for row in results}
    text = response.content.decode()
    assert "a.example" not in text  # org A's people, by email, anywhere in the payload
    assert str(cast.org_a.id) not in text


@pytest.mark.parametrize("endpoint", WRITES, ids=str)
def test_session_writes_need_a_csrf_token(cast, endpoint):
    target = _target_id(cast, endpoint.target) if endpoint.target else None
    url = _url(endpoint, target)
    client = APIClient(enforce_csrf_checks=True)
    sign_in(client, cast.admin_a.user)
    before = _state()
    refused = _call(client, endpoint, url)
    body = _assert_error(refused, 403, "permission_denied")
    assert "CSRF" in body["error"]["message"]
    assert _state() == before

    token = get_random_string(32)
    client.cookies[settings.CSRF_COOKIE_NAME] = token
    accepted = _call(client, endpoint, url, HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code == endpoint.ok, accepted.content


@pytest.mark.parametrize("endpoint", WRITES, ids=str)
def test_api_key_writes_need_no_csrf_token(cast, endpoint):
    """A header credential cannot be sent by a browser on its own, so CSRF does not apply (and must not break)."""
    target = _target_id(cast, endpoint.target) if endpoint.target else None
    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_X_API_KEY=cast.admin_a.api_secret)
    response = _call(client, endpoint, _url(endpoint, target))
    assert response.status_code == endpoint.ok, response.content
