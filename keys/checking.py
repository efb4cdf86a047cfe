"""Checking a provider key against its provider (issue #3 point 5), and the org's cached model lists.

A check opens the key for one call (purpose ``check``, audited as ``key.used``), asks the provider's model-list
endpoint (``keys.providers.probe_models``: no tokens billed) through the shared HTTP client under the
deployment's egress policy, and records the outcome with ``keys.services.provider_key_record_check``
(``key.checked``):

* valid / restricted / invalid set the key's status;
* unreachable (network failure, egress refused, a provider error that says nothing about the key) leaves the
  status as it was, and the audit event says so in its detail.

Every outcome is cached (``CHECK_CACHE_SECONDS``), under a cache key made of the org id and the key id, so no org
can ever read another org's: the status and, for a valid key, its model list (model ids are provider metadata,
never customer content). That cache is all that ``GET /api/v1/models`` and the new-run form read (issue #14 point
5): a live check calls a provider and writes audit rows, so only a caller with ``keys:write`` may cause one —
adding a key in the dashboard, the Check button or ``POST /api/v1/provider-keys/{id}/check``, and a ``keys:write``
caller (an Admin, an org API key with that scope) whose model listing finds a key with nothing cached. Anyone else
sees what is cached, and a key with nothing cached as "not checked yet". Negative outcomes are cached too, so even
a ``keys:write`` caller polling ``/models`` does not re-probe a broken or unreachable key on every request.

Two entry points, same behaviour: ``aprovider_key_check`` for async code (the proxy's model listing) and
``provider_key_check`` for sync views (API and dashboard). Both must be called outside ``transaction.atomic``:
opening a key commits its own audit event before the provider call.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from asgiref.sync import sync_to_async
from django.core.cache import cache
from redis.exceptions import RedisError

from cesaflow.lib import aredis
from cesaflow.lib.http import close_http_clients, get_http_client
from keys import selectors, services
from keys.crypto import Secret
from keys.egress import egress_policy
from keys.models import KeyStatus, ProviderKey
from keys.providers import ProbeResult, ProbeStatus, probe_models
from orgs.models import Actor

logger = logging.getLogger(__name__)

# How long each outcome is served from the cache. A valid or restricted key rarely changes (a key that stops working
# is marked invalid by its first failing completion, which drops the entry), so its list is kept for a day; an
# invalid one for an hour (the admin may fix the account); an unreachable provider for a few minutes, so a
# keys:write caller polling /models does not re-probe it on every request, yet a passing outage is soon forgotten.
CHECK_CACHE_SECONDS: Final = {
    ProbeStatus.VALID: 24 * 3600,
    ProbeStatus.RESTRICTED: 24 * 3600,
    ProbeStatus.INVALID: 3600,
    ProbeStatus.UNREACHABLE: 300,
}


@dataclass(frozen=True)
class CachedCheck:
    """The last check of one key, as cached: its outcome, the models of a valid key, and when (epoch seconds)."""

    status: ProbeStatus
    models: tuple[str, ...]
    checked_at: float

    def as_cache_value(self) -> dict[str, Any]:
        return {"status": self.status.value, "models": list(self.models), "checked_at": self.checked_at}

    @classmethod
    def from_cache_value(cls, value: object) -> CachedCheck | None:
        """None for anything that is not an entry written by ``remember_check`` (a missing or foreign value)."""
        if not isinstance(value, dict):
            return None
        try:
            status = ProbeStatus(str(value.get("status")))
            models = tuple(str(model) for model in value.get("models") or ())
            checked_at = float(value.get("checked_at") or 0)
        except (TypeError, ValueError):
            return None
        return cls(status=status, models=models if status is ProbeStatus.VALID else (), checked_at=checked_at)


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


def remember_check(*, key: ProviderKey, result: ProbeResult) -> CachedCheck:
    """Cache the outcome of a check of ``key`` (what /models and the new-run form will serve).

    An unreachable provider says nothing about the key: it is only cached where nothing is (``cache.add``), so a
    passing outage neither hides a known model list nor overrides a known invalid or restricted status.
    """
    entry = CachedCheck(status=result.status, models=result.models, checked_at=time.time())
    cache_key = models_cache_key(org_id=key.org_id, key_id=key.id)
    timeout = CHECK_CACHE_SECONDS[result.status]
    if result.status is ProbeStatus.UNREACHABLE:
        cache.add(cache_key, entry.as_cache_value(), timeout)
    else:
        cache.set(cache_key, entry.as_cache_value(), timeout)
    return entry


def cached_checks(*, org_id: uuid.UUID, key_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, CachedCheck]:
    """The cached check of each of the org's keys that has one (one cache round trip; never a provider call)."""
    names = {models_cache_key(org_id=org_id, key_id=key_id): key_id for key_id in key_ids}
    found = cache.get_many(list(names)) if names else {}
    return _decoded(names, found)


async def acached_checks(*, org_id: uuid.UUID, key_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, CachedCheck]:
    """``cached_checks`` without a thread hop (the gateway's ``/models``): one asyncio Redis ``MGET`` of the keys
    the cache writes. Redis unreadable: nothing is known (every key reads as not checked), never an error."""
    names = {models_cache_key(org_id=org_id, key_id=key_id): key_id for key_id in key_ids}
    if not names:
        return {}
    client = aredis.client()
    if client is None:
        return _decoded(names, cache.get_many(list(names)))  # the in-process cache of `make run`: no I/O
    try:
        raws = await client.mget([cache.make_key(name) for name in names])
    except (RedisError, OSError):
        logger.warning("cached key checks unreadable: listing no models", exc_info=True)
        return {}
    decode = cache.client.decode  # type: ignore[attr-defined]  # django-redis's own value encoding
    found = {name: decode(raw) for name, raw in zip(names, raws, strict=True) if raw is not None}
    return _decoded(names, found)


def _decoded(names: dict[str, uuid.UUID], found: dict[str, Any]) -> dict[uuid.UUID, CachedCheck]:
    checks = {names[name]: CachedCheck.from_cache_value(value) for name, value in found.items() if name in names}
    return {key_id: check for key_id, check in checks.items() if check is not None}


def _record(*, key: ProviderKey, actor: Actor, result: ProbeResult) -> None:
    """Write the outcome (one short transaction in the service) and cache it."""
    status = _STATUS_FOR.get(result.status)
    if status is None:
        # Unreachable: keep whatever the key was. Re-read it so a stale object cannot reset a newer status.
        fresh = selectors.provider_key_get_for_org(org=key.org, key_id=key.id)
        status = KeyStatus(fresh.status) if fresh is not None else KeyStatus(key.status)
    services.provider_key_record_check(key=key, actor=actor, status=status, detail=check_detail(result))
    remember_check(key=key, result=result)


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
