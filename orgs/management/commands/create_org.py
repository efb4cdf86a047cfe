from __future__ import annotations

import secrets
import sys
from typing import Any

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from orgs.models import User
from orgs.services import organization_create


class Command(BaseCommand):
    help = (
        "Create an organization and its first Admin. The password is read from stdin when piped; "
        "otherwise one is generated and printed once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True, help="Organization name.")
        parser.add_argument("--admin-email", required=True, help="Email of the first Admin.")
        parser.add_argument("--slug", default=None, help="URL slug (derived from the name by default).")

    def handle(self, *args: Any, **options: Any) -> None:
        email = User.objects.normalize_email(options["admin_email"]).lower()
        generated = sys.stdin is None or sys.stdin.isatty()
        password = secrets.token_urlsafe(18) if generated else sys.stdin.readline().rstrip("\r\n")
        try:
            with transaction.atomic():
                user = User.objects.filter(email__iexact=email).first()
                if user is None:
                    validate_password(password, User(email=email))
                    user = User.objects.create_user(email=email, password=password)
                    created_user = True
                else:
                    created_user = False
                org = organization_create(name=options["name"], admin=user, slug=options["slug"])
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stdout.write(f"Created organization {org.name} (slug {org.slug}, id {org.id}).")
        if not created_user:
            self.stdout.write(f"{email} already had an account and is now an Admin of {org.slug}.")
        elif generated:
            self.stdout.write(f"Admin {email}, password (shown once): {password}")
        else:
            self.stdout.write(f"Admin {email} created with the password from stdin.")
