"""The tenant gate's core: which org a request acts in, as whom, with which capabilities.

The org always comes from the credential: an org API key belongs to exactly one org; a dashboard session
acts in the org the user picked (``SESSION_ORG_KEY``), re-checked against their memberships on every request.
Nothing in the URL, query string or body can choose the org.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest

from orgs.models import ApiKey, Membership, Organization, User
from orgs.permissions import capabilities_for_role
from orgs.selectors import api_key_get_active_by_secret, membership_get_for_user, memberships_for_user
from orgs.tokens import MAX_KEY_LENGTH

SESSION_ORG_KEY = "cf_org_id"


@dataclass(frozen=True)
class OrgContext:
    org: Organization
    actor: User | ApiKey
    capabilities: frozenset[str]
    membership: Membership | None = None

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    @property
    def user(self) -> User | None:
        return self.actor if isinstance(self.actor, User) else None


def context_for_api_key(api_key: ApiKey) -> OrgContext:
    return OrgContext(org=api_key.org, actor=api_key, capabilities=frozenset(api_key.scopes))


def context_for_membership(membership: Membership) -> OrgContext:
    return OrgContext(
        org=membership.org,
        actor=membership.user,
        capabilities=capabilities_for_role(membership.role),
        membership=membership,
    )


def context_for_session(request: HttpRequest) -> OrgContext | None:
    """The org context of a logged-in dashboard user, or None if they belong to no org."""
    user = request.user
    if not isinstance(user, User) or not user.is_authenticated:
        return None
    cached = getattr(request, "_cf_org_context", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    membership = None
    org_id = request.session.get(SESSION_ORG_KEY)
    if org_id:
        membership = membership_get_for_user(user=user, org_id=org_id)
    if membership is None:
        membership = memberships_for_user(user=user).first()
        if membership is not None:
            request.session[SESSION_ORG_KEY] = str(membership.org_id)
    context = context_for_membership(membership) if membership else None
    request._cf_org_context = context  # type: ignore[attr-defined]
    return context


def switch_org(request: HttpRequest, org_id: str) -> bool:
    """Make ``org_id`` the session's current org if the user is a member of it."""
    user = request.user
    if not isinstance(user, User):
        return False
    membership = membership_get_for_user(user=user, org_id=org_id)
    if membership is None:
        return False
    request.session[SESSION_ORG_KEY] = str(membership.org_id)
    request._cf_org_context = context_for_membership(membership)  # type: ignore[attr-defined]
    return True


def context_for_scope(scope: Mapping[str, Any]) -> OrgContext | None:
    """The org context of a websocket connection (Channels scope), or None: no credentials, a bad API key, or a
    user in no org. Sync ORM: call it through ``database_sync_to_async``.

    An org API key in the handshake's ``x-api-key`` or ``Authorization: Bearer`` header (IDEs and CLIs) wins over
    the session; a key that is presented but invalid is a failure, never a fallback to the session. Otherwise the
    session's user (Channels' ``AuthMiddlewareStack``) in the session's current org. Never a query-string token:
    URLs end up in logs.
    """
    from orgs.authentication import presented_api_key  # imports DRF; keep it out of this module's import time
    from orgs.services import api_key_record_use

    headers: dict[str, str] = {}
    for name, value in scope.get("headers") or ():
        headers.setdefault(bytes(name).decode("latin-1").lower(), bytes(value).decode("latin-1"))
    presented = presented_api_key(headers)
    if presented is not None:
        if not presented or len(presented) > MAX_KEY_LENGTH:
            return None
        api_key = api_key_get_active_by_secret(secret=presented)
        if api_key is None:
            return None
        api_key_record_use(api_key=api_key)
        return context_for_api_key(api_key)
    user = scope.get("user")
    user = getattr(user, "_wrapped", user)  # Channels' UserLazyObject, resolved by AuthMiddlewareStack
    if not isinstance(user, User) or not user.is_authenticated or not user.is_active:
        return None
    membership = None
    session = scope.get("session")
    org_id = session.get(SESSION_ORG_KEY) if session is not None else None
    if org_id:
        membership = membership_get_for_user(user=user, org_id=org_id)
    if membership is None:
        membership = memberships_for_user(user=user).first()
    return context_for_membership(membership) if membership else None
