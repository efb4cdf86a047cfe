from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from orgs.models import User
from orgs.permissions import suspension_message
from orgs.selectors import memberships_for_user
from orgs.tenancy import context_for_session


def current_org(request: HttpRequest) -> dict[str, Any]:
    """Current org, capabilities and the org switcher's list for the dashboard chrome."""
    user = getattr(request, "user", None)
    if not isinstance(user, User):
        return {}  # anonymous, or a Nexus operator: no dashboard chrome
    context = context_for_session(request)
    return {
        "current_org": context.org if context else None,
        "caps": context.capabilities if context else frozenset(),
        "my_memberships": memberships_for_user(user=user),
        # Every page of a suspended org says so (and why): its writes are refused.
        "suspension_notice": suspension_message(context.org) if context and context.org.is_suspended else "",
    }
