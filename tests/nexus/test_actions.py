"""Operator actions (``nexus.actions``), generated from the registry: every action and both roles. ``support`` is
refused and changes nothing; ``admin`` makes the change, and both trails record it (the installation's, with the
reason, and the organization's, naming "CesaFlow operator (<email>)"); a missing or oversized reason is refused
and changes nothing. A new action without a scenario below fails ``test_every_action_has_a_scenario``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Model

from keys.models import KeyStatus, Provider, ProviderKey
from keys.services import provider_key_create
from nexus.actions import ACTIONS, REASON_MAX_CHARS
from nexus.audit import ACTION
from nexus.models import InstallationEvent, Operator, OperatorRole
from orgs import login_guard, moderation
from orgs.models import ApiKey, Organization, User
from runs.models import AuditEvent, Run
from tests.keys.conftest import fake_secret

pytestmark = pytest.mark.django_db

REASON = "Ticket 4711: abuse report from the provider."
CLIENT_IP = "203.0.113.9"
LOCK_LIMIT = 3


@dataclass
class Scenario:
    """How to prepare an action's object, what it changes, and which event the org's trail gets."""

    prepare: Callable[[Any], Model]  # cast -> the object the action applies to
    state: Callable[[Model], Any]  # a snapshot of what the action changes (compared before and after)
    org_event: str
    params: dict[str, Any] = field(default_factory=dict)


def _provider_key(cast: Any) -> ProviderKey:
    return provider_key_create(
        org=cast.org_a, actor=cast.admin_a.user, provider=Provider.OPENAI, label="main", secret=fake_secret()
    )


def _suspended(cast: Any) -> Organization:
    return moderation.org_suspend(org=cast.org_a, actor="setup", reason="earlier")


def _disabled(cast: Any) -> User:
    user: User = cast.dev_a.user
    moderation.user_disable(user=user, actor="setup")
    return user


def _locked(cast: Any) -> User:
    user: User = cast.dev_a.user
    for _ in range(LOCK_LIMIT):
        login_guard.login_failure_record(email=user.email, ip=CLIENT_IP)
    assert login_guard.login_lockout(email=user.email, ip=CLIENT_IP) is not None
    return user


def _org_state(org: Model) -> Any:
    assert isinstance(org, Organization)
    org.refresh_from_db()
    return org.suspended_at, org.suspended_reason, org.monthly_token_cap


def _user_state(user: Model) -> Any:
    assert isinstance(user, User)
    return User.objects.get(pk=user.pk).is_active


def _lock_state(user: Model) -> Any:
    assert isinstance(user, User)
    return login_guard.login_lockout(email=user.email, ip=CLIENT_IP) is not None


def _key_state(key: Model) -> Any:
    return ProviderKey.objects.get(pk=key.pk).status


def _org_keys_state(org: Model) -> Any:
    assert isinstance(org, Organization)
    return sorted(ProviderKey.objects.filter(org=org).values_list("status", flat=True))


def _api_key_state(api_key: Model) -> Any:
    return ApiKey.objects.get(pk=api_key.pk).revoked_at


def _org_api_keys_state(org: Model) -> Any:
    assert isinstance(org, Organization)
    return ApiKey.objects.filter(org=org, revoked_at=None).count()


SCENARIOS: dict[str, Scenario] = {
    "org_suspend": Scenario(lambda cast: cast.org_a, _org_state, AuditEvent.ORG_SUSPENDED),
    "org_reactivate": Scenario(_suspended, _org_state, AuditEvent.ORG_REACTIVATED),
    "org_token_cap_set": Scenario(
        lambda cast: cast.org_a, _org_state, AuditEvent.ORG_SETTINGS_CHANGED, params={"cap": 50_000}
    ),
    "user_disable": Scenario(lambda cast: cast.dev_a.user, _user_state, AuditEvent.USER_DISABLED),
    "user_enable": Scenario(_disabled, _user_state, AuditEvent.USER_ENABLED),
    "account_unlock": Scenario(_locked, _lock_state, AuditEvent.LOGIN_UNLOCKED),
    "provider_key_revoke": Scenario(_provider_key, _key_state, AuditEvent.KEY_REVOKED),
    "provider_keys_disable_all": Scenario(
        lambda cast: _provider_key(cast).org, _org_keys_state, AuditEvent.KEYS_DISABLED_ALL
    ),
    "org_api_key_revoke": Scenario(lambda cast: cast.dev_a.api_key, _api_key_state, AuditEvent.API_KEY_REVOKED),
    "org_api_keys_revoke_all": Scenario(lambda cast: cast.org_a, _org_api_keys_state, AuditEvent.API_KEY_REVOKED),
}


@pytest.fixture
def operators(db) -> dict[str, Operator]:
    return {
        OperatorRole.SUPPORT: Operator.objects.create(email="support@ops.example", role=OperatorRole.SUPPORT),
        OperatorRole.ADMIN: Operator.objects.create(email="admin@ops.example", role=OperatorRole.ADMIN),
    }


@pytest.fixture(autouse=True)
def _small_lock_limit(settings):
    settings.LOGIN_FAILURE_LIMIT_ACCOUNT = LOCK_LIMIT


def _trails() -> tuple[int, int, int]:
    return AuditEvent.objects.count(), InstallationEvent.objects.count(), Run.objects.count()


def test_every_action_has_a_scenario():
    assert set(SCENARIOS) == set(ACTIONS)
    for name, spec in ACTIONS.items():
        assert spec.name == name
        assert spec.label


@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_support_operator_cannot_perform_any_action(name, cast, operators):
    spec, scenario = ACTIONS[name], SCENARIOS[name]
    obj = scenario.prepare(cast)
    before, trails = scenario.state(obj), _trails()
    with pytest.raises(PermissionDenied):
        spec.perform(operator=operators[OperatorRole.SUPPORT], obj=obj, reason=REASON, **scenario.params)
    assert scenario.state(obj) == before
    assert _trails() == trails


@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_admin_operator_acts_and_both_trails_record_it(name, cast, operators):
    spec, scenario = ACTIONS[name], SCENARIOS[name]
    operator = operators[OperatorRole.ADMIN]
    obj = scenario.prepare(cast)
    before = scenario.state(obj)
    audit_before, installation_before, runs_before = _trails()
    spec.perform(operator=operator, obj=obj, reason=REASON, **scenario.params)
    assert scenario.state(obj) != before
    installation = InstallationEvent.objects.get(event=ACTION, operator=operator)
    assert installation.metadata["action"] == name
    assert installation.reason == REASON
    assert installation.operator_label == operator.email
    assert installation.org_id == cast.org_a.id
    org_rows = AuditEvent.objects.filter(event=scenario.org_event, org=cast.org_a, actor_label=operator.label)
    assert org_rows.exists(), AuditEvent.objects.values_list("event", "actor_label")
    assert operator.label == "CesaFlow operator (admin@ops.example)"
    # Nothing is ever deleted: both trails and the runs only grow.
    audit_after, installation_after, runs_after = _trails()
    assert audit_after > audit_before
    assert installation_after == installation_before + 1
    assert runs_after == runs_before


@pytest.mark.parametrize("name", sorted(ACTIONS))
@pytest.mark.parametrize("reason", ["", "   \n", "x" * (REASON_MAX_CHARS + 1)], ids=["empty", "blank", "too_long"])
def test_an_action_without_a_proper_reason_is_refused_and_changes_nothing(name, reason, cast, operators):
    spec, scenario = ACTIONS[name], SCENARIOS[name]
    obj = scenario.prepare(cast)
    before, trails = scenario.state(obj), _trails()
    with pytest.raises(ValidationError) as raised:
        spec.perform(operator=operators[OperatorRole.ADMIN], obj=obj, reason=reason, **scenario.params)
    assert "reason" in raised.value.message_dict
    assert scenario.state(obj) == before
    assert _trails() == trails


def test_a_deactivated_or_demoted_admin_operator_cannot_act(cast, operators):
    operator = operators[OperatorRole.ADMIN]
    stale = Operator.objects.get(pk=operator.pk)  # what an open Nexus session holds
    Operator.objects.filter(pk=operator.pk).update(is_active=False)
    with pytest.raises(PermissionDenied):
        ACTIONS["org_suspend"].perform(operator=stale, obj=cast.org_a, reason=REASON)
    Operator.objects.filter(pk=operator.pk).update(is_active=True, role=OperatorRole.SUPPORT)
    with pytest.raises(PermissionDenied):
        ACTIONS["org_suspend"].perform(operator=stale, obj=cast.org_a, reason=REASON)
    cast.org_a.refresh_from_db()
    assert not cast.org_a.is_suspended


def test_a_refused_change_rolls_back_the_installation_record_too(cast, operators):
    operator = operators[OperatorRole.ADMIN]
    with pytest.raises(ValidationError):  # not suspended: nothing to reactivate
        ACTIONS["org_reactivate"].perform(operator=operator, obj=cast.org_a, reason=REASON)
    with pytest.raises(ValidationError):  # the org's own rule for caps
        ACTIONS["org_token_cap_set"].perform(operator=operator, obj=cast.org_a, reason=REASON, cap=0)
    assert not InstallationEvent.objects.exists()


def test_disabling_a_user_ends_their_sessions_and_is_recorded_in_each_of_their_orgs(cast, operators):
    operator = operators[OperatorRole.ADMIN]
    cast.org_b.memberships.create(user=cast.dev_a.user, role="developer")
    client = cast.dev_a.client()
    assert client.get("/").status_code == 200
    ACTIONS["user_disable"].perform(operator=operator, obj=cast.dev_a.user, reason=REASON)
    assert client.get("/").status_code == 302  # signed out: to the login page
    rows = AuditEvent.objects.filter(event=AuditEvent.USER_DISABLED, actor_label=operator.label)
    assert {row.org_id for row in rows} == {cast.org_a.id, cast.org_b.id}
    assert all(row.metadata["sessions_ended"] == 1 for row in rows)
    # The session layer's own "signed out everywhere" row would name nobody: user.disabled says it all.
    assert not AuditEvent.objects.filter(event=AuditEvent.SIGNED_OUT_EVERYWHERE).exists()


def test_an_unlocked_account_can_sign_in_again(cast, operators):
    user = _locked(cast)
    ACTIONS["account_unlock"].perform(operator=operators[OperatorRole.ADMIN], obj=user, reason=REASON)
    assert login_guard.login_lockout(email=user.email, ip=CLIENT_IP) is None
    row = InstallationEvent.objects.get(event=ACTION)
    assert row.metadata == {"action": "account_unlock", "email": user.email, "was_locked": True}


def test_operator_revocations_reuse_the_usual_events_with_the_operator_as_actor(cast, operators):
    operator = operators[OperatorRole.ADMIN]
    key = _provider_key(cast)
    ACTIONS["provider_key_revoke"].perform(operator=operator, obj=key, reason=REASON)
    key.refresh_from_db()
    assert key.status == KeyStatus.REVOKED
    assert key.sealed_secret == ""
    row = AuditEvent.objects.get(event=AuditEvent.KEY_REVOKED)
    assert (row.actor_label, row.actor_user_id, row.actor_api_key_id) == (operator.label, None, None)
    assert row.actor_kind == "anonymous"  # a label without a user or key: someone outside the org
    # Revoking every org API key: one row each, and none is left working.
    count = ACTIONS["org_api_keys_revoke_all"].perform(operator=operator, obj=cast.org_a, reason=REASON)
    assert count == 2
    assert AuditEvent.objects.filter(event=AuditEvent.API_KEY_REVOKED, actor_label=operator.label).count() == 2
    assert cast.admin_a.api().get("/api/v1/runs").status_code == 401
