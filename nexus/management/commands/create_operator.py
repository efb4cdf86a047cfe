from __future__ import annotations

import secrets
import sys
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from nexus.models import Operator, OperatorRole
from nexus.services import ENROLMENT_TTL, operator_create, operator_enrolment_reset


class Command(BaseCommand):
    help = (
        "Create a Nexus operator (or, with --reset-totp, issue a new enrolment link to one). Prints a one-time "
        "enrolment link where the operator sets up their authenticator; it works once, for 24 hours."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--email", required=True)
        parser.add_argument("--name", default="")
        parser.add_argument("--role", choices=OperatorRole.values, default=OperatorRole.SUPPORT)
        parser.add_argument(
            "--password-stdin",
            action="store_true",
            help="Read the password from standard input (else one is generated and printed once).",
        )
        parser.add_argument(
            "--reset-totp",
            action="store_true",
            help="For an existing operator: a new authenticator secret and enrolment link (a lost device).",
        )
        parser.add_argument(
            "--base-url",
            default="",
            help="Origin to print the link with, e.g. https://cesaflow.example.com (default: a path only).",
        )

    def _link(self, token: str, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/{settings.NEXUS_PREFIX}/enrol/{token}/"

    def handle(self, *args: Any, **options: Any) -> None:
        email: str = options["email"].strip().lower()
        hours = int(ENROLMENT_TTL.total_seconds() // 3600)
        if options["reset_totp"]:
            operator = Operator.objects.filter(email__iexact=email).first()
            if operator is None:
                raise CommandError(f"No operator with email {email!r}.")
            token = operator_enrolment_reset(operator=operator)
            self.stdout.write(
                f"Operator {operator.email} must enrol again; their previous authenticator no longer works. "
                f"One-time enrolment link (valid {hours} hours):"
            )
            self.stdout.write(self._link(token, options["base_url"]))
            return
        if Operator.objects.filter(email__iexact=email).exists():
            raise CommandError(f"An operator with email {email!r} already exists (use --reset-totp for a new link).")
        generated = not options["password_stdin"]
        password = secrets.token_urlsafe(24) if generated else sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CommandError("No password on standard input.")
        try:
            operator, token = operator_create(
                email=email, name=options["name"], role=options["role"], password=password
            )
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stdout.write(f"Created operator {operator.email} ({operator.role}).")
        if generated:
            self.stdout.write("Password (shown once; store it now):")
            self.stdout.write(password)
        self.stdout.write(
            f"One-time enrolment link (valid {hours} hours): set up the authenticator there before signing in:"
        )
        self.stdout.write(self._link(token, options["base_url"]))
