"""What operators see and do in Nexus (issue #12 points 3-5): every registered list, detail page and CSV export is
crawled for secrets; nothing can be added, changed or deleted; every registered operator action is offered to
admin operators only, asks for a reason, acts, and is recorded in both trails."""

from __future__ import annotations

import re
import secrets
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from keys.models import ProviderKey
from keys.services import provider_key_create
from nexus.actions import ACTIONS
from nexus.admin import REGISTRY
from nexus.models import InstallationEvent, OperatorRole
from orgs.models import ApiKey, Organization, User
from orgs.services import api_key_create
from runs.models import AuditEvent, Run
from runs.services import run_create
from tests.nexus.conftest import EnrolledOperator, make_operator, nexus_sign_in, nexus_url

pytestmark = pytest.mark.django_db


def _url(model: Any, view: str, *args: Any) -> str:
    return reverse(f"nexus:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def _client(enrolled: EnrolledOperator) -> Client:
    client = Client()
    nexus_sign_in(client, enrolled.operator)
    return client


@pytest.fixture
def world(cast, operator) -> dict[str, str]:
    """An installation holding secrets: a sealed provider key, an org API key, a run with an objective, and an
    operator's sealed TOTP secret. Returns every value that must never appear in Nexus."""
    canary = f"sk-canary-{secrets.token_urlsafe(24)}"
    key = provider_key_create(org=cast.org_a, actor=cast.admin_a.user, provider="openai", label="canary", secret=canary)
    _, api_secret = api_key_create(org=cast.org_a, name="canary key", actor=cast.admin_a.user)
    objective = f"objective-canary-{secrets.token_hex(8)}"
    run_create(org=cast.org_a, actor=cast.admin_a.user, provider_key_id=key.id, model="fake/echo", objective=objective)
    stored = ProviderKey.objects.get(pk=key.pk)
    return {
        "provider key": canary,
        "sealed provider key": stored.sealed_secret,
        "org API key": api_secret,
        "API key digest": ApiKey.objects.get(name="canary key").digest,
        "cast API key": cast.admin_a.api_secret,
        "run objective": objective,
        "operator TOTP (sealed)": operator.operator.totp_sealed,
        "operator TOTP secret": operator.secret,
        "password hash": cast.admin_a.user.password,
    }


def _pages(client: Client) -> list[tuple[str, bytes]]:
    """Every page an operator can open: home, each list (with its filters' first choices), each object's page, and
    each list's CSV export of all rows."""
    pages = [(nexus_url(), client.get(nexus_url()).content)]
    for model, _ in REGISTRY:
        listing = client.get(_url(model, "changelist"))
        assert listing.status_code == 200, model
        pages.append((_url(model, "changelist"), listing.content))
        ids = [str(pk) for pk in model._default_manager.values_list("pk", flat=True)]
        for pk in ids:
            detail = client.get(_url(model, "change", pk))
            assert detail.status_code == 200, (model, pk)
            pages.append((_url(model, "change", pk), detail.content))
        if not ids:
            continue  # nothing to select, nothing to export
        export = client.post(_url(model, "changelist"), {"action": "export_csv", "_selected_action": ids, "index": "0"})
        assert export.status_code == 200, model
        body = b"".join(export.streaming_content) if export.streaming else export.content  # type: ignore[attr-defined]
        assert body.count(b"\n") >= len(ids)
        pages.append((f"{_url(model, 'changelist')} (CSV)", body))
    return pages


def test_no_nexus_page_or_export_shows_a_secret_or_user_content(world, admin_operator):
    pages = _pages(_client(admin_operator))
    assert len(pages) > 20
    for name, value in world.items():
        assert value
        for path, content in pages:
            assert value.encode() not in content, f"{name} appears on {path}"


def test_the_lists_show_what_operators_need(world, cast, operator):
    client = _client(operator)
    orgs = client.get(_url(Organization, "changelist")).content.decode()
    assert "org-a" in orgs
    assert "org-b" in orgs
    keys = client.get(_url(ProviderKey, "changelist")).content.decode()
    assert "canary" in keys
    assert world["provider key"][-4:] in keys  # the last four, as on the dashboard
    users = client.get(_url(User, "changelist") + "?q=alice").content.decode()
    assert "alice@a.example" in users
    assert "bob@b.example" not in users  # search works
    home = client.get(nexus_url()).content.decode()
    assert "Health" in home
    assert re.search(r'data-service="database">ok<', home)


@pytest.mark.parametrize("role", [OperatorRole.SUPPORT, OperatorRole.ADMIN])
def test_nothing_can_be_added_changed_or_deleted(cast, role):
    client = _client(make_operator(f"{role}@ops.example", role=role))
    for model, _ in REGISTRY:
        assert client.get(_url(model, "add")).status_code == 403, model
        obj = model._default_manager.first()
        if obj is not None:
            assert client.post(_url(model, "change", obj.pk), {}).status_code == 403, model
            assert client.get(_url(model, "delete", obj.pk)).status_code == 403, model


def _target(spec_model: Any, cast) -> Any:
    if spec_model is Organization:
        return cast.org_a
    if spec_model is User:
        return cast.dev_a.user
    if spec_model is ApiKey:
        return cast.dev_a.api_key
    if spec_model is ProviderKey:
        return provider_key_create(
            org=cast.org_a, actor=cast.admin_a.user, provider="openai", label="to revoke", secret="sk-x" * 8
        )
    raise AssertionError(f"no target for {spec_model}")


def _post_action(client: Client, name: str, obj: Any, **fields: str) -> Any:
    spec = ACTIONS[name]
    data = {"action": name, "_selected_action": [str(obj.pk)], "index": "0", **fields}
    return client.post(_url(spec.model, "changelist"), data)


@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_support_operators_are_not_offered_any_action_and_change_nothing(cast, name):
    client = _client(make_operator("support@ops.example", role=OperatorRole.SUPPORT))
    obj = _target(ACTIONS[name].model, cast)
    listing = client.get(_url(ACTIONS[name].model, "changelist")).content.decode()
    assert f'value="{name}"' not in listing
    before = AuditEvent.objects.count(), InstallationEvent.objects.filter(event="operator.action").count()
    response = _post_action(client, name, obj, confirm="yes", reason="because", cap="5")
    assert response.status_code in {200, 302}
    after = AuditEvent.objects.count(), InstallationEvent.objects.filter(event="operator.action").count()
    assert after == before


@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_admin_operators_act_with_a_reason_and_both_trails_record_it(cast, name, admin_operator):
    client = _client(admin_operator)
    spec = ACTIONS[name]
    obj = _target(spec.model, cast)
    if name == "org_reactivate":
        _post_action(client, "org_suspend", obj, confirm="yes", reason="first suspend it")
    if name == "user_enable":
        _post_action(client, "user_disable", obj, confirm="yes", reason="first disable it")
    listing = client.get(_url(spec.model, "changelist")).content.decode()
    assert f'value="{name}"' in listing
    # Choosing the action shows the confirmation page; nothing happens yet.
    before = InstallationEvent.objects.filter(event="operator.action").count()
    confirm = _post_action(client, name, obj)
    assert confirm.status_code == 200
    assert b'name="reason"' in confirm.content
    # Confirming without a reason is refused on the page.
    blank = _post_action(client, name, obj, confirm="yes", reason="  ")
    assert b"A reason is required" in blank.content
    assert InstallationEvent.objects.filter(event="operator.action").count() == before
    done = _post_action(client, name, obj, confirm="yes", reason=f"ticket 42 for {name}", cap="1000")
    assert done.status_code == 302, done.content[:500]
    row = InstallationEvent.objects.filter(event="operator.action").latest("at")
    assert row.metadata["action"] == name
    assert row.reason == f"ticket 42 for {name}"
    assert row.operator == admin_operator.operator
    org_rows = AuditEvent.objects.filter(actor_label=admin_operator.operator.label)
    assert org_rows.exists() or name == "account_unlock"  # an unlock belongs to no org when the user has none
    if name == "account_unlock":
        assert AuditEvent.objects.filter(event="auth.unlocked").exists()


def test_suspending_from_nexus_refuses_the_orgs_api_and_cancels_its_runs(cast, admin_operator):
    key = provider_key_create(org=cast.org_a, actor=cast.admin_a.user, provider="openai", label="k", secret="sk-" * 10)
    run = run_create(
        org=cast.org_a, actor=cast.admin_a.user, provider_key_id=key.id, model="fake/echo", objective="Wait."
    )
    client = _client(admin_operator)
    _post_action(client, "org_suspend", cast.org_a, confirm="yes", reason="abuse report 7")
    response = cast.admin_a.api().get("/api/v1/org")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "org_suspended"
    assert Run.objects.get(pk=run.pk).status == "cancelled"
    assert cast.admin_b.api().get("/api/v1/org").status_code == 200
    _post_action(client, "org_reactivate", cast.org_a, confirm="yes", reason="resolved")
    assert cast.admin_a.api().get("/api/v1/org").status_code == 200


def test_organizations_show_this_months_runs_and_tokens_once_each(cast, operator):
    from runs.services import UsageEntry, run_usage_add

    key = provider_key_create(org=cast.org_a, actor=cast.admin_a.user, provider="openai", label="k", secret="sk-" * 10)
    for _ in range(2):
        run = run_create(org=cast.org_a, actor=cast.admin_a.user, provider_key_id=key.id, model="m", objective="x")
        run_usage_add(
            run_id=run.id,
            entry=UsageEntry(provider="openai", model="m", input_tokens=100, output_tokens=23, complete=True),
        )
    page = _client(operator).get(_url(Organization, "changelist") + "?q=org-a").content.decode()
    (row,) = [chunk for chunk in page.split("<tr")[1:] if ">org-a<" in chunk]
    # The name is the row's <th>; the other columns are <td>s after the action checkbox.
    cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    assert cells[1] == "org-a"
    # members 2, runs 2, tokens 2 x 123 (a join over members would have doubled them)
    assert [cells[3], cells[5], cells[6]] == ["2", "2", "246"], cells


@pytest.mark.parametrize(
    ("model", "lookup"),
    [
        (User, "password__regex=^bcrypt"),
        (User, "password__startswith=b"),
        (ProviderKey, "sealed_secret__startswith=cf1"),
        (ApiKey, "digest__startswith=a"),
        (Run, "objective__icontains=canary"),
        (Organization, "suspended_reason__icontains=x"),
    ],
)
def test_filters_the_page_does_not_offer_are_refused(world, operator, model, lookup):
    """Django admin accepts any lookup on a model's own fields unless told otherwise: the row count would answer
    yes-or-no questions about a secret, one character at a time."""
    response = _client(operator).get(f"{_url(model, 'changelist')}?{lookup}")
    assert response.status_code == 400


def test_offered_filters_and_the_date_hierarchy_still_work(world, cast, operator):
    client = _client(operator)
    assert client.get(f"{_url(Run, 'changelist')}?status__exact=queued").status_code == 200
    assert client.get(f"{_url(Run, 'changelist')}?org__id__exact={cast.org_a.id}").status_code == 200
    assert client.get(f"{_url(AuditEvent, 'changelist')}?created_at__year=2026").status_code == 200
    assert client.get(f"{_url(Organization, 'changelist')}?suspended_at__isempty=1").status_code == 200


def test_a_disabled_persons_api_keys_stop_and_start_with_the_account(cast, admin_operator):
    client = _client(admin_operator)
    _post_action(client, "user_disable", cast.dev_a.user, confirm="yes", reason="compromised laptop")
    assert cast.dev_a.api().get("/api/v1/org").status_code == 401
    _post_action(client, "user_enable", cast.dev_a.user, confirm="yes", reason="new laptop")
    assert cast.dev_a.api().get("/api/v1/org").status_code == 200


def test_select_across_is_kept_through_the_confirmation(cast, admin_operator):
    confirm = _client(admin_operator).post(
        _url(Organization, "changelist"),
        {"action": "org_suspend", "_selected_action": [str(cast.org_a.pk)], "index": "0", "select_across": "1"},
    )
    assert b'name="select_across" value="1"' in confirm.content
