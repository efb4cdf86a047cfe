"""Writes for provider keys, and the one way to open a key for a provider call.

Every function is keyword-only and sends the domain signal the audit trail records (``keys.signals`` →
``runs.audit``) in the same transaction as the change. The keyring is ``settings.KEYRING``, read at call time so
a deployment (or a test) that changes it is honoured without a re-import.

The plaintext of a key exists only: in the request that adds it (sealed here before the INSERT), and inside
``provider_key_open`` for one provider call. Functions that hold it are marked ``sensitive_variables`` so
Django's error reports never show it; the names cover the crypto frames below them too.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from cesaflow.lib import request_context
from keys import selectors, signals, urlguard
from keys.crypto import (
    PROVIDER_KEY_AAD_VERSION,
    DecryptionError,
    Keyring,
    Secret,
    provider_key_aad,
    provider_key_aad_v1,
    reseal,
    seal,
    stored_kid,
)
from keys.crypto import open_sealed as crypto_open_sealed
from keys.models import KeyStatus, Provider, ProviderKey
from keys.providers import provider_destination
from orgs.models import Actor, Organization, User, actor_label

logger = logging.getLogger(__name__)


LABEL_MAX_LENGTH = 100
SECRET_MAX_LENGTH = 4096
# Provider keys go into an HTTP header: printable ASCII, no spaces, nothing that could split a header.
_SECRET_RE = re.compile(r"[\x21-\x7e]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Shorter secrets (a local gateway's token) keep their last four to themselves: four of eight characters is
# half the secret.
_LAST_FOUR_MIN_LENGTH = 12
_SENSITIVE = ("secret", "plaintext", "text", "data", "wrapped", "value", "opened")

# Check outcomes a provider call can set (``revoked`` only comes from revoking).
CHECK_STATUSES = frozenset({KeyStatus.UNCHECKED, KeyStatus.VALID, KeyStatus.RESTRICTED, KeyStatus.INVALID})


class ProviderKeyUnavailable(Exception):
    """The key is revoked or gone: there is nothing to open."""

    def __init__(self) -> None:
        super().__init__("This provider key has been revoked or no longer exists.")


class ProviderKeyDecryptionError(Exception):
    """The stored key could not be decrypted (generic on purpose; the audit trail has the event)."""

    def __init__(self) -> None:
        super().__init__("This provider key could not be decrypted. An admin must add it again.")


def _keyring() -> Keyring:
    keyring: Keyring = settings.KEYRING
    return keyring


def _destination(key: ProviderKey) -> str:
    return provider_destination(key.provider, key.base_url)


def _aad(key: ProviderKey, version: int = PROVIDER_KEY_AAD_VERSION) -> bytes:
    """The associated data ``key`` is bound to under AAD ``version`` (the current one unless re-sealing).
    An unknown version raises ``DecryptionError``: there is nothing it could open."""
    if version == PROVIDER_KEY_AAD_VERSION:
        return provider_key_aad(org_id=key.org_id, key_id=key.id, provider=key.provider, destination=_destination(key))
    if version == 1:
        return provider_key_aad_v1(org_id=key.org_id, key_id=key.id, provider=key.provider)
    raise DecryptionError


# --- Validation ---------------------------------------------------------------------------------------------


def _clean_label(label: str) -> str:
    label = (label or "").strip()
    if not label:
        raise ValidationError("Give the key a label.", code="required")
    if len(label) > LABEL_MAX_LENGTH:
        raise ValidationError(f"Use at most {LABEL_MAX_LENGTH} characters.", code="max_length")
    if "/" in label:
        raise ValidationError("A label cannot contain '/'.", code="invalid")
    if _CONTROL_RE.search(label):
        raise ValidationError("A label cannot contain control characters.", code="invalid")
    return label


@sensitive_variables(*_SENSITIVE)
def _clean_secret(secret: str) -> str:
    # Messages never quote the value: validation errors end up in API responses and form re-renders.
    secret = (secret or "").strip()
    if not secret:
        raise ValidationError("Paste the key.", code="required")
    if len(secret) > SECRET_MAX_LENGTH:
        raise ValidationError(f"A key is at most {SECRET_MAX_LENGTH} characters.", code="max_length")
    if not _SECRET_RE.fullmatch(secret):
        raise ValidationError("A key is printable ASCII without spaces.", code="invalid")
    return secret


def clean_base_url(*, provider: str, base_url: str | None) -> str:
    """The normalized base URL to store ('' = the provider's official API). Raises ValidationError."""
    base_url = (base_url or "").strip()
    if not base_url:
        if provider == Provider.OPENAI_COMPATIBLE:
            raise ValidationError("An OpenAI-compatible provider needs a base URL.", code="required")
        return ""
    try:
        return urlguard.validate_base_url(
            base_url,
            production=settings.PRODUCTION,
            allowlist=urlguard.parse_allowlist(settings.PROVIDER_HOST_ALLOWLIST),
        )
    except urlguard.UrlRejected as exc:
        raise ValidationError(str(exc), code="invalid") from None


# --- Create, check, revoke ----------------------------------------------------------------------------------


@transaction.atomic
@sensitive_variables(*_SENSITIVE)
def provider_key_create(
    *,
    org: Organization,
    actor: Actor,
    provider: str,
    label: str,
    secret: str | Secret,
    base_url: str | None = None,
) -> ProviderKey:
    """Seal ``secret`` and store it as a new key of ``org``, in ONE INSERT (the plaintext never reaches SQL).

    The row id is generated here, before sealing, because the ciphertext is bound to it (AAD). Raises
    ``ValidationError`` keyed by field name (``provider``, ``label``, ``secret``, ``base_url``).
    """
    errors: dict[str, list[ValidationError]] = {}
    if provider not in Provider.values:
        errors.setdefault("provider", []).append(ValidationError("Pick a supported provider.", code="invalid_choice"))
    try:
        label = _clean_label(label)
    except ValidationError as exc:
        errors.setdefault("label", []).append(exc)
    else:
        taken = ProviderKey.objects.filter(org=org, label__iexact=label).exclude(status=KeyStatus.REVOKED)
        if taken.exists():
            errors.setdefault("label", []).append(ValidationError("A key with this label exists.", code="unique"))
    try:
        text = _clean_secret(secret.reveal() if isinstance(secret, Secret) else secret)
    except ValidationError as exc:
        errors.setdefault("secret", []).append(exc)
        text = ""
    if "provider" not in errors:
        try:
            base_url = clean_base_url(provider=provider, base_url=base_url)
        except ValidationError as exc:
            errors.setdefault("base_url", []).append(exc)
    if errors:
        raise ValidationError(errors)

    keyring = _keyring()
    key = ProviderKey(
        id=uuid.uuid4(),
        org=org,
        provider=provider,
        label=label,
        base_url=base_url or "",
        kid=keyring.primary_kid,
        last_four=text[-4:] if len(text) >= _LAST_FOUR_MIN_LENGTH else "",
        created_by=actor if isinstance(actor, User) else None,
        created_by_label=actor_label(actor)[:254],
    )
    key.sealed_secret = seal(keyring, text, _aad(key))
    try:
        with transaction.atomic():
            key.save(force_insert=True)
    except IntegrityError:
        # Lost a race with a concurrent create of the same label.
        raise ValidationError({"label": ["A key with this label exists."]}) from None
    signals.provider_key_created.send(sender=ProviderKey, org=org, actor=actor, provider_key=key)
    return key


@transaction.atomic
def provider_key_record_check(*, key: ProviderKey, actor: Actor, status: str, detail: str = "") -> ProviderKey:
    """Record the outcome of checking a key against its provider (the check itself lives in the HTTP layer).

    ``detail`` is a short, secret-free note for the audit trail (e.g. "network error: status unchanged").
    """
    if status not in CHECK_STATUSES:
        raise ValueError(f"not a check outcome: {status!r}")
    locked = ProviderKey.objects.select_for_update().get(pk=key.pk)
    if locked.status == KeyStatus.REVOKED:
        raise ProviderKeyUnavailable
    old_status = locked.status
    locked.status = status
    locked.last_checked_at = timezone.now()
    locked.save(update_fields=["status", "last_checked_at"])
    key.status, key.last_checked_at = locked.status, locked.last_checked_at
    signals.provider_key_checked.send(
        sender=ProviderKey, org=locked.org, actor=actor, provider_key=locked, old_status=old_status, detail=detail
    )
    return key


def _wipe(key: ProviderKey, now: Any) -> None:
    key.status = KeyStatus.REVOKED
    key.sealed_secret = ""
    key.kid = None
    key.revoked_at = now


@transaction.atomic
def provider_key_revoke(*, key: ProviderKey, actor: Actor) -> ProviderKey:
    """Revoke a key: the ciphertext is wiped, the row stays for the audit trail and usage history.

    Revoking a revoked key changes nothing and records nothing.
    """
    locked = ProviderKey.objects.select_for_update().select_related("org").get(pk=key.pk)
    if locked.status != KeyStatus.REVOKED:
        _wipe(locked, timezone.now())
        locked.save(update_fields=["status", "sealed_secret", "kid", "revoked_at"])
        signals.provider_key_revoked.send(sender=ProviderKey, org=locked.org, actor=actor, provider_key=locked)
    for name in ("status", "sealed_secret", "kid", "revoked_at"):
        setattr(key, name, getattr(locked, name))
    return key


@transaction.atomic
def provider_keys_disable_all(*, org: Organization, actor: Actor) -> int:
    """Revoke every live key of ``org`` at once (a suspected leak). One audit event; returns how many."""
    keys = list(ProviderKey.objects.select_for_update().filter(org=org).exclude(status=KeyStatus.REVOKED))
    now = timezone.now()
    for key in keys:
        _wipe(key, now)
    ProviderKey.objects.bulk_update(keys, ["status", "sealed_secret", "kid", "revoked_at"])
    signals.provider_keys_disabled_all.send(sender=ProviderKey, org=org, actor=actor, provider_keys=keys)
    return len(keys)


# --- Opening a key for one provider call --------------------------------------------------------------------


def _record_decrypt_failure(
    *, key: ProviderKey, actor: Actor, exc: DecryptionError, purpose: str, reference: str
) -> None:
    try:
        kid: int | None = stored_kid(key.sealed_secret)
    except DecryptionError:
        kid = None
    # Metadata only: which row, which kid, whether the kid is retired. Never the stored value.
    logger.warning(
        "provider key %s could not be decrypted (kid=%s, retired_kid=%s, purpose=%s)",
        key.id,
        kid,
        exc.retired_kid,
        purpose,
    )
    signals.provider_key_decrypt_failed.send(
        sender=ProviderKey,
        org=key.org,
        actor=actor,
        provider_key=key,
        kid=kid,
        retired_kid=exc.retired_kid,
        purpose=purpose,
        reference=reference,
    )


# ``last_used_at`` moves at most this often (like org API keys): it says "in use lately", not each call.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# When this process last moved each key's ``last_used_at``. The gateway's key rows come from a cache whose copy of
# the column is as old as the entry: without this, every call after the first minute would send a conditional
# UPDATE that changes nothing (issue #13). The UPDATE's own condition still holds the rule across processes.
_LAST_USED_MOVED: dict[uuid.UUID, datetime] = {}
_LAST_USED_MOVED_MAX = 10_000


@sensitive_variables(*_SENSITIVE)
def provider_key_unseal(*, key: ProviderKey) -> Secret:
    """The plaintext of a key row the caller holds, opened in memory with no database access (the gateway: rows
    from its generation-checked cache, ``runs.api.proxy_keys``). The caller records the use
    (``provider_key_record_use``) or the failure (``provider_key_record_decrypt_failure``). Raises
    ``ProviderKeyUnavailable`` (revoked or wiped) or ``ProviderKeyDecryptionError``."""
    if key.status == KeyStatus.REVOKED or not key.sealed_secret:
        raise ProviderKeyUnavailable
    try:
        return Secret(crypto_open_sealed(_keyring(), key.sealed_secret, _aad(key)))
    except DecryptionError:
        raise ProviderKeyDecryptionError from None


def provider_key_record_use(*, key: ProviderKey, actor: Actor, purpose: str, reference: str = "") -> None:
    """Record one opening of ``key``: the ``key.used`` audit row (purpose and run/request id, never the secret) and
    ``last_used_at`` (at most once a minute per key: it says "in use lately"; the audit row is the per-call record)."""
    reference = reference or request_context.current().request_id
    now = timezone.now()
    moved = _LAST_USED_MOVED.get(key.pk)
    if moved is not None and (key.last_used_at is None or moved > key.last_used_at):
        key.last_used_at = moved
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        ProviderKey.objects.filter(pk=key.pk).exclude(last_used_at__gt=now - LAST_USED_RESOLUTION).update(
            last_used_at=now
        )
        key.last_used_at = now
        if len(_LAST_USED_MOVED) >= _LAST_USED_MOVED_MAX:
            _LAST_USED_MOVED.clear()
        _LAST_USED_MOVED[key.pk] = now
    signals.provider_key_used.send(
        sender=ProviderKey, org=key.org, actor=actor, provider_key=key, purpose=purpose, reference=reference
    )


@sensitive_variables(*_SENSITIVE)
def provider_key_record_opening(*, key: ProviderKey, actor: Actor, purpose: str, reference: str) -> bool:
    """For a caller that will open ``key`` in memory (``provider_key_unseal``) for one call, from the row it read in
    its own transaction: check now that the value opens (the plaintext is dropped at once) and record the opening
    in that transaction, as ``provider_key_open`` does: ``key.used``, or ``key.decrypt_failed``. True if it opens;
    False (and nothing recorded) for a revoked or wiped key. The claims of chat runs (``runs.services.claiming``):
    the executor then calls the provider without a database hop of its own (issue #13)."""
    try:
        provider_key_unseal(key=key).drop()
    except ProviderKeyUnavailable:
        return False
    except ProviderKeyDecryptionError:
        provider_key_record_decrypt_failure(key=key, actor=actor, purpose=purpose, reference=reference)
        return False
    provider_key_record_use(key=key, actor=actor, purpose=purpose, reference=reference)
    return True


def provider_key_record_decrypt_failure(*, key: ProviderKey, actor: Actor, purpose: str, reference: str = "") -> None:
    """Audit ``key.decrypt_failed`` for a value ``provider_key_unseal`` could not open (metadata only)."""
    try:
        crypto_open_sealed(_keyring(), key.sealed_secret, _aad(key))
    except DecryptionError as exc:
        _record_decrypt_failure(
            key=key,
            actor=actor,
            exc=exc,
            purpose=purpose,
            reference=reference or request_context.current().request_id,
        )


@sensitive_variables(*_SENSITIVE)
def _open_for_call(*, key_id: uuid.UUID, destination: str, actor: Actor, purpose: str, reference: str) -> Secret:
    """Decrypt one key for a call to ``destination`` and record the opening (or the failure) in its own short
    transaction."""
    reference = reference or request_context.current().request_id
    failure: DecryptionError | None = None
    with transaction.atomic():
        # Re-read the row: the caller's object may predate a revoke or a rewrap.
        key = ProviderKey.objects.select_related("org").filter(pk=key_id).first()
        if key is None or key.status == KeyStatus.REVOKED or not key.sealed_secret:
            raise ProviderKeyUnavailable
        try:
            # The caller sends the key where its own copy of the row says. The ciphertext vouches for the row read
            # here: a caller's copy that says otherwise (stale, or altered under it) gets nothing.
            if destination != _destination(key):
                raise DecryptionError
            opened = Secret(crypto_open_sealed(_keyring(), key.sealed_secret, _aad(key)))
        except DecryptionError as exc:
            failure = exc
            _record_decrypt_failure(key=key, actor=actor, exc=exc, purpose=purpose, reference=reference)
        else:
            provider_key_record_use(key=key, actor=actor, purpose=purpose, reference=reference)
    if failure is not None:
        # Raised after the block so the decrypt_failed event is committed, not rolled back with the error.
        # No fallback of any kind: the provider call does not happen.
        raise ProviderKeyDecryptionError from None
    return opened


@contextmanager
def provider_key_open(*, key: ProviderKey, actor: Actor = None, purpose: str, reference: str = "") -> Iterator[Secret]:
    """Open ``key`` for exactly one provider call::

        with provider_key_open(key=key, actor=run.created_by, purpose="run", reference=str(run.id)) as secret:
            headers = {"Authorization": f"Bearer {secret.reveal()}"}
            ...

    The key opens only for its sealed destination: ``key.provider`` and ``key.base_url`` (where the caller will
    send it) must be those the ciphertext is bound to, and so must the stored row's.

    Records ``key.used`` (purpose and run/request id, never the secret) and updates ``last_used_at`` in a
    short transaction of its own, committed before the call starts: call it outside ``transaction.atomic`` so
    a long provider call holds no transaction open. The secret is dropped when the block ends; revealing it
    afterwards raises. Raises ``ProviderKeyUnavailable`` (revoked or gone) or ``ProviderKeyDecryptionError``
    (audited as ``key.decrypt_failed``).
    """
    secret = _open_for_call(
        key_id=key.pk, destination=_destination(key), actor=actor, purpose=purpose, reference=reference
    )
    try:
        yield secret
    finally:
        secret.drop()


@asynccontextmanager
async def aprovider_key_open(
    *, key: ProviderKey, actor: Actor = None, purpose: str, reference: str = ""
) -> AsyncIterator[Secret]:
    """``provider_key_open`` for async code (the inline executor, SSE and websocket paths)."""
    secret = await sync_to_async(_open_for_call)(
        key_id=key.pk, destination=_destination(key), actor=actor, purpose=purpose, reference=reference
    )
    try:
        yield secret
    finally:
        secret.drop()


# --- Rotation -----------------------------------------------------------------------------------------------


@dataclass
class RewrapSummary:
    """What one ``keys_rewrap`` run did, overall and per org (org id → counts)."""

    to_kid: int
    from_kids: set[int] = field(default_factory=set)
    rewrapped: int = 0
    failed: int = 0
    skipped: int = 0
    by_org: dict[uuid.UUID, dict[str, int]] = field(default_factory=dict)

    def count(self, org_id: uuid.UUID, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)
        per_org = self.by_org.setdefault(org_id, {"rewrapped": 0, "failed": 0})
        if outcome in per_org:
            per_org[outcome] += 1


@sensitive_variables(*_SENSITIVE)
def provider_key_rewrap(
    *,
    key_id: uuid.UUID,
    summary: RewrapSummary | None = None,
    purpose: str = "rewrap",
    aad_version: int = PROVIDER_KEY_AAD_VERSION,
) -> bool:
    """Re-seal one key under the primary kid and AAD ``aad_version`` (the current one: org, id, provider and
    destination), in its own transaction with the row locked.

    Returns True if the row was re-sealed, False if there was nothing to do (revoked meanwhile, or already on the
    primary kid and that AAD version: that is what makes ``keys_rewrap`` and the re-seal migration idempotent and
    resumable). A value that cannot be opened with the AAD its row records is left untouched, audited as
    ``key.decrypt_failed`` (with ``purpose``) and raises ``ProviderKeyDecryptionError``. Another AAD version than
    the current one is only for reversing the re-seal migration.
    """
    keyring = _keyring()
    failure: DecryptionError | None = None
    with transaction.atomic():
        key = ProviderKey.objects.select_for_update().select_related("org").filter(pk=key_id).first()
        if key is None or key.kid is None or (key.kid, key.aad_version) == (keyring.primary_kid, aad_version):
            if summary is not None and key is not None:
                summary.skipped += 1
            return False
        old_kid = key.kid
        try:
            key.sealed_secret = reseal(
                keyring, key.sealed_secret, _aad(key, key.aad_version), new_aad=_aad(key, aad_version)
            )
        except DecryptionError as exc:
            failure = exc
            _record_decrypt_failure(key=key, actor=None, exc=exc, purpose=purpose, reference="")
        else:
            key.kid = keyring.primary_kid
            key.aad_version = aad_version
            key.save(update_fields=["sealed_secret", "kid", "aad_version"])
    if summary is not None:
        summary.from_kids.add(old_kid)
        summary.count(key.org_id, "failed" if failure is not None else "rewrapped")
    if failure is not None:
        raise ProviderKeyDecryptionError from None
    return True


def provider_keys_reseal(*, aad_version: int = PROVIDER_KEY_AAD_VERSION) -> RewrapSummary:
    """Bring every live key sealed with another AAD version to ``aad_version``: what migration ``keys.0003`` runs
    (forward: the current AAD, which binds the destination; backward: version 1).

    One row per transaction (``provider_key_rewrap``), so it is resumable and idempotent: run again, it picks up
    the rows still on another version. A key that does not open is left as it is and audited
    (``key.decrypt_failed``, purpose ``reseal``); it was unusable already. Keys are also moved to the primary
    kid on the way (a rewrap, recorded as ``key.rewrapped`` like ``keys_rewrap``'s). Returns the counts.
    """
    summary = RewrapSummary(to_kid=_keyring().primary_kid)
    for key_id in selectors.unscoped_provider_key_ids_not_on_aad_version(aad_version=aad_version):
        # A failure is already logged, audited and counted; the row stays as it was.
        with suppress(ProviderKeyDecryptionError):
            provider_key_rewrap(key_id=key_id, summary=summary, purpose="reseal", aad_version=aad_version)
    if summary.rewrapped or summary.failed:
        provider_keys_rewrap_record(summary=summary)
        logger.info(
            "provider keys re-sealed to AAD version %s: %s re-sealed, %s failed",
            aad_version,
            summary.rewrapped,
            summary.failed,
        )
    return summary


@transaction.atomic
def provider_keys_rewrap_record(*, summary: RewrapSummary) -> None:
    """Audit a ``keys_rewrap`` run: one ``key.rewrapped`` event per org whose keys it touched (so each org's
    admins see it in their own trail), plus one installation-wide event (org=None) with the totals."""
    orgs = Organization.objects.in_bulk(list(summary.by_org))
    for org_id, counts in summary.by_org.items():
        org = orgs.get(org_id)
        if org is None:  # deleted while the command ran
            continue
        signals.provider_keys_rewrapped.send(
            sender=ProviderKey,
            org=org,
            actor=None,
            to_kid=summary.to_kid,
            from_kids=sorted(summary.from_kids),
            rewrapped=counts["rewrapped"],
            failed=counts["failed"],
        )
    signals.provider_keys_rewrapped.send(
        sender=ProviderKey,
        org=None,
        actor=None,
        to_kid=summary.to_kid,
        from_kids=sorted(summary.from_kids),
        rewrapped=summary.rewrapped,
        failed=summary.failed,
    )
