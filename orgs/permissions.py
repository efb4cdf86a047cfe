"""Roles grant capabilities; code checks capabilities, never role names."""

from __future__ import annotations

from orgs.models import Organization, Role

# Capability names. API key scopes use the same vocabulary.
ORG_READ = "org:read"  # see the organization itself (id, slug, name)
ORG_MANAGE = "org:manage"  # organization settings
TEAM_MANAGE = "team:manage"  # invite, change roles, remove members
MEMBERS_READ = "members:read"
API_KEYS_MANAGE = "api_keys:manage"
KEYS_WRITE = "keys:write"  # add, check, revoke provider keys
KEYS_READ = "keys:read"  # list provider keys (masked)
RUNS_WRITE = "runs:write"
RUNS_READ = "runs:read"
USAGE_READ = "usage:read"
BILLING_MANAGE = "billing:manage"
AUDIT_READ = "audit:read"
PROJECTS_MANAGE = "projects:manage"  # delete projects, connect GitHub, rotate webhook secrets

DEVELOPER_CAPABILITIES: frozenset[str] = frozenset(
    {ORG_READ, MEMBERS_READ, KEYS_READ, RUNS_WRITE, RUNS_READ, USAGE_READ}
)
ADMIN_CAPABILITIES: frozenset[str] = DEVELOPER_CAPABILITIES | {
    ORG_MANAGE,
    TEAM_MANAGE,
    API_KEYS_MANAGE,
    KEYS_WRITE,
    BILLING_MANAGE,
    AUDIT_READ,
    PROJECTS_MANAGE,
}

CAPABILITIES: dict[str, frozenset[str]] = {
    Role.ADMIN: ADMIN_CAPABILITIES,
    Role.DEVELOPER: DEVELOPER_CAPABILITIES,
}
ALL_CAPABILITIES: frozenset[str] = ADMIN_CAPABILITIES

# What a new API key may do unless the admin picks otherwise.
DEFAULT_API_KEY_SCOPES: frozenset[str] = DEVELOPER_CAPABILITIES


def capabilities_for_role(role: str) -> frozenset[str]:
    return CAPABILITIES.get(role, frozenset())


# --- Suspension ---------------------------------------------------------------------------------------------------
# A suspended organization (``Organization.suspended_at``, set by a CesaFlow operator) keeps its data readable in
# the dashboard, and nothing else: the API, the proxy and websockets refuse it, dashboard writes are refused and no
# run starts. One code everywhere.
ORG_SUSPENDED = "org_suspended"


def suspension_message(org: Organization) -> str:
    """What a member of a suspended org is told (the API's message, the dashboard's banner)."""
    reason = org.suspended_reason.strip().rstrip(".")
    return f"This organization is suspended by the CesaFlow operators{f': {reason}' if reason else ''}." + (
        " Its data can still be read in the dashboard, but nothing can be changed and no run can start."
    )
