from __future__ import annotations

import os
import secrets
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from keys.models import KeyStatus, Provider
from keys.selectors import provider_keys_for_org
from keys.services import provider_key_create
from orgs.models import Organization, User
from orgs.services import organization_create

DEMO_EMAIL = "admin@demo.cesaflow.local"
DEMO_SLUG = "demo"
# label -> (provider, path of that dialect on the provider simulator)
DEMO_KEYS = {
    "demo-openai": (Provider.OPENAI, "/openai/v1"),
    "demo-anthropic": (Provider.ANTHROPIC, "/anthropic"),
    "demo-groq": (Provider.GROQ, "/groq/openai/v1"),
}


class Command(BaseCommand):
    help = (
        "Development only: ensure the demo organization, its admin, and provider keys for all three dialects "
        "pointing at the local provider simulator; print how to log in."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--simulator-url",
            default="http://127.0.0.1:8765",
            help="Where `manage.py provider_simulator` listens (make run starts it).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if settings.PRODUCTION:
            raise CommandError("ensure_demo is for development; use create_org in production.")
        simulator = options["simulator_url"].rstrip("/")
        password = self._demo_password()
        with transaction.atomic():
            user = User.objects.filter(email__iexact=DEMO_EMAIL).first()
            if user is None:
                user = User.objects.create_user(email=DEMO_EMAIL, password=password, name="Demo Admin")
            elif not user.check_password(password):
                user.set_password(password)
                user.save(update_fields=["password"])
            org = Organization.objects.filter(slug=DEMO_SLUG).first()
            if org is None:
                org = organization_create(name="Demo", admin=user, slug=DEMO_SLUG)
            live = {k.label for k in provider_keys_for_org(org=org) if k.status != KeyStatus.REVOKED}
            for label, (provider, path) in DEMO_KEYS.items():
                if label not in live:
                    # The simulator accepts any non-empty key; a fresh random one keeps the demo honest.
                    provider_key_create(
                        org=org,
                        actor=user,
                        provider=provider,
                        label=label,
                        secret=f"fake-demo-{secrets.token_urlsafe(24)}",
                        base_url=f"{simulator}{path}",
                    )
        self.stdout.write(
            "\n"
            "  CesaFlow demo (development only)\n"
            "  Dashboard: http://127.0.0.1:8000/\n"
            f"  Log in as {DEMO_EMAIL} with password {password}\n"
            f"  (kept in {settings.VAR_DIR / 'demo-admin-password'})\n"
            f"  Provider keys {', '.join(DEMO_KEYS)} point at the simulator on {simulator};\n"
            "  pick a model such as fake/echo or fake/slow.\n"
            "  Agent demo: New run, kind Agent, key demo-openai, type the model fake/agent_demo.\n"
        )

    @staticmethod
    def _demo_password() -> str:
        settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
        password_file = settings.VAR_DIR / "demo-admin-password"
        if not password_file.exists():
            fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(15))
        return password_file.read_text().strip()
