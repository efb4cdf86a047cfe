"""Seed the drill's database: organizations, each with an admin and a developer, an org API key and a provider key
on the provider simulator, through CesaFlow's own services (the steps an admin takes in the dashboard).

Run by ``deploy/drill.py`` with the web processes' production environment (so provider keys are sealed with the
keyring they are opened with). Prints one JSON line on stdout, read through a pipe by the drill and never written
to a file: the throwaway credentials exist only for the drill's lifetime.
Usage: ``drill_seed.py <simulator base URL> <number of orgs>``.
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
from orgs.models import Role, User  # noqa: E402
from orgs.services import (  # noqa: E402
    api_key_create,
    invitation_create,
    organization_create,
    user_signup_from_invitation,
)


def seed_org(number: int, simulator_url: str) -> dict[str, str]:
    password = secrets.token_urlsafe(18)
    with transaction.atomic():
        admin = User.objects.create_user(email=f"admin{number}@drill.invalid", password=password)
        org = organization_create(name=f"Drill {number}", admin=admin, slug=f"drill-{number}")
        _, token = invitation_create(org=org, email=f"dev{number}@drill.invalid", role=Role.DEVELOPER, actor=admin)
        user_signup_from_invitation(token=token, password=secrets.token_urlsafe(18), name=f"Developer {number}")
        _, api_secret = api_key_create(org=org, name="drill", actor=None)
        key = provider_key_create(
            org=org,
            actor=admin,
            provider=Provider.OPENAI,
            label="simulator",
            secret=f"fake-drill-{secrets.token_urlsafe(12)}",
            base_url=f"{simulator_url}/openai/v1",
        )
    return {
        "org_id": str(org.pk),
        "email": admin.email,
        "password": password,
        "api_key": api_secret,
        "provider_key": str(key.pk),
    }


def main(simulator_url: str, orgs: int) -> None:
    print(json.dumps([seed_org(number, simulator_url) for number in range(1, orgs + 1)]))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
