"""Other values sealed with the provider keyring (operators' TOTP secrets, projects' webhook secrets): registered
here by their apps so that key rotation covers them like provider keys. ``keys_rewrap`` re-seals them under the
primary kid and the keyring check (``keys.E004``/``E005``/``W001``) counts their kids, so a kid is never retired
while something still needs it. keys knows nothing of those apps: they register in their ``AppConfig.ready``.

Provider keys are not registered here: their associated data has versions (it grew the key's destination) and
their failures are audited per organization, so ``keys.services.provider_key_rewrap`` re-seals them. A registered
value has one AAD, computed from its row by ``SealedField.aad``, which must cover every column that decides where
the opened value is used or sent: a column left out can be changed without the value noticing.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.db.models import Model

from keys.crypto import DecryptionError, Keyring, reseal, stored_kid

logger = logging.getLogger("cesaflow.keys")


@dataclass(frozen=True)
class SealedField:
    label: str  # for people: "operator TOTP secrets"
    model: type[Model]
    field: str
    aad: Callable[[Any], bytes]  # the row -> the associated data the value is bound to (one version, never changes)


SEALED_FIELDS: list[SealedField] = []


def register_sealed_field(spec: SealedField) -> None:
    if all((s.model, s.field) != (spec.model, spec.field) for s in SEALED_FIELDS):
        SEALED_FIELDS.append(spec)


def _sealed_rows(spec: SealedField) -> list[Any]:
    return list(spec.model._default_manager.exclude(**{spec.field: ""}).values_list("pk", flat=True))


def sealed_field_counts_by_kid() -> dict[int, int]:
    """How many registered sealed values each kid protects (a few rows: operators, projects)."""
    counts: Counter[int] = Counter()
    for spec in SEALED_FIELDS:
        for value in spec.model._default_manager.exclude(**{spec.field: ""}).values_list(spec.field, flat=True):
            try:
                counts[stored_kid(value)] += 1
            except DecryptionError:
                logger.warning("a stored %s value has no readable kid", spec.label)
    return dict(counts)


def sealed_fields_rewrap(keyring: Keyring) -> tuple[int, int]:
    """Re-seals every registered value not under the primary kid, one row per transaction (resumable).
    Returns (re-sealed, failed); a value that cannot be opened is left as it is and logged (never its content)."""
    rewrapped = failed = 0
    for spec in SEALED_FIELDS:
        for pk in _sealed_rows(spec):
            with transaction.atomic():
                row = spec.model._default_manager.select_for_update().filter(pk=pk).first()
                if row is None:
                    continue
                value = getattr(row, spec.field)
                if not value or stored_kid(value) == keyring.primary_kid:
                    continue
                try:
                    setattr(row, spec.field, reseal(keyring, value, spec.aad(row)))
                except DecryptionError:
                    failed += 1
                    logger.error("a stored %s value (row %s) cannot be decrypted with this keyring", spec.label, pk)
                    continue
                row.save(update_fields=[spec.field])
                rewrapped += 1
    return rewrapped, failed
