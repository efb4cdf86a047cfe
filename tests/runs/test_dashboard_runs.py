"""The runs dashboard: list, new-run form, run page, cancel and the model list, with the tenant gate on each.

Runs are created through ``runs.services`` (inside the test transaction, so nothing is handed to an executor).
"""

from __future__ import annotations

import re
import secrets
import uuid
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from keys.checking import remember_check
from keys.models import Provider, ProviderKey
from keys.providers import ProbeResult, ProbeStatus
from keys.services import provider_key_create, provider_key_revoke
from runs import views
from runs.models import AuditEvent, Run, RunStatus, UsageRecord
from runs.services import UsageEntry, run_claim, run_create, run_finish
from runs.views import ERROR_EXPLANATIONS, explain_error, format_duration

pytestmark = pytest.mark.django_db

RUN_LIST = reverse("runs:run_list")
RUN_NEW = reverse("runs:run_new")
RUN_MODELS = reverse("runs:run_models")


def _key(org: Any, actor: Any, label: str = "main", provider: str = Provider.OPENAI) -> ProviderKey:
    return provider_key_create(
        org=org, actor=actor, provider=provider, label=label, secret="sk-test-" + secrets.token_urlsafe(24)
    )


def _run(member: Any, key: ProviderKey, objective: str = "Summarize the design", model: str = "gpt-4o-mini") -> Run:
    return run_create(
        org=member.org, actor=member.user, provider_key_id=key.id, model=model, objective=objective, watch=False
    )


def _finished(run: Run, status: str = RunStatus.SUCCEEDED, **kwargs: Any) -> Run:
    run_claim(run_id=run.id, worker_id="test")
    usage = [UsageEntry(provider=run.provider, model=run.model, input_tokens=12, output_tokens=34, complete=True)]
    return run_finish(run_id=run.id, status=status, usage=usage, **kwargs)


def _cache_models(key: ProviderKey, models: list[str]) -> None:
    """What a valid check of ``key`` leaves in the cache."""
    remember_check(key=key, result=ProbeResult(status=ProbeStatus.VALID, models=tuple(models)))


@pytest.fixture
def key_a(cast) -> ProviderKey:
    return _key(cast.org_a, cast.admin_a.user)


@pytest.fixture
def key_b(cast) -> ProviderKey:
    return _key(cast.org_b, cast.admin_b.user)


# --- The tenant gate ----------------------------------------------------------------------------------------------


def _pages(run_id: uuid.UUID) -> list[tuple[str, str]]:
    return [
        ("get", RUN_LIST),
        ("get", RUN_NEW),
        ("post", RUN_NEW),
        ("get", reverse("runs:run_detail", kwargs={"run_id": run_id})),
        ("post", reverse("runs:run_cancel", kwargs={"run_id": run_id})),
        ("get", RUN_MODELS),
    ]


def test_anonymous_visitors_are_sent_to_log_in_from_every_runs_page(cast, key_a, client):
    run = _run(cast.admin_a, key_a)
    for method, url in _pages(run.id):
        response = getattr(client, method)(url)
        assert response.status_code == 302, (method, url)
        assert response["Location"].startswith(reverse("orgs:login")), (method, url)
    assert Run.objects.get(id=run.id).status == RunStatus.QUEUED


def test_outsider_is_sent_to_create_an_org_from_every_runs_page(cast, key_a):
    run = _run(cast.admin_a, key_a)
    client = cast.outsider.client()
    for method, url in _pages(run.id):
        response = getattr(client, method)(url)
        assert response.status_code == 302, (method, url)
        assert response["Location"] == reverse("orgs:org_create"), (method, url)
    assert Run.objects.get(id=run.id).status == RunStatus.QUEUED


def test_another_orgs_run_is_404_on_the_run_page_and_cancel(cast, key_a):
    run = _run(cast.admin_a, key_a)
    for member in (cast.admin_b, cast.dev_b):
        client = member.client()
        assert client.get(reverse("runs:run_detail", kwargs={"run_id": run.id})).status_code == 404
        assert client.post(reverse("runs:run_cancel", kwargs={"run_id": run.id})).status_code == 404
    assert client.get(reverse("runs:run_detail", kwargs={"run_id": uuid.uuid4()})).status_code == 404
    fresh = Run.objects.get(id=run.id)
    assert fresh.status == RunStatus.QUEUED
    assert fresh.cancel_requested_at is None


def test_runs_list_shows_only_the_orgs_own_runs(cast, key_a, key_b):
    mine = _run(cast.admin_a, key_a, objective="Org A's objective")
    theirs = _run(cast.admin_b, key_b, objective="Org B's secret plan")
    content = cast.dev_a.client().get(RUN_LIST).content.decode()
    assert str(mine.id) in content
    assert "Org A&#x27;s objective" in content
    assert str(theirs.id) not in content
    assert "secret plan" not in content


def test_developer_may_list_start_watch_and_cancel_runs(cast, key_a):
    client = cast.dev_a.client()
    assert client.get(RUN_LIST).status_code == 200
    assert client.get(RUN_NEW).status_code == 200
    response = client.post(
        RUN_NEW, {"objective": "Write a haiku", "provider_key": str(key_a.id), "custom_model": "gpt-4o-mini"}
    )
    run = Run.objects.get(org=cast.org_a)
    assert response.status_code == 302
    assert response["Location"] == reverse("runs:run_detail", kwargs={"run_id": run.id})
    assert client.get(response["Location"]).status_code == 200
    response = client.post(reverse("runs:run_cancel", kwargs={"run_id": run.id}))
    assert response.status_code == 302
    assert Run.objects.get(id=run.id).status == RunStatus.CANCELLED


def test_model_list_of_another_orgs_key_is_404(cast, key_b):
    response = cast.admin_a.client().get(RUN_MODELS, {"provider_key": str(key_b.id)})
    assert response.status_code == 404
    assert response.json()["models"] == []
    response = cast.admin_a.client().get(RUN_MODELS, {"provider_key": "not-a-uuid"})
    assert response.status_code == 404


# --- The runs list --------------------------------------------------------------------------------------------------


def test_runs_list_rows_carry_objective_model_key_status_creator_and_tokens(cast, key_a):
    run = _finished(_run(cast.dev_a, key_a, objective="Explain CSP", model="gpt-4.1"))
    response = cast.admin_a.client().get(RUN_LIST)
    assert response.status_code == 200
    content = response.content.decode()
    row = re.search(rf'<tr data-run-id="{run.id}">(.*?)</tr>', content, re.S)
    assert row is not None
    cells = row.group(1)
    assert "Explain CSP" in cells
    assert "gpt-4.1" in cells
    assert "main" in cells  # the key's label
    assert "status-succeeded" in cells
    assert "dave@a.example" in cells
    assert "<span data-run-input-tokens>12</span> / <span data-run-output-tokens>34</span>" in cells
    # The live updates are a module, never an inline script.
    assert 'src="/static/js/runs-live.js"' in content
    assert "<script>" not in content


def test_runs_list_filters_by_status(cast, key_a):
    queued = _run(cast.admin_a, key_a, objective="still queued")
    done = _finished(_run(cast.admin_a, key_a, objective="already done"))
    response = cast.admin_a.client().get(RUN_LIST, {"status": RunStatus.SUCCEEDED})
    ids = [run.id for run, _creator in response.context["rows"]]
    assert ids == [done.id]
    assert queued.id not in ids
    response = cast.admin_a.client().get(RUN_LIST, {"status": "bogus"})
    assert response.status_code == 200
    assert {run.id for run, _creator in response.context["rows"]} == {queued.id, done.id}


def test_runs_list_query_count_does_not_grow_with_the_number_of_runs(cast, key_a):
    client = cast.admin_a.client()
    client.get(RUN_LIST)  # warm the session

    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert client.get(RUN_LIST).status_code == 200
        return len(queries)

    for _ in range(2):
        _finished(_run(cast.admin_a, key_a))
    few = count()
    for _ in range(8):
        _run(cast.dev_a, key_a)
    many = count()
    assert few == many
    # session, user, membership + org, the page count and the runs (keys and creators joined)
    assert many == 5


# --- The new-run form -----------------------------------------------------------------------------------------------


def test_new_run_form_offers_the_orgs_usable_keys_only(cast, key_a, key_b):
    revoked = _key(cast.org_a, cast.admin_a.user, label="old")
    provider_key_revoke(key=revoked, actor=cast.admin_a.user)
    form = cast.dev_a.client().get(RUN_NEW).context["form"]
    offered = [value for value, _label in form.fields["provider_key"].choices]
    assert offered == [str(key_a.id)]


def test_new_run_form_offers_cached_models_grouped_by_key(cast, key_a):
    _cache_models(key_a, ["gpt-4o-mini", "gpt-4.1"])
    response = cast.dev_a.client().get(RUN_NEW)
    content = response.content.decode()
    assert '<optgroup label="main">' in content
    assert '<option value="gpt-4.1">gpt-4.1</option>' in content
    assert "data-model-picker hidden" not in content
    response = cast.dev_a.client().post(
        RUN_NEW, {"objective": "Go", "provider_key": str(key_a.id), "model": "gpt-4.1", "custom_model": ""}
    )
    assert response.status_code == 302
    assert Run.objects.get(org=cast.org_a).model == "gpt-4.1"


def test_typed_model_takes_precedence_over_the_list(cast, key_a):
    _cache_models(key_a, ["gpt-4o-mini"])
    cast.dev_a.client().post(
        RUN_NEW, {"objective": "Go", "provider_key": str(key_a.id), "model": "gpt-4o-mini", "custom_model": " o3 "}
    )
    assert Run.objects.get(org=cast.org_a).model == "o3"


def test_new_run_without_cached_models_asks_for_a_typed_model(cast, key_a):
    response = cast.dev_a.client().get(RUN_NEW)
    content = response.content.decode()
    assert "data-model-picker hidden" in content
    response = cast.dev_a.client().post(RUN_NEW, {"objective": "Go", "provider_key": str(key_a.id)})
    assert response.status_code == 400
    assert response.context["form"].errors["custom_model"] == ["Choose or type a model."]
    assert not Run.objects.exists()


def test_new_run_validation_errors_are_shown_on_the_form(cast, key_a):
    client = cast.dev_a.client()
    response = client.post(RUN_NEW, {"objective": "   ", "provider_key": str(key_a.id), "custom_model": "m"})
    assert response.status_code == 400
    assert "objective" in response.context["form"].errors
    response = client.post(RUN_NEW, {"objective": "x" * 8001, "provider_key": str(key_a.id), "custom_model": "m"})
    assert response.status_code == 400
    assert "objective" in response.context["form"].errors
    assert not Run.objects.exists()


def test_new_run_with_another_orgs_key_is_refused_like_a_missing_one(cast, key_a, key_b):
    response = cast.dev_a.client().post(
        RUN_NEW, {"objective": "Go", "provider_key": str(key_b.id), "custom_model": "gpt-4o-mini"}
    )
    assert response.status_code == 400
    assert "provider_key" in response.context["form"].errors
    assert not Run.objects.exists()


def test_new_run_is_refused_with_a_clear_message_once_the_token_cap_is_reached(cast, key_a):
    done = _finished(_run(cast.admin_a, key_a))  # 46 tokens this month
    cast.org_a.monthly_token_cap = 40
    cast.org_a.save(update_fields=["monthly_token_cap"])
    client = cast.dev_a.client()
    page = client.get(RUN_NEW).content.decode()
    assert "has used 46 of its 40 monthly tokens" in page
    response = client.post(RUN_NEW, {"objective": "Go", "provider_key": str(key_a.id), "custom_model": "m"})
    assert response.status_code == 400
    assert "This organization has used 46 of its 40 monthly tokens." in response.content.decode()
    assert list(Run.objects.values_list("id", flat=True)) == [done.id]


def test_new_run_page_without_keys_points_to_the_provider_keys_page(cast):
    admin_page = cast.admin_a.client().get(RUN_NEW).content.decode()
    assert reverse("keys:provider_keys") in admin_page
    dev_page = cast.dev_a.client().get(RUN_NEW).content.decode()
    assert "Ask an Admin to add one" in dev_page


def test_model_list_comes_from_the_cache_without_calling_the_provider(cast, key_a):
    _cache_models(key_a, ["fake-model"])
    response = cast.dev_a.client().get(RUN_MODELS, {"provider_key": str(key_a.id)})
    assert response.status_code == 200
    assert response.json() == {"models": ["fake-model"], "message": "", "checked": True}
    assert not AuditEvent.objects.filter(event=AuditEvent.KEY_USED).exists()


def _sim_key(cast, simulator) -> ProviderKey:
    return provider_key_create(
        org=cast.org_a,
        actor=cast.admin_a.user,
        provider=Provider.OPENAI_COMPATIBLE,
        label="sim",
        secret="sk-sim-" + secrets.token_urlsafe(16),
        base_url=simulator.base_urls["openai"],
    )


def test_an_admin_loading_the_model_list_checks_a_key_nothing_is_cached_for(cast, simulator):
    key = _sim_key(cast, simulator)
    response = cast.admin_a.client().get(RUN_MODELS, {"provider_key": str(key.id)})
    assert response.status_code == 200
    assert "fake-model" in response.json()["models"]
    assert AuditEvent.objects.filter(event=AuditEvent.KEY_CHECKED, target_id=str(key.id)).exists()
    calls = len(simulator.requests())
    # Cached now: a Developer gets the list, with no provider call.
    assert "fake-model" in cast.dev_a.client().get(RUN_MODELS, {"provider_key": str(key.id)}).json()["models"]
    assert len(simulator.requests()) == calls


def test_a_developer_never_causes_a_key_check_and_sees_not_checked_yet(cast, simulator):
    key = _sim_key(cast, simulator)
    client = cast.dev_a.client()
    response = client.get(RUN_MODELS, {"provider_key": str(key.id)})
    assert response.status_code == 200
    assert response.json() == {"models": [], "message": views.NOT_CHECKED, "checked": False}
    assert "sim · OpenAI-compatible" in client.get(RUN_NEW).content.decode()
    assert "— not checked yet" in client.get(RUN_NEW).content.decode()
    # No outbound call (the simulator saw nothing), no audit row, no recorded check.
    assert simulator.requests() == []
    assert not AuditEvent.objects.filter(event__in=[AuditEvent.KEY_USED, AuditEvent.KEY_CHECKED]).exists()
    assert ProviderKey.objects.get(pk=key.pk).last_checked_at is None


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (ProbeStatus.RESTRICTED, "may not list models"),
        (ProbeStatus.INVALID, "rejected this key"),
        (ProbeStatus.UNREACHABLE, "unreachable at the last check"),
    ],
)
def test_a_cached_negative_check_is_served_without_a_new_one(cast, simulator, status, message):
    key = _sim_key(cast, simulator)
    remember_check(key=key, result=ProbeResult(status=status, message="from the provider"))
    for member in (cast.admin_a, cast.dev_a):
        body = member.client().get(RUN_MODELS, {"provider_key": str(key.id)}).json()
        assert body["models"] == []
        assert message in body["message"]
        assert body["checked"] is True
    assert "not checked yet" not in cast.dev_a.client().get(RUN_NEW).content.decode()
    assert simulator.requests() == []
    assert not AuditEvent.objects.filter(event=AuditEvent.KEY_CHECKED).exists()


# --- The run page -----------------------------------------------------------------------------------------------


def test_running_run_page_streams_over_the_websocket_module(cast, key_a):
    run = _run(cast.dev_a, key_a)
    run_claim(run_id=run.id, worker_id="test")
    response = cast.dev_a.client().get(reverse("runs:run_detail", kwargs={"run_id": run.id}))
    content = response.content.decode()
    assert f'data-ws-path="/ws/runs/{run.id}/"' in content
    assert 'data-status="running"' in content
    assert "data-run-answer" in content
    assert 'src="/static/js/run-stream.js"' in content
    assert "data-run-cancel" in content
    assert "responses are not stored" in content
    # The error explanations reach the script as data, not code.
    assert '<script id="run-error-explanations" type="application/json">' in content


def test_finished_run_page_says_responses_are_not_stored_and_has_no_output(cast, key_a):
    run = _finished(_run(cast.dev_a, key_a, objective="Tell me a secret"))
    response = cast.dev_a.client().get(reverse("runs:run_detail", kwargs={"run_id": run.id}))
    content = response.content.decode()
    assert "Responses are not stored" in content
    assert "data-run-not-stored" in content
    assert "data-run-answer" not in content
    assert "run-stream.js" not in content
    assert "data-run-cancel" not in content
    # Metadata only: objective, model, tokens.
    assert "Tell me a secret" in content
    assert "gpt-4o-mini" in content
    assert '<dd class="num-inline" data-run-input-tokens>12</dd>' in content
    assert '<dd class="num-inline" data-run-output-tokens>34</dd>' in content


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("auth", "The provider rejected the key."),
        ("timeout", "The provider stopped responding."),
        ("rate_limit", "kept rate-limiting this key"),
        ("worker_lost", "The process executing this run stopped"),
    ],
)
def test_failed_run_page_explains_the_failure_in_plain_words(cast, key_a, kind, expected):
    run = _finished(_run(cast.dev_a, key_a), status=RunStatus.FAILED, error_kind=kind, error_message="raw detail")
    content = cast.dev_a.client().get(reverse("runs:run_detail", kwargs={"run_id": run.id})).content.decode()
    assert expected in content
    assert "raw detail" not in content


def test_unknown_failure_kinds_fall_back_to_our_stored_message():
    assert explain_error("something_new", "The executor gave up.") == "The executor gave up."
    assert explain_error("something_new") == "The run failed."
    assert explain_error("auth", "ignored").startswith("The provider rejected the key.")
    assert set(ERROR_EXPLANATIONS) >= {"auth", "rate_limit", "timeout", "incomplete", "network", "cancelled"}


def test_durations_read_like_a_person_would_say_them():
    assert format_duration(0.4) == "0 s"
    assert format_duration(59) == "59 s"
    assert format_duration(63) == "1 min 3 s"
    assert format_duration(3725) == "1 h 2 min"


# --- Cancel ---------------------------------------------------------------------------------------------------------


def test_cancelling_a_queued_run_ends_it_at_once(cast, key_a):
    run = _run(cast.dev_a, key_a)
    response = cast.dev_a.client().post(reverse("runs:run_cancel", kwargs={"run_id": run.id}), follow=True)
    assert "cancelled before it started" in response.content.decode()
    fresh = Run.objects.get(id=run.id)
    assert fresh.status == RunStatus.CANCELLED
    assert fresh.finished_at is not None


def test_cancelling_a_running_run_flags_it_for_the_executor(cast, key_a):
    run = _run(cast.dev_a, key_a)
    run_claim(run_id=run.id, worker_id="test")
    response = cast.dev_a.client().post(reverse("runs:run_cancel", kwargs={"run_id": run.id}), follow=True)
    assert "Cancelling" in response.content.decode()
    fresh = Run.objects.get(id=run.id)
    assert fresh.status == RunStatus.RUNNING
    assert fresh.cancel_requested_at is not None


def test_cancelling_a_finished_run_changes_nothing(cast, key_a):
    run = _finished(_run(cast.dev_a, key_a))
    response = cast.dev_a.client().post(reverse("runs:run_cancel", kwargs={"run_id": run.id}), follow=True)
    assert "had already ended" in response.content.decode()
    fresh = Run.objects.get(id=run.id)
    assert fresh.status == RunStatus.SUCCEEDED
    assert fresh.cancel_requested_at is None
    assert UsageRecord.objects.filter(run=run).count() == 1


def test_cancel_only_accepts_post(cast, key_a):
    run = _run(cast.dev_a, key_a)
    assert cast.dev_a.client().get(reverse("runs:run_cancel", kwargs={"run_id": run.id})).status_code == 405


def test_navigation_links_to_runs_and_usage_for_developers(cast):
    content = cast.dev_a.client().get(reverse("orgs:home")).content.decode()
    assert f'href="{RUN_LIST}"' in content
    assert f'href="{reverse("runs:usage")}"' in content
