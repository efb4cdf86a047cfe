"""Reads of org data. Everything tenant-scoped takes the org and guarantees it in the query."""

from __future__ import annotations

import secrets
import uuid

from django.core.exceptions import ValidationError
from django.db.models import Count, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from orgs.models import ApiKey, Invitation, Membership, Organization, User
from orgs.tokens import api_key_digest, parse_api_key


def api_key_get_active_by_secret(*, secret: str) -> ApiKey | None:
    """The active key for a presented secret, or None for any failure (one generic outcome)."""
    prefix = parse_api_key(secret)
    if prefix is None:
        return None
    api_key = ApiKey.objects.select_related("org", "created_by").filter(prefix=prefix).first()
    if api_key is None or not secrets.compare_digest(api_key.digest, api_key_digest(secret)):
        return None
    if not api_key.is_active(timezone.now()):
        return None
    if api_key.created_by is not None and not api_key.created_by.is_active:
        return None  # the person behind the key was disabled (by an operator): their keys stop with them
    return api_key


# Both also join the user: the tenant gate reads ``membership.user`` as the actor on every request, and a lazy load
# there would cost one extra query per request.
def memberships_for_user(*, user: User) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("org", "user").order_by("org__name")


def membership_get_for_user(*, user: User, org_id: uuid.UUID | str) -> Membership | None:
    try:
        return Membership.objects.select_related("org", "user").get(user=user, org__id=org_id)
    except (Membership.DoesNotExist, ValidationError, ValueError, TypeError):
        return None


def members_for_org(*, org: Organization) -> QuerySet[Membership]:
    return Membership.objects.filter(org=org).select_related("user").order_by("user__email")


def members_for_org_with_api_key_counts(*, org: Organization) -> QuerySet[Membership]:
    """Members with ``active_api_key_count``: the org's active API keys each created (the removal dialog offers to
    revoke them). One query, whatever the number of members or keys."""
    now = timezone.now()
    active_keys = (
        ApiKey.objects.filter(org=org, created_by=OuterRef("user_id"), revoked_at=None)
        .filter(Q(expires_at=None) | Q(expires_at__gt=now))
        .order_by()
        .values("created_by")
        .annotate(n=Count("id"))
        .values("n")
    )
    return members_for_org(org=org).annotate(active_api_key_count=Coalesce(Subquery(active_keys), 0))


def membership_get_for_org(*, org: Organization, membership_id: uuid.UUID | str) -> Membership | None:
    try:
        return Membership.objects.select_related("user", "org").get(org=org, id=membership_id)
    except (Membership.DoesNotExist, ValidationError, ValueError, TypeError):
        return None


def api_keys_for_org(*, org: Organization) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(org=org).select_related("created_by").order_by("-created_at", "-id")


def api_key_get_for_org(*, org: Organization, api_key_id: uuid.UUID | str) -> ApiKey | None:
    try:
        return ApiKey.objects.select_related("org", "created_by").get(org=org, id=api_key_id)
    except (ApiKey.DoesNotExist, ValidationError, ValueError, TypeError):
        return None


def invitations_pending_for_org(*, org: Organization) -> QuerySet[Invitation]:
    return (
        Invitation.objects.filter(org=org, accepted_at=None, revoked_at=None, expires_at__gt=timezone.now())
        .select_related("invited_by")
        .order_by("-created_at")
    )


def invitation_get_for_org(*, org: Organization, invitation_id: uuid.UUID | str) -> Invitation | None:
    try:
        return Invitation.objects.select_related("org").get(org=org, id=invitation_id)
    except (Invitation.DoesNotExist, ValidationError, ValueError, TypeError):
        return None
