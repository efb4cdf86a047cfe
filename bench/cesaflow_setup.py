"""Seed the bench database: one org, its admin, one org API key and two provider keys on the simulator.

Run by ``bench/run.py`` with the same (production) environment as the servers, so the provider keys are sealed
with the keyring the servers open them with. Prints one JSON line: the org API key, the key labels and the id of
the ``bench`` provider key (runs name their key by id).
Usage: ``cesaflow_setup.py <simulator base URL> <tap base URL>``.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django

django.setup()

from django.db import transaction  # noqa: E402

from keys.models import Provider  # noqa: E402
from keys.services import provider_key_create  # noqa: E402
from orgs.models import User  # noqa: E402
from orgs.services import api_key_create, organization_create  # noqa: E402


def main(simulator_url: str, tap_url: str) -> None:
    with transaction.atomic():
        # The same steps as `manage.py create_org`, without its interactive password handling.
        admin = User.objects.create_user(email="bench@cesaflow.invalid", password=secrets.token_urlsafe(24))
        org = organization_create(name="Bench", admin=admin, slug="bench")
        _, api_secret = api_key_create(org=org, name="bench", actor=None)
        key_ids: dict[str, str] = {}
        for label, base in (("bench", simulator_url), ("benchtap", tap_url)):
            key = provider_key_create(
                org=org,
                actor=admin,
                provider=Provider.OPENAI,
                label=label,
                secret=f"fake-bench-{secrets.token_urlsafe(16)}",
                base_url=f"{base}/openai/v1",
            )
            key_ids[label] = str(key.pk)
    seeded = {"api_key": api_secret, "label": "bench", "tap_label": "benchtap", "provider_key_id": key_ids["bench"]}
    print(json.dumps(seeded))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
