"""Checking a provider key against its provider (issue #3 point 5), and the org's cached model lists.

A check opens the key for one call (purpose ``check``, audited as ``key.used``), asks the provider's model-list
endpoint (``keys.providers.probe_models``: no tokens billed) through the shared HTTP client under the
deployment's egress policy, and records the outcome with ``keys.services.provider_key_record_check``
(``key.checked``):

* valid / restricted / invalid set the key's status;
* unreachable (network failure, egress refused, a provider error that says nothing about the key) leaves the
  status as it was, and the audit event says so in its detail.

A valid check also caches the key's model list briefly, under a cache key made of the org id and the key id, so
``GET /api/v1/models`` does not call every provider on every request, and no org can ever read another org's
list. Model ids are provider metadata, never customer content.

Two entry points, same behaviour: ``aprovider_key_check`` for async code (the proxy's model listing) and
``provider_key_check`` for sync views (API and dashboard). Both must be called outside ``transaction.atomic``:
opening a key commits its own audit event before the provider call.
"""

from __future__ import annotations

import asyncio
import uuid

from asgiref.sync import sync_to_async
from django.core.cache import cache

from cesaflow.lib.http import close_http_clients, get_http_client
from keys import selectors, services
from keys.crypto import Secret
from keys.egress import egress_policy
from keys.models import KeyStatus, ProviderKey
from keys.providers import ProbeResult, ProbeStatus, probe_models
from orgs.models import Actor

# Long enough that a model picker or an IDE polling /models does not hit providers on every request; short
# enough that a model the provider adds (or a key that stops working) shows up within minutes.
MODELS_CACHE_SECONDS = 300

_STATUS_FOR = {
    ProbeStatus.VALID: KeyStatus.VALID,
    ProbeStatus.RESTRICTED: KeyStatus.RESTRICTED,
    ProbeStatus.INVALID: KeyStatus.INVALID,
}


def models_cache_key(*, org_id: uuid.UUID, key_id: uuid.UUID) -> str:
    """Per org and per key: a lookup can only ever name the caller's own org (the org comes from the credential)."""
    return f"keys:models:{org_id.hex}:{key_id.hex}"


def check_detail(result: ProbeResult) -> str:
    """The audit event's detail: secret-free (``probe_models`` scrubs provider text of the key)."""
    if result.status is ProbeStatus.UNREACHABLE:
        return f"unreachable, status unchanged: {result.message}"[:200]
    if result.status is ProbeStatus.VALID:
        return f"{len(result.models)} models" + (f"; {result.message}" if result.message else "")
    return result.message[:200]


async def _probe(key: ProviderKey, secret: Secret) -> ProbeResult:
    client = get_http_client(egress_policy())
    return await probe_models(key.provider, key.base_url or None, secret.reveal(), client)


def _record(*, key: ProviderKey, actor: Actor, result: ProbeResult) -> None:
    """Write the outcome (one short transaction in the service) and refresh the model-list cache."""
    status = _STATUS_FOR.get(result.status)
    if status is None:
        # Unreachable: keep whatever the key was. Re-read it so a stale object cannot reset a newer status.
        fresh = selectors.provider_key_get_for_org(org=key.org, key_id=key.id)
        status = KeyStatus(fresh.status) if fresh is not None else KeyStatus(key.status)
    services.provider_key_record_check(key=key, actor=actor, status=status, detail=check_detail(result))
    cache_key = models_cache_key(org_id=key.org_id, key_id=key.id)
    if result.status is ProbeStatus.VALID and result.models:
        cache.set(cache_key, list(result.models), MODELS_CACHE_SECONDS)
    elif result.status is not ProbeStatus.UNREACHABLE:
        cache.delete(cache_key)


async def aprovider_key_check(*, key: ProviderKey, actor: Actor) -> ProbeResult:
    """Check ``key`` now and record the outcome (``key.status`` and ``key.last_checked_at`` are updated in place).

    Raises ``ProviderKeyUnavailable`` (revoked meanwhile) or ``ProviderKeyDecryptionError`` from opening the key.
    """
    async with services.aprovider_key_open(key=key, actor=actor, purpose="check") as secret:
        result = await _probe(key, secret)
    await sync_to_async(_record)(key=key, actor=actor, result=result)
    return result


def provider_key_check(*, key: ProviderKey, actor: Actor) -> ProbeResult:
    """``aprovider_key_check`` for sync code (a sync view running in a worker thread, a management command).

    The provider call runs on a short-lived event loop of this thread, with that loop's own client from
    ``get_http_client`` (httpx clients are bound to one loop), closed when the call ends. The database work stays
    in the calling thread, so it joins the caller's connection like any other sync code.
    """
    with services.provider_key_open(key=key, actor=actor, purpose="check") as secret:
        result = asyncio.run(_probe_and_close(key, secret))
    _record(key=key, actor=actor, result=result)
    return result


async def _probe_and_close(key: ProviderKey, secret: Secret) -> ProbeResult:
    try:
        return await _probe(key, secret)
    finally:
        await close_http_clients()


async def aprovider_key_models(*, key: ProviderKey, actor: Actor) -> tuple[str, ...]:
    """The model ids ``key`` can use: from the cache, else from a fresh check (which is recorded like any check).

    Empty when the key cannot list models (restricted, invalid, unreachable).
    """
    cached = await cache.aget(models_cache_key(org_id=key.org_id, key_id=key.id))
    if isinstance(cached, list):
        return tuple(str(model) for model in cached)
    result = await aprovider_key_check(key=key, actor=actor)
    return result.models if result.status is ProbeStatus.VALID else ()
