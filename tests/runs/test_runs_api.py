"""The runs REST API (``/api/v1/runs``): create, list, read, cancel, with the fixed cast's isolation matrix.

These tests are not transactional: ``run_create`` hands runs to the executor after commit, which never happens
here, so created runs stay queued and nothing calls a provider.
"""

from __future__ import annotations

import uuid

import pytest
from rest_framework.test import APIClient

from keys.models import Provider
from keys.services import provider_key_create
from orgs.services import api_key_create
from runs.models import Run, RunKind, RunStatus, UsageRecord
from runs.services import run_attach, run_claim, run_create

pytestmark = pytest.mark.django_db

LIST = "/api/v1/runs"


def detail(run_id) -> str:
    return f"/api/v1/runs/{run_id}"


def cancel(run_id) -> str:
    return f"/api/v1/runs/{run_id}/cancel"


def events(run_id) -> str:
    return f"/api/v1/runs/{run_id}/events"


@pytest.fixture
def key_a(cast):
    return provider_key_create(
        org=cast.org_a, actor=cast.admin_a.user, provider=Provider.OPENAI, label="a", secret="sk-test-a-0123456789abcd"
    )


@pytest.fixture
def key_b(cast):
    return provider_key_create(
        org=cast.org_b, actor=cast.admin_b.user, provider=Provider.OPENAI, label="b", secret="sk-test-b-0123456789abcd"
    )


@pytest.fixture
def run_a(cast, key_a) -> Run:
    return run_create(org=cast.org_a, actor=cast.admin_a.user, provider_key_id=key_a.id, model="gpt-4o", objective="A")


def _body(key, **extra):
    return {"objective": "Write a haiku about tenancy.", "provider_key": str(key.id), "model": "gpt-4o", **extra}


def test_a_held_key_is_used_without_reading_it_again_and_held_to_the_same_rules(cast, key_a, key_b):
    """The gateway hands run_create the key row it resolved this request: no second read, but another org's row
    and a revoked one are refused exactly like an unknown id."""
    from django.core.exceptions import ValidationError
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from keys.models import KeyStatus

    with CaptureQueriesContext(connection) as queries:
        run = run_create(org=cast.org_a, actor=cast.admin_a.user, held_key=key_a, model="m", kind=RunKind.COMPLETION)
    assert run.provider_key_id == key_a.id
    assert run.status == RunStatus.RUNNING
    assert not any('FROM "keys_providerkey"' in q["sql"] for q in queries.captured_queries)
    key_a.status = KeyStatus.REVOKED  # a row revoked since it was read
    for held in (key_b, key_a):
        with pytest.raises(ValidationError) as refused:
            run_create(org=cast.org_a, actor=cast.admin_a.user, held_key=held, model="m", kind=RunKind.COMPLETION)
        assert "provider_key" in refused.value.message_dict
    with pytest.raises(ValidationError) as refused:
        run_create(org=cast.org_a, actor=cast.admin_a.user, model="m", kind=RunKind.COMPLETION)  # neither given
    assert "provider_key" in refused.value.message_dict
    assert Run.objects.filter(org=cast.org_a).count() == 1


def test_finishing_a_held_run_rereads_what_others_may_have_changed(cast, key_a):
    """The gateway ends the run instance it created: under the row lock it reads only the columns another writer
    may have changed, and a run cancelled meanwhile keeps that first outcome (its usage still counts)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from runs.services import UsageEntry, run_finish

    held = run_create(org=cast.org_a, actor=cast.admin_a.user, held_key=key_a, model="m", kind=RunKind.COMPLETION)
    Run.objects.filter(id=held.id).update(status=RunStatus.CANCELLED, error_kind="cancelled_by_user")
    usage = [UsageEntry(provider="openai", model="m", input_tokens=3, output_tokens=4, complete=True)]
    with CaptureQueriesContext(connection) as queries:
        ended = run_finish(run_id=held.id, status=RunStatus.SUCCEEDED, usage=usage, held_run=held)
    assert ended is held
    assert (ended.status, ended.error_kind, ended.input_tokens, ended.output_tokens) == (
        "cancelled",
        "cancelled_by_user",
        3,
        4,
    )
    stored = Run.objects.get(id=held.id)
    assert (stored.status, stored.error_kind, stored.total_tokens) == ("cancelled", "cancelled_by_user", 7)
    locking = [q["sql"] for q in queries.captured_queries if "FOR UPDATE" in q["sql"]]
    assert len(locking) == 1
    assert '"runs_run"."objective"' not in locking[0]
    assert UsageRecord.objects.filter(run_id=held.id).count() == 1


# --- The isolation matrix -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "list"), ("post", "list"), ("get", "detail"), ("post", "cancel"), ("get", "events")],
)
def test_anonymous_gets_401_on_every_run_endpoint(run_a, key_a, method, path):
    target = {"list": LIST, "detail": detail(run_a.id), "cancel": cancel(run_a.id), "events": events(run_a.id)}[path]
    response = getattr(APIClient(), method)(target, _body(key_a) if path == "list" else None, format="json")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


@pytest.mark.parametrize(("method", "path"), [("get", "list"), ("get", "detail"), ("post", "cancel")])
def test_outsider_gets_404_on_every_run_endpoint(cast, run_a, method, path):
    target = {"list": LIST, "detail": detail(run_a.id), "cancel": cancel(run_a.id)}[path]
    response = getattr(cast.outsider.session_api(), method)(target)
    assert response.status_code == 404


@pytest.mark.parametrize("member", ["admin_b", "dev_b"])
@pytest.mark.parametrize("path", ["detail", "cancel", "events"])
def test_other_orgs_run_is_404_exactly_like_a_missing_one(cast, run_a, member, path):
    client = getattr(cast, member).api()
    for run_id in (run_a.id, uuid.uuid4()):
        target = {"detail": detail, "cancel": cancel, "events": events}[path](run_id)
        response = client.post(target) if path == "cancel" else client.get(target)
        assert response.status_code == 404
        assert response.json() == {"error": {"code": "not_found", "message": "No such run.", "details": {}}}
    run_a.refresh_from_db()
    assert run_a.status == RunStatus.QUEUED


def test_other_orgs_runs_never_appear_in_the_list(cast, run_a):
    response = cast.admin_b.api().get(LIST)
    assert response.status_code == 200
    assert response.json()["results"] == []


def test_api_key_without_runs_write_gets_403_on_create_and_cancel(cast, key_a, run_a):
    _, secret = api_key_create(org=cast.org_a, name="reader", actor=cast.admin_a.user, scopes=["runs:read"])
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=secret)
    assert client.get(LIST).status_code == 200
    assert client.post(LIST, _body(key_a), format="json").status_code == 403
    assert client.post(cancel(run_a.id)).status_code == 403
    assert Run.objects.count() == 1


# --- Create ---------------------------------------------------------------------------------------------------


def test_developer_creates_a_run_with_an_org_key(cast, key_a):
    response = cast.dev_a.api().post(LIST, _body(key_a), format="json")
    assert response.status_code == 201
    data = response.json()
    run = Run.objects.get(id=data["id"])
    assert response["Location"] == f"/api/v1/runs/{run.id}"
    assert data["status"] == "queued"
    assert data["kind"] == "chat"
    assert data["objective"] == "Write a haiku about tenancy."
    assert data["provider"] == "openai"
    assert data["provider_key"] == str(key_a.id)
    assert data["created_by"]["kind"] == "api_key"
    assert data["created_by"]["id"] == str(cast.dev_a.api_key.id)
    assert (data["input_tokens"], data["output_tokens"], data["usage_complete"]) == (0, 0, False)
    assert run.org_id == cast.org_a.id
    # Metadata only: no field could carry an answer.
    assert not {"answer", "output", "response", "text", "content"} & set(data)


def test_session_user_creates_a_run_recorded_as_themselves(cast, key_a):
    response = cast.dev_a.session_api().post(LIST, _body(key_a), format="json")
    assert response.status_code == 201
    assert response.json()["created_by"] == {
        "kind": "user",
        "id": str(cast.dev_a.user.id),
        "label": cast.dev_a.user.email,
    }


def test_another_orgs_provider_key_is_refused_like_a_missing_one(cast, key_b):
    for key_id in (key_b.id, uuid.uuid4()):
        response = cast.admin_a.api().post(LIST, {**_body(key_b), "provider_key": str(key_id)}, format="json")
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert error["details"]["fields"] == {"provider_key": ["No such provider key."]}
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"objective": ""}, "objective"),
        ({"objective": "x" * 8001}, "objective"),
        ({"model": ""}, "model"),
        ({"provider_key": "not-a-uuid"}, "provider_key"),
        ({"org": "00000000-0000-0000-0000-000000000000"}, "org"),
        ({"status": "succeeded"}, "status"),
    ],
)
def test_invalid_or_unknown_fields_are_400_and_nothing_is_created(cast, key_a, change, field):
    response = cast.dev_a.api().post(LIST, {**_body(key_a), **change}, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]["details"]["fields"]
    assert not Run.objects.exists()


def test_token_cap_reached_is_429_token_cap_reached(cast, key_a, run_a):
    cast.org_a.monthly_token_cap = 100
    cast.org_a.save(update_fields=["monthly_token_cap"])
    UsageRecord.objects.create(
        org=cast.org_a, run=run_a, provider="openai", model="gpt-4o", input_tokens=60, output_tokens=40
    )
    response = cast.dev_a.api().post(LIST, _body(key_a), format="json")
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "token_cap_reached"
    assert "100" in error["message"]
    assert Run.objects.count() == 1


# --- Read and list ----------------------------------------------------------------------------------------------


def test_detail_returns_the_runs_metadata(cast, run_a):
    response = cast.dev_a.api().get(detail(run_a.id))
    assert response.status_code == 200
    assert response.json()["id"] == str(run_a.id)
    assert response.json()["cancel_requested"] is False


def test_list_filters_by_status_kind_and_creator(cast, key_a, run_a):
    by_dev = run_create(
        org=cast.org_a, actor=cast.dev_a.api_key, provider_key_id=key_a.id, model="gpt-4o", objective="dev", watch=False
    )
    run_claim(run_id=by_dev.id, worker_id="w")
    client = cast.dev_a.api()

    def ids(query: str) -> set[str]:
        response = client.get(f"{LIST}?{query}")
        assert response.status_code == 200, response.content
        return {r["id"] for r in response.json()["results"]}

    assert ids("") == {str(run_a.id), str(by_dev.id)}
    assert ids("status=running") == {str(by_dev.id)}
    assert ids("status=queued") == {str(run_a.id)}
    assert ids("kind=chat") == {str(run_a.id), str(by_dev.id)}
    assert ids(f"kind={RunKind.COMPLETION}") == set()
    assert ids(f"created_by={cast.dev_a.api_key.id}") == {str(by_dev.id)}
    assert ids(f"created_by={cast.admin_a.user.id}") == {str(run_a.id)}
    assert ids(f"created_by={uuid.uuid4()}") == set()


@pytest.mark.parametrize("query", ["status=done", "kind=telepathy", "created_by=alice", "cursor=garbage"])
def test_invalid_list_filters_are_400(cast, run_a, query):
    response = cast.dev_a.api().get(f"{LIST}?{query}")
    assert response.status_code == 400


def test_list_is_cursor_paginated_newest_first(cast, key_a):
    runs = [
        run_create(org=cast.org_a, actor=cast.dev_a.user, provider_key_id=key_a.id, model="m", objective=f"r{i}")
        for i in range(5)
    ]
    client = cast.dev_a.api()
    seen: list[str] = []
    page = client.get(f"{LIST}?limit=2").json()
    while True:
        seen.extend(r["id"] for r in page["results"])
        if not page["next"]:
            break
        page = client.get(page["next"]).json()
    assert seen == [str(r.id) for r in reversed(runs)]


def test_list_query_count_does_not_grow_with_the_number_of_runs(cast, key_a, django_assert_num_queries):
    client = cast.dev_a.api()
    client.get(LIST)  # the API key's last_used_at is written once a minute: keep that out of the count

    def make(n: int) -> None:
        for i in range(n):
            run_create(org=cast.org_a, actor=cast.dev_a.user, provider_key_id=key_a.id, model="m", objective=str(i))

    make(2)
    # The page of runs (creators and keys joined in); the API key was verified a moment ago (orgs.api_key_cache).
    with django_assert_num_queries(1):
        assert len(client.get(LIST).json()["results"]) == 2
    make(8)
    with django_assert_num_queries(1):
        assert len(client.get(LIST).json()["results"]) == 10


# --- Cancel -----------------------------------------------------------------------------------------------------


def test_developer_cancels_a_queued_run_at_once(cast, run_a):
    response = cast.dev_a.api().post(cancel(run_a.id))
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["error_kind"] == "cancelled"
    run_a.refresh_from_db()
    assert run_a.status == RunStatus.CANCELLED


def test_cancelling_a_running_run_flags_it_for_its_executor(cast, run_a):
    run_attach(run=run_a)
    assert run_claim(run_id=run_a.id, worker_id="w") is not None
    response = cast.dev_a.session_api().post(cancel(run_a.id))
    assert response.status_code == 200
    assert response.json()["status"] == "running"
    assert response.json()["cancel_requested"] is True
    run_a.refresh_from_db()
    assert run_a.cancel_requested_at is not None


def test_a_proxy_completion_cannot_be_cancelled_from_the_api_and_says_why(cast, key_a):
    completion = run_create(
        org=cast.org_a, actor=cast.admin_a.user, provider_key_id=key_a.id, model="gpt-4o", kind=RunKind.COMPLETION
    )
    response = cast.dev_a.api().post(cancel(completion.id))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "not_cancellable"
    completion.refresh_from_db()
    assert (completion.status, completion.cancel_requested_at) == (RunStatus.RUNNING, None)


def test_cancelling_a_finished_run_changes_nothing(cast, run_a):
    cast.dev_a.api().post(cancel(run_a.id))
    run_a.refresh_from_db()
    finished_at = run_a.finished_at
    response = cast.dev_a.api().post(cancel(run_a.id))
    assert response.status_code == 200
    run_a.refresh_from_db()
    assert (run_a.status, run_a.finished_at) == (RunStatus.CANCELLED, finished_at)


def test_schema_documents_the_run_endpoints():
    schema = APIClient().get("/api/v1/schema/?format=json").json()
    assert {"get", "post"} <= set(schema["paths"]["/api/v1/runs"])
    assert "get" in schema["paths"]["/api/v1/runs/{run_id}"]
    assert "post" in schema["paths"]["/api/v1/runs/{run_id}/cancel"]
    stream = schema["paths"]["/api/v1/runs/{run_id}/events"]["get"]["responses"]
    assert "text/event-stream" in stream["200"]["content"]
    assert "application/json" in stream["404"]["content"]
    created = schema["paths"]["/api/v1/runs"]["post"]["responses"]
    assert created["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
