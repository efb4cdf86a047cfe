"""Reads of provider keys. Tenant reads take the org and guarantee it in the query; the few reads that span
every org (system check, rewrap) are named ``unscoped_…``."""

from __future__ import annotations

import uuid

from django.core.exceptions import ValidationError
from django.db.models import Count, Q, QuerySet

from keys.crypto import PROVIDER_KEY_AAD_VERSION
from keys.models import KeyStatus, ProviderKey
from orgs.models import Organization


def provider_keys_for_org(*, org: Organization) -> QuerySet[ProviderKey]:
    """Every key of the org, revoked ones included (they stay listed for the record), newest first."""
    return ProviderKey.objects.filter(org=org).select_related("created_by").order_by("-created_at", "-id")


def provider_key_get_for_org(*, org: Organization, key_id: uuid.UUID | str) -> ProviderKey | None:
    """The org's key with this id, or None (another org's key and a missing one look the same)."""
    try:
        return ProviderKey.objects.select_related("org", "created_by").get(org=org, id=key_id)
    except (ProviderKey.DoesNotExist, ValidationError, ValueError, TypeError):
        return None


def provider_key_get_usable_for_org(*, org: Organization, key_id: uuid.UUID | str) -> ProviderKey | None:
    """Like ``provider_key_get_for_org`` but only a key that can still be opened (not revoked)."""
    key = provider_key_get_for_org(org=org, key_id=key_id)
    return None if key is None or key.status == KeyStatus.REVOKED else key


def unscoped_provider_key_counts_by_kid() -> dict[int, int]:
    """How many live (sealed) keys each keyring kid protects, across all orgs."""
    rows = (
        ProviderKey.objects.exclude(kid__isnull=True)
        .values("kid")
        .annotate(n=Count("id"))
        .order_by("kid")
        .values_list("kid", "n")
    )
    return {int(kid): int(n) for kid, n in rows if kid is not None}


def unscoped_provider_key_ids_to_rewrap(*, primary_kid: int) -> list[uuid.UUID]:
    """Ids of live keys sealed under a kid other than the primary or with an older AAD version, in a stable order
    (resumable runs)."""
    return list(
        ProviderKey.objects.exclude(kid__isnull=True)
        .filter(~Q(kid=primary_kid) | ~Q(aad_version=PROVIDER_KEY_AAD_VERSION))
        .order_by("id")
        .values_list("id", flat=True)
    )


def unscoped_provider_key_ids_not_on_aad_version(*, aad_version: int) -> list[uuid.UUID]:
    """Ids of live keys sealed with another AAD version than ``aad_version``, in a stable order."""
    return list(
        ProviderKey.objects.exclude(kid__isnull=True)
        .exclude(aad_version=aad_version)
        .order_by("id")
        .values_list("id", flat=True)
    )


def unscoped_provider_key_count_on_old_aad() -> int:
    """How many live keys are still sealed with an older AAD version (unusable until re-sealed)."""
    return ProviderKey.objects.exclude(kid__isnull=True).exclude(aad_version=PROVIDER_KEY_AAD_VERSION).count()
