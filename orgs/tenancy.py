"""The tenant gate's core: which org a request acts in, as whom, with which capabilities.

The org always comes from the credential: an org API key belongs to exactly one org; a dashboard session
acts in the org the user picked (kept in the session record), re-checked against their memberships on every
request.
Nothing in the URL, query string or body can choose the org.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.http import HttpRequest

from cesaflow.lib import request_context
from orgs.models import ApiKey, Membership, Organization, User
from orgs.permissions import capabilities_for_role
from orgs.selectors import membership_get_for_user, memberships_for_user


@dataclass(frozen=True)
class OrgContext:
    org: Organization
    actor: User | ApiKey
    capabilities: frozenset[str]
    membership: Membership | None = None

    def __post_init__(self) -> None:
        # Every request's org context is built here, whatever authenticated it: its log lines name the org.
        request_context.note(org_id=self.org.pk)

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


def context_for_user(user: User, *, org_id: str | None, fallback: bool = True) -> OrgContext | None:
    """The context of ``user`` in ``org_id`` if they are a member there; else (``fallback``) in their first org."""
    membership = membership_get_for_user(user=user, org_id=org_id) if org_id else None
    if membership is None and fallback:
        membership = memberships_for_user(user=user).first()
    return context_for_membership(membership) if membership else None


def context_for_session(request: HttpRequest) -> OrgContext | None:
    """The org context of a signed-in dashboard user (``request.cf_session``, set by the session middleware), or
    None if they belong to no org. Cached on the request."""
    from orgs.sessions.services import session_set_org

    user = request.user
    record = getattr(request, "cf_session", None)
    if not isinstance(user, User) or record is None:
        return None
    cached = getattr(request, "_cf_org_context", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    context = context_for_user(user, org_id=record.org_id or None)
    if context is not None and str(context.org.pk) != record.org_id:
        session_set_org(request, str(context.org.pk))
    request._cf_org_context = context  # type: ignore[attr-defined]
    return context


def switch_org(request: HttpRequest, org_id: str) -> bool:
    """Make ``org_id`` the session's current org if the user is a member of it."""
    from orgs.sessions.services import session_set_org

    user = request.user
    if not isinstance(user, User):
        return False
    membership = membership_get_for_user(user=user, org_id=org_id)
    if membership is None:
        return False
    session_set_org(request, str(membership.org_id))
    request._cf_org_context = context_for_membership(membership)  # type: ignore[attr-defined]
    return True
