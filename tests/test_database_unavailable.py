"""A database that cannot be reached (PostgreSQL restarting) is a 503 ``database_unavailable`` with ``Retry-After``,
never a 500: the deployment drill (``deploy/drill.py``) found every request answered 500 during a restart."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from django.db import OperationalError
from django.test import RequestFactory

from cesaflow.views import server_error
from orgs.tokens import generate_api_key
from tests.live_server import LiveServer, free_port, live_server


@pytest.fixture(scope="module")
def server_without_database(django_db_setup, tmp_path_factory) -> Iterator[LiveServer]:
    # Nothing listens on this port: every database connection is refused, as during a PostgreSQL restart.
    env = {
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:{free_port()}/cesaflow",
        "CESAFLOW_DB_POOL_TIMEOUT": "1",
        "CESAFLOW_DEBUG": "false",
        "CESAFLOW_EXECUTOR": "worker",
    }
    with live_server(tmp_path_factory.mktemp("no-database"), env) as running:
        yield running


def test_api_request_gets_503_database_unavailable_when_the_database_is_down(server_without_database):
    # A well-formed key (valid checksum): looking it up needs the database.
    key = generate_api_key().secret
    response = httpx.get(f"{server_without_database.url}/api/v1/runs", headers={"x-api-key": key}, timeout=30)
    assert response.status_code == 503, response.text[:300]
    assert response.json()["error"]["code"] == "database_unavailable"
    assert response.headers["retry-after"] == "5"
    assert response.headers["cache-control"] == "no-store"


def test_the_gateway_answers_503_database_unavailable_in_openais_shape(server_without_database):
    # The OpenAI SDKs retry a 503 (after Retry-After); a 500 would say CesaFlow is broken.
    key = generate_api_key().secret
    response = httpx.post(
        f"{server_without_database.url}/api/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "team/gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 503, response.text[:300]
    assert response.json() == {
        "error": {
            "message": "CesaFlow cannot reach its database right now; try again shortly.",
            "type": "server_error",
            "param": None,
            "code": "database_unavailable",
        }
    }
    assert response.headers["retry-after"] == "5"


def test_dashboard_page_gets_a_503_page_when_the_database_is_down():
    request = RequestFactory().get("/team/")
    try:
        raise OperationalError("connection refused")
    except OperationalError:
        # Django calls handler500 inside its except block, as here.
        response = server_error(request)
    assert response.status_code == 503
    assert b"cannot reach its database" in response.content
    assert response["Retry-After"] == "5"


def test_other_server_errors_stay_500():
    request = RequestFactory().get("/api/v1/runs")
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        response = server_error(request)
    assert response.status_code == 500
