"""A suspended organization (``nexus.actions.org_suspend``): the API answers 403 ``org_suspended`` to its keys and
sessions, the proxy does in OpenAI's shape, websockets refuse it with 4403 (and close the open ones), the dashboard
shows a banner on every page and refuses every write while reads stay, no run starts, and its queued and running
runs are cancelled. Reactivation restores all of it. Another organization never notices.
"""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone

from cesaflow.asgi import application
from keys.models import Provider, ProviderKey
from keys.services import provider_key_create
from nexus import actions
from nexus.models import Operator, OperatorRole
from orgs.permissions import ORG_SUSPENDED
from runs.models import AuditEvent, Run, RunKind, RunStatus
from runs.services import run_create
from tests.keys.conftest import fake_secret
from tests.runs.test_execution_support import async_isolation  # noqa: F401 - a fixture, used below
from tests.signin import cookie_header, session_cookies_for

REASON = "Card payments disputed; contact billing@example.com."
ORIGIN = (b"origin", b"http://testserver")


@pytest.fixture(autouse=True)
def _runs_stay_queued(settings):
    settings.RUN_EXECUTOR = "worker"  # nothing executes in-process: runs keep the status the test gives them


@pytest.fixture
def operator(db) -> Operator:
    return Operator.objects.create(email="ops@example.com", role=OperatorRole.ADMIN)


def _key(org, actor) -> ProviderKey:
    return provider_key_create(org=org, actor=actor, provider=Provider.OPENAI, label="main", secret=fake_secret())


def _new_run(member, key: ProviderKey, **kwargs) -> Run:
    return run_create(
        org=key.org, actor=member.user, provider_key_id=key.id, model="gpt-4o", objective="Hi.", watch=False, **kwargs
    )


def _suspend(cast, operator) -> None:
    actions.org_suspend(operator=operator, org=cast.org_a, reason=REASON)


def _reactivate(cast, operator) -> None:
    actions.org_reactivate(operator=operator, org=cast.org_a, reason="Dispute settled.")


def _error(response) -> Any:
    return response.json()["error"]


# --- REST API and proxy ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_api_refuses_a_suspended_org_with_org_suspended_for_keys_and_sessions(cast, operator):
    _suspend(cast, operator)
    for client in (cast.admin_a.api(), cast.admin_a.session_api(), cast.dev_a.api(), cast.dev_a.session_api()):
        for path in ("/api/v1/org", "/api/v1/runs", "/api/v1/usage", "/api/v1/api-keys"):
            response = client.get(path)
            assert response.status_code == 403, (path, response.content)
            assert _error(response)["code"] == ORG_SUSPENDED
            assert REASON in _error(response)["message"]
        response = client.post("/api/v1/runs", {"objective": "x"}, format="json")
        assert (response.status_code, _error(response)["code"]) == (403, ORG_SUSPENDED)
    # Another org's members never notice.
    assert cast.admin_b.api().get("/api/v1/runs").status_code == 200
    assert cast.dev_b.session_api().get("/api/v1/runs").status_code == 200


# Transactional: the gateway's database work runs on pool threads, which see committed rows only.
@pytest.mark.django_db(transaction=True)
def test_the_proxy_refuses_a_suspended_org_in_openais_shape(cast, operator):
    _key(cast.org_a, cast.admin_a.user)
    _suspend(cast, operator)
    client = Client()
    bearer = {"authorization": f"Bearer {cast.admin_a.api_secret}"}
    response = client.post(
        "/api/v1/chat/completions",
        {"model": "main/gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        content_type="application/json",
        headers=bearer,
    )
    assert response.status_code == 403
    body = response.json()["error"]
    assert (body["code"], body["type"]) == (ORG_SUSPENDED, "permission_error")
    assert set(body) == {"message", "type", "param", "code"}
    response = client.get("/api/v1/models", headers={"x-api-key": cast.dev_a.api_secret})
    assert (response.status_code, response.json()["error"]["code"]) == (403, ORG_SUSPENDED)
    assert not Run.objects.exists()
    assert Client().get("/api/v1/models", headers={"x-api-key": cast.admin_b.api_secret}).status_code == 200


# --- Runs ----------------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_suspending_cancels_queued_and_running_runs_and_refuses_new_ones(cast, operator):
    key = _key(cast.org_a, cast.admin_a.user)
    queued = _new_run(cast.admin_a, key)
    running = _new_run(cast.dev_a, key)
    Run.objects.filter(pk=running.pk).update(status=RunStatus.RUNNING, started_at=timezone.now())
    finished = _new_run(cast.admin_a, key)
    Run.objects.filter(pk=finished.pk).update(status=RunStatus.SUCCEEDED, finished_at=timezone.now())
    other = _new_run(cast.admin_b, _key(cast.org_b, cast.admin_b.user))

    _suspend(cast, operator)

    queued.refresh_from_db()
    running.refresh_from_db()
    finished.refresh_from_db()
    other.refresh_from_db()
    assert (queued.status, queued.error_kind) == (RunStatus.CANCELLED, "cancelled")
    # A running run is flagged; its executor stops the provider call and records its usage.
    assert running.status == RunStatus.RUNNING
    assert running.cancel_requested_at is not None
    assert finished.status == RunStatus.SUCCEEDED
    assert other.status == RunStatus.QUEUED
    # No run starts, whichever way it is asked for (the gates refuse first; this is the wall behind them).
    cast.org_a.refresh_from_db()
    with pytest.raises(ValidationError) as raised:
        _new_run(cast.admin_a, key)
    assert raised.value.code == ORG_SUSPENDED
    # Nothing is deleted: the runs and the trail keep their rows.
    assert Run.objects.filter(org=cast.org_a).count() == 3
    row = AuditEvent.objects.get(event=AuditEvent.ORG_SUSPENDED)
    assert (row.org_id, row.actor_label, row.metadata) == (cast.org_a.id, operator.label, {"reason": REASON})

    _reactivate(cast, operator)
    cast.org_a.refresh_from_db()
    assert _new_run(cast.admin_a, key).status == RunStatus.QUEUED
    assert AuditEvent.objects.filter(event=AuditEvent.ORG_REACTIVATED, actor_label=operator.label).exists()


@pytest.mark.django_db
def test_proxy_completions_in_flight_are_left_to_their_request(cast, operator):
    """A completion lives in its client's HTTP request; no executor could carry out a cancel flag."""
    key = _key(cast.org_a, cast.admin_a.user)
    completion = _new_run(cast.admin_a, key, kind=RunKind.COMPLETION)
    _suspend(cast, operator)
    completion.refresh_from_db()
    assert completion.status == RunStatus.RUNNING
    assert completion.cancel_requested_at is None


# --- Dashboard -----------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_dashboard_shows_a_banner_and_refuses_writes_while_reads_stay(cast, operator):
    _suspend(cast, operator)
    admin = cast.admin_a.client()
    for path in ("/", "/runs/", "/settings/", "/api-keys/", "/audit/"):
        response = admin.get(path)
        assert response.status_code == 200, path
        assert "This organization is suspended by the CesaFlow operators" in response.text
        assert REASON.rstrip(".") in response.text
    for path, data in (("/settings/", {"name": "Renamed"}), ("/api-keys/", {"name": "new"}), ("/runs/new/", {})):
        response = admin.post(path, data)
        assert response.status_code == 403, path
    cast.org_a.refresh_from_db()
    assert cast.org_a.name == "Org A"
    # The other org's pages carry no banner.
    assert "suspended" not in cast.admin_b.client().get("/").text

    _reactivate(cast, operator)
    response = admin.get("/")
    assert "suspended" not in response.text
    assert admin.post("/settings/", {"name": "Renamed"}).status_code == 302
    cast.org_a.refresh_from_db()
    assert cast.org_a.name == "Renamed"


# Transactional: the gateway's database work runs on pool threads, which see committed rows only.
@pytest.mark.django_db(transaction=True)
def test_reactivation_restores_the_api(cast, operator):
    _suspend(cast, operator)
    assert cast.admin_a.api().get("/api/v1/runs").status_code == 403
    _reactivate(cast, operator)
    assert cast.admin_a.api().get("/api/v1/runs").status_code == 200
    assert cast.dev_a.session_api().get("/api/v1/org").status_code == 200
    assert Client().get("/api/v1/models", headers={"x-api-key": cast.dev_a.api_secret}).status_code == 200


# --- Websockets ----------------------------------------------------------------------------------------------------


async def _close_code(headers) -> int | None:
    """The close code of a refused socket, or None if it was accepted (and is then closed by us)."""
    communicator = WebsocketCommunicator(application, "/ws/org/runs/", headers=headers)
    connected, _ = await communicator.connect(timeout=3)
    assert connected
    if await communicator.receive_nothing(timeout=0.3):
        await communicator.disconnect()
        return None
    output = await communicator.receive_output(timeout=3)
    assert output["type"] == "websocket.close", output
    await communicator.disconnect()
    return int(output["code"])


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("async_isolation")
async def test_websockets_refuse_a_suspended_org_with_4403_and_open_ones_close(cast, operator):
    key_headers = [ORIGIN, (b"x-api-key", cast.admin_a.api_secret.encode())]
    session_headers = [ORIGIN, cookie_header(await sync_to_async(session_cookies_for)(cast.dev_a.user))]
    open_socket = WebsocketCommunicator(application, "/ws/org/runs/", headers=key_headers)
    assert (await open_socket.connect(timeout=3))[0]
    assert await open_socket.receive_nothing(timeout=0.3)

    await sync_to_async(_suspend)(cast, operator)

    # The open socket hears the revocation signal and re-checks.
    closed = await open_socket.receive_output(timeout=5)
    assert (closed["type"], closed["code"]) == ("websocket.close", 4403)
    await open_socket.disconnect()
    assert await _close_code(key_headers) == 4403
    assert await _close_code(session_headers) == 4403
    assert await _close_code([ORIGIN, (b"x-api-key", cast.admin_b.api_secret.encode())]) is None

    await sync_to_async(_reactivate)(cast, operator)
    assert await _close_code(key_headers) is None
    assert await _close_code(session_headers) is None


@pytest.mark.django_db
def test_a_run_created_in_the_instant_of_suspension_never_starts_and_is_cancelled_by_the_sweep(cast, operator):
    """The race: a request past the gate creates its run just after the suspension's own sweep looked (here: an
    org object loaded before the suspension). Executors do not claim it, and their sweep cancels it."""
    from runs.services import run_claim, runs_cancel_for_suspended_orgs, runs_claim_queued

    key = _key(cast.org_a, cast.admin_a.user)
    stale_org = type(cast.org_a).objects.get(pk=cast.org_a.pk)  # loaded before the suspension
    _suspend(cast, operator)
    run = run_create(
        org=stale_org, actor=cast.admin_a.user, provider_key_id=key.id, model="gpt-4o", objective="Hi.", watch=False
    )
    assert run.status == RunStatus.QUEUED
    assert run_claim(run_id=run.id, worker_id="w1") is None
    assert run not in runs_claim_queued(worker_id="w1", limit=10)
    other = _new_run(cast.admin_b, _key(cast.org_b, cast.admin_b.user))
    assert [r.id for r in runs_claim_queued(worker_id="w1", limit=10)] == [other.id]  # other orgs go on
    cancelled = runs_cancel_for_suspended_orgs()
    assert [r.id for r in cancelled] == [run.id]
    assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED
    assert runs_cancel_for_suspended_orgs() == []  # idempotent
