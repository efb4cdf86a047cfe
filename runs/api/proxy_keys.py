"""The gateway's lookups of provider keys by label, answered from an in-process cache (issue #13).

An entry is keyed by the org and the label as asked for (case-folded: labels are unique per org, case-insensitively)
and holds the key row's column values, **sealed** value included — never the plaintext, which is opened per call
as before. Trust rules are ``cesaflow.lib.row_cache``'s: any save or delete of a provider key (a revocation, a
rewrap, a check that marks it invalid) replaces the authorization generation, so the next request on any server
reads the database again.
"""

from __future__ import annotations

import uuid
from typing import Final

from cesaflow.lib.hops import db_hop
from cesaflow.lib.row_cache import RowCache, generation, invalidate_on_change
from keys.models import KeyStatus, ProviderKey
from keys.selectors import provider_keys_for_org
from orgs.tenancy import OrgContext

TTL_SECONDS: Final = 30.0
MAX_ENTRIES: Final = 4096

cache = RowCache(ttl_s=TTL_SECONDS, max_entries=MAX_ENTRIES)
invalidate_on_change(ProviderKey)


def _cache_key(org_id: uuid.UUID, label: str) -> tuple[uuid.UUID, str]:
    return org_id, label.casefold()


def key_for_label(*, context: OrgContext, label: str) -> ProviderKey | None:
    """The org's live key with this label (sync, database); another org's label finds nothing, exactly like a
    missing one. Remembered for ``akey_for_label``."""
    token = generation()
    key = (
        provider_keys_for_org(org=context.org)
        .exclude(status=KeyStatus.REVOKED)
        .filter(label__iexact=label)
        .select_related("org")
        .first()
    )
    if key is not None:
        cache.remember(_cache_key(context.org.id, label), [key], token=token)
    return key


async def akey_for_label(*, context: OrgContext, label: str, token: str | None) -> ProviderKey | None:
    """``key_for_label`` without a thread hop when the row is cached for generation ``token``."""
    rows = cache.recall(_cache_key(context.org.id, label), token=token)
    if rows:
        key = rows[0]
        if isinstance(key, ProviderKey) and key.org_id == context.org.id and key.status != KeyStatus.REVOKED:
            key.org = context.org
            return key
    return await db_hop(key_for_label)(context=context, label=label)
