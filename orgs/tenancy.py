"""The tenant gate's core: which org a request acts in, as whom, with which capabilities.

The org always comes from the credential: an org API key belongs to exactly one org; a dashboard session
acts in the org the user picked (``SESSION_ORG_KEY``), re-checked against their memberships on every request.
Nothing in the URL, query string or body can choose the org.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.http import HttpRequest

from orgs.models import ApiKey, Membership, Organization, User
from orgs.permissions import capabilities_for_role
from orgs.selectors import membership_get_for_user, memberships_for_user

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
