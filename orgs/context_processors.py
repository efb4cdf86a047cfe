from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from orgs.selectors import memberships_for_user
from orgs.tenancy import context_for_session


def current_org(request: HttpRequest) -> dict[str, Any]:
    """Current org, capabilities and the org switcher's list for the dashboard chrome."""
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {}
    context = context_for_session(request)
    return {
        "current_org": context.org if context else None,
        "caps": context.capabilities if context else frozenset(),
        "my_memberships": memberships_for_user(user=request.user),
    }
