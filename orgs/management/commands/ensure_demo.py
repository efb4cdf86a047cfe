from __future__ import annotations

import os
import secrets
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from orgs.models import Organization, User
from orgs.services import organization_create

DEMO_EMAIL = "admin@demo.cesaflow.local"
DEMO_SLUG = "demo"


class Command(BaseCommand):
    help = "Development only: ensure the demo organization and its admin exist, and print how to log in."

    def handle(self, *args: Any, **options: Any) -> None:
        if settings.PRODUCTION:
            raise CommandError("ensure_demo is for development; use create_org in production.")
        password_file = settings.VAR_DIR / "demo-admin-password"
        settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
        if not password_file.exists():
            fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(15))
        password = password_file.read_text().strip()
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
        self.stdout.write(
            "\n"
            "  CesaFlow demo (development only)\n"
            "  Dashboard: http://127.0.0.1:8000/\n"
            f"  Log in as {DEMO_EMAIL} with password {password}\n"
            f"  (kept in {password_file})\n"
        )
