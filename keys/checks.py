"""System checks for the provider-key keyring (``manage.py check``, and before ``migrate``).

Settings already refuse a malformed keyring at load time. These checks add what settings cannot know: whether
every kid that sealed a stored key is still in the ring. A missing kid means keys that can no longer be
opened, which must stop a deploy rather than surface later as failing runs. And whether provider keys sealed with
an older associated data (before the destination joined it) are waiting to be re-sealed: a warning, not an
error, because ``migrate`` itself runs these checks and is what re-seals them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.db import DatabaseError, connections

from keys.crypto import Keyring
from keys.models import ProviderKey
from keys.sealed import sealed_field_counts_by_kid
from keys.selectors import unscoped_provider_key_count_on_old_aad, unscoped_provider_key_counts_by_kid

TAG = "keys"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@register(TAG)
def check_keyring_config(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """The ring itself: present, primary not retired, no key that is just the Django secret key."""
    keyring = getattr(settings, "KEYRING", None)
    if not isinstance(keyring, Keyring):
        return [Error("settings.KEYRING is not a keyring.", hint="Set CESAFLOW_KEYRING (README).", id="keys.E001")]
    errors: list[CheckMessage] = []
    if keyring.primary_kid < keyring.min_kid:
        errors.append(
            Error(
                f"The primary keyring kid {keyring.primary_kid} is below CESAFLOW_KEYRING_MIN_KID "
                f"({keyring.min_kid}): new keys would be sealed with a kid that cannot open them.",
                hint="Put a kid at or above the minimum first in CESAFLOW_KEYRING.",
                id="keys.E002",
            )
        )
    # The keyring must be independent of SECRET_KEY (a leaked or rotated SECRET_KEY must not touch stored
    # keys). The obvious derivations are caught here; anything cleverer is the operator's responsibility.
    derived = {
        form
        for secret in (settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", []))
        for form in (
            str(secret).encode()[:32],
            hashlib.sha256(str(secret).encode()).digest(),
            hashlib.sha512(str(secret).encode()).digest()[:32],
        )
    }
    if any(material in derived for material in keyring.keys.values()):
        errors.append(
            Error(
                "A keyring key is derived from SECRET_KEY.",
                hint="Generate keyring keys independently (README: key rotation).",
                id="keys.E003",
            )
        )
    return errors


def _table_exists() -> bool:
    connection = connections["default"]
    with connection.cursor() as cursor:
        return ProviderKey._meta.db_table in connection.introspection.table_names(cursor)


@register(TAG)
def check_stored_kids(
    app_configs: Sequence[AppConfig] | None = None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Every kid that sealed a stored key must be in the ring and not retired.

    Runs against the default database even when the check framework passes no ``databases`` (a plain
    ``manage.py check``): this is the check that matters most. Silent when the database is unreachable or not
    migrated yet; other checks (and ``migrate``) speak to that.
    """
    keyring = getattr(settings, "KEYRING", None)
    if not isinstance(keyring, Keyring):
        return []  # check_keyring_config reports it
    if databases is not None and "default" not in databases:
        return []
    try:
        if not _table_exists():
            return []
        counts = Counter(unscoped_provider_key_counts_by_kid())
    except DatabaseError:
        return []
    # Operators' TOTP and projects' webhook secrets (keys.sealed); their tables may not be migrated yet.
    with suppress(DatabaseError):
        counts.update(sealed_field_counts_by_kid())
    messages: list[CheckMessage] = []
    missing = {kid: n for kid, n in counts.items() if kid not in keyring.keys}
    retired = {kid: n for kid, n in counts.items() if kid in keyring.keys and kid < keyring.min_kid}
    stale = {
        kid: n for kid, n in counts.items() if kid in keyring.keys and keyring.min_kid <= kid != keyring.primary_kid
    }
    if missing:
        n = sum(missing.values())
        messages.append(
            Error(
                f"{_plural(n, 'stored secret')} cannot be decrypted: CESAFLOW_KEYRING lacks "
                f"kid {', '.join(map(str, sorted(missing)))}.",
                hint="Put the missing kid(s) back into CESAFLOW_KEYRING; if they were rotated out, run "
                "keys_rewrap with them present before removing them.",
                id="keys.E004",
            )
        )
    if retired:
        n = sum(retired.values())
        messages.append(
            Error(
                f"{_plural(n, 'stored secret')} cannot be decrypted: sealed with kid "
                f"{', '.join(map(str, sorted(retired)))}, below CESAFLOW_KEYRING_MIN_KID ({keyring.min_kid}).",
                hint="Lower CESAFLOW_KEYRING_MIN_KID, run manage.py keys_rewrap, then raise it again.",
                id="keys.E005",
            )
        )
    if stale:
        n = sum(stale.values())
        messages.append(
            Warning(
                f"{_plural(n, 'stored secret')} not sealed with the primary kid {keyring.primary_kid}.",
                hint="Run manage.py keys_rewrap before retiring the old kid.",
                id="keys.W001",
            )
        )
    return messages


@register(TAG)
def check_provider_key_aad(
    app_configs: Sequence[AppConfig] | None = None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Provider keys still sealed with an older AAD version cannot be used for calls until re-sealed.

    Silent when the database is unreachable or the column does not exist yet (``migrate`` runs the checks before
    it adds it).
    """
    if databases is not None and "default" not in databases:
        return []
    try:
        if not _table_exists():
            return []
        old = unscoped_provider_key_count_on_old_aad()
    except DatabaseError:
        return []
    if not old:
        return []
    return [
        Warning(
            f"{_plural(old, 'provider key')} sealed with an older associated data version cannot be used for calls.",
            hint="Run manage.py migrate (migration keys.0003) or manage.py keys_rewrap to re-seal them. A key that "
            "still fails is listed as key.decrypt_failed in its organization's audit trail: revoke it and add it "
            "again.",
            id="keys.W002",
        )
    ]
