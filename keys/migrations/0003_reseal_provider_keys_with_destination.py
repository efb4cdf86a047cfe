"""Re-seal every live provider key with the AAD that binds its destination (AAD version 2, ``keys.crypto``).

Keys sealed before version 2 are bound to their org, id and provider only, and the application no longer opens
them for calls: this migration runs before the new code serves. It calls the service that ``keys_rewrap`` uses
(current models, signals and the keyring from settings, like a management command): one row per transaction with
the row locked, so the migration is not atomic and an interrupted run continues where it stopped when ``migrate``
runs again (``manage.py keys_rewrap`` does the same work). A key that does not open is left as it is and audited
(``key.decrypt_failed``, purpose ``reseal``); ``manage.py check`` warns (``keys.W002``) while any remain.

Backward: re-seals every key with AAD version 1 so that the previous release can open them again.
"""

from typing import Any

from django.db import migrations


# Literal versions, not keys.crypto's constant: a migration keeps doing what it did when it was written.
def reseal_forward(apps: Any, schema_editor: Any) -> None:
    from keys.services import provider_keys_reseal

    provider_keys_reseal(aad_version=2)


def reseal_backward(apps: Any, schema_editor: Any) -> None:
    from keys.services import provider_keys_reseal

    provider_keys_reseal(aad_version=1)


class Migration(migrations.Migration):
    # One transaction per row (inside the service), not one around the whole table: the rows done before an
    # interruption stay done, and the next ``migrate`` continues with the rest.
    atomic = False

    dependencies = [
        ("keys", "0002_providerkey_aad_version"),
        # Failures are audited: the audit trail's table must exist.
        ("runs", "0005_projects_and_webhooks"),
    ]

    operations = [migrations.RunPython(reseal_forward, reseal_backward, elidable=False)]
