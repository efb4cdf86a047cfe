"""What an ``admin`` operator may do to an installation's organizations and accounts, one function per action.

Each action takes the acting ``operator`` and a ``reason`` (required, at most ``REASON_MAX_CHARS``), refuses an
operator who may not act (``PermissionDenied``: ``support`` is read-only, and a demoted or deactivated operator's
open session acts no more), makes its change through the owning app's services in one transaction, and is audited
twice: the installation trail (``operator.action``, ``metadata["action"]`` naming it, with the reason) and the
organization's own trail, where the actor is "CesaFlow operator (<email>)". No action deletes an audit row or a
run's metadata; none reads or shows a secret.

``ACTIONS`` registers every action, so the admin offers them and the tests cover each one for both roles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Model
from django.utils import timezone

from keys import services as key_services
from keys.models import ProviderKey
from nexus.audit import ACTION, installation_record
from nexus.models import Operator
from orgs import moderation
from orgs import services as org_services
from orgs.models import ApiKey, Organization, User
from runs.services import runs_cancel_for_org

REASON_MAX_CHARS = 2000


def _acting(operator: Operator, reason: str) -> tuple[str, str]:
    """(the operator's label for the org's trail, the cleaned reason), or the refusal. The role is read afresh."""
    current = Operator.objects.filter(pk=operator.pk).first()
    if current is None or not current.is_active or not current.may_act:
        raise PermissionDenied("Only an active admin operator may act.")
    reason = (reason or "").strip()
    if not reason:
        raise ValidationError({"reason": "Say why: every action is recorded with its reason."})
    if len(reason) > REASON_MAX_CHARS:
        raise ValidationError({"reason": f"Keep the reason under {REASON_MAX_CHARS:,} characters."})
    return current.label, reason


def _record(
    operator: Operator, action: str, *, org: Organization | None, target: Model | None, reason: str, **facts: Any
) -> None:
    installation_record(
        event=ACTION, operator=operator, org=org, target=target, reason=reason, metadata={"action": action, **facts}
    )


# --- Organizations -------------------------------------------------------------------------------------------------


@transaction.atomic
def org_suspend(*, operator: Operator, org: Organization, reason: str) -> Organization:
    """Suspend ``org``: its API, proxy and websockets refuse it, its dashboard turns read-only with a banner giving
    ``reason``, no run starts, and its queued and running runs are cancelled."""
    label, reason = _acting(operator, reason)
    moderation.org_suspend(org=org, actor=label, reason=reason)
    cancelled = runs_cancel_for_org(org=org, actor=label)
    _record(operator, "org_suspend", org=org, target=org, reason=reason, runs_cancelled=len(cancelled))
    return org


@transaction.atomic
def org_reactivate(*, operator: Operator, org: Organization, reason: str) -> Organization:
    label, reason = _acting(operator, reason)
    moderation.org_reactivate(org=org, actor=label)
    _record(operator, "org_reactivate", org=org, target=org, reason=reason)
    return org


@transaction.atomic
def org_token_cap_set(*, operator: Operator, org: Organization, cap: int | None, reason: str) -> Organization:
    """Set the org's monthly token cap (None: no cap). Recorded in the org's trail as ``org.settings_changed``."""
    label, reason = _acting(operator, reason)
    old = org.monthly_token_cap
    org_services.org_update(org=org, actor=label, monthly_token_cap=cap)
    _record(operator, "org_token_cap_set", org=org, target=org, reason=reason, cap=[old, cap])
    return org


# --- Accounts ------------------------------------------------------------------------------------------------------


def _first_org(user: User) -> Organization | None:
    membership = user.memberships.select_related("org").order_by("created_at").first()
    return membership.org if membership is not None else None


@transaction.atomic
def user_disable(*, operator: Operator, user: User, reason: str) -> User:
    """Disable the account and end all its sessions (``user.disabled`` in each of the person's orgs)."""
    label, reason = _acting(operator, reason)
    ended = moderation.user_disable(user=user, actor=label)
    _record(operator, "user_disable", org=_first_org(user), target=user, reason=reason, sessions_ended=ended)
    return user


@transaction.atomic
def user_enable(*, operator: Operator, user: User, reason: str) -> User:
    label, reason = _acting(operator, reason)
    moderation.user_enable(user=user, actor=label)
    _record(operator, "user_enable", org=_first_org(user), target=user, reason=reason)
    return user


@transaction.atomic
def account_unlock(*, operator: Operator, email: str, reason: str) -> bool:
    """Lift the sign-in lock of the account ``email`` (True if it was locked)."""
    label, reason = _acting(operator, reason)
    was_locked = moderation.login_unlock(email=email, actor=label)
    user = User.objects.filter(email__iexact=email.strip()).first()
    org = _first_org(user) if user is not None else None
    _record(operator, "account_unlock", org=org, target=user, reason=reason, email=email, was_locked=was_locked)
    return was_locked


# --- Keys ----------------------------------------------------------------------------------------------------------


@transaction.atomic
def provider_key_revoke(*, operator: Operator, key: ProviderKey, reason: str) -> ProviderKey:
    """Revoke one provider key (its ciphertext is wiped; the row stays). ``key.revoked`` in the org's trail."""
    label, reason = _acting(operator, reason)
    key_services.provider_key_revoke(key=key, actor=label)
    _record(operator, "provider_key_revoke", org=key.org, target=key, reason=reason)
    return key


@transaction.atomic
def provider_keys_disable_all(*, operator: Operator, org: Organization, reason: str) -> int:
    """Revoke every live provider key of ``org``; ``key.disabled_all`` in the org's trail. Returns how many."""
    label, reason = _acting(operator, reason)
    count = key_services.provider_keys_disable_all(org=org, actor=label)
    _record(operator, "provider_keys_disable_all", org=org, target=org, reason=reason, revoked=count)
    return count


@transaction.atomic
def org_api_key_revoke(*, operator: Operator, api_key: ApiKey, reason: str) -> ApiKey:
    """Revoke one org API key; ``api_key.revoked`` in the org's trail, and streams opened with it close."""
    label, reason = _acting(operator, reason)
    org_services.api_key_revoke(api_key=api_key, actor=label)
    _record(operator, "org_api_key_revoke", org=api_key.org, target=api_key, reason=reason)
    return api_key


@transaction.atomic
def org_api_keys_revoke_all(*, operator: Operator, org: Organization, reason: str) -> int:
    """Revoke every unrevoked, unexpired org API key of ``org`` (one ``api_key.revoked`` each). Returns how many."""
    label, reason = _acting(operator, reason)
    live = (
        ApiKey.objects.select_for_update()
        .select_related("org")
        .filter(org=org, revoked_at=None)
        .exclude(expires_at__lte=timezone.now())
        .order_by("created_at", "id")
    )
    revoked = [org_services.api_key_revoke(api_key=api_key, actor=label) for api_key in live]
    _record(operator, "org_api_keys_revoke_all", org=org, target=org, reason=reason, revoked=len(revoked))
    return len(revoked)


# --- The registry --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionSpec:
    """One operator action: ``function(operator=…, reason=…, <target>=obj or obj.<target_field>, **params)``."""

    name: str
    label: str
    model: type[Model]  # what the action applies to (the admin offers it on that model's pages)
    function: Callable[..., Any]
    target: str  # the keyword the function takes the object as
    target_field: str | None = None  # pass this field of the object instead of the object (account_unlock: email)
    params: tuple[str, ...] = field(default=())  # further keywords the operator fills in (org_token_cap_set: cap)

    def perform(self, *, operator: Operator, obj: Model, reason: str, **params: Any) -> Any:
        unknown = set(params) - set(self.params)
        if unknown:
            raise TypeError(f"{self.name} takes no {', '.join(sorted(unknown))}")
        value = getattr(obj, self.target_field) if self.target_field else obj
        return self.function(operator=operator, reason=reason, **{self.target: value}, **params)


ACTIONS: dict[str, ActionSpec] = {
    spec.name: spec
    for spec in (
        ActionSpec("org_suspend", "Suspend the organization", Organization, org_suspend, "org"),
        ActionSpec("org_reactivate", "Reactivate the organization", Organization, org_reactivate, "org"),
        ActionSpec(
            "org_token_cap_set", "Set the monthly token cap", Organization, org_token_cap_set, "org", params=("cap",)
        ),
        ActionSpec(
            "user_disable", "Disable the account (its sessions end, its API keys stop)", User, user_disable, "user"
        ),
        ActionSpec("user_enable", "Enable the account", User, user_enable, "user"),
        ActionSpec("account_unlock", "Unlock sign-in", User, account_unlock, "email", target_field="email"),
        ActionSpec("provider_key_revoke", "Revoke the provider key", ProviderKey, provider_key_revoke, "key"),
        ActionSpec(
            "provider_keys_disable_all",
            "Disable all provider keys of the organization",
            Organization,
            provider_keys_disable_all,
            "org",
        ),
        ActionSpec("org_api_key_revoke", "Revoke the org API key", ApiKey, org_api_key_revoke, "api_key"),
        ActionSpec(
            "org_api_keys_revoke_all",
            "Revoke all org API keys of the organization",
            Organization,
            org_api_keys_revoke_all,
            "org",
        ),
    )
}
