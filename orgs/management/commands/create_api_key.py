from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from orgs.models import Organization
from orgs.permissions import ALL_CAPABILITIES, DEFAULT_API_KEY_SCOPES
from orgs.services import api_key_create


class Command(BaseCommand):
    help = "Create an org API key. The key is printed once, alone on the last line of output."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--org", required=True, help="Organization slug.")
        parser.add_argument("--name", required=True, help="A name to recognize the key by.")
        parser.add_argument(
            "--scopes",
            nargs="+",
            default=None,
            metavar="SCOPE",
            help=f"Scopes (default: {' '.join(sorted(DEFAULT_API_KEY_SCOPES))}). "
            f"Known: {' '.join(sorted(ALL_CAPABILITIES))}.",
        )
        parser.add_argument("--expires-days", type=int, default=None, help="Expire after N days.")

    def handle(self, *args: Any, **options: Any) -> None:
        org = Organization.objects.filter(slug=options["org"]).first()
        if org is None:
            raise CommandError(f"No organization with slug {options['org']!r}.")
        expires_at = None
        if options["expires_days"] is not None:
            if options["expires_days"] < 1:
                raise CommandError("--expires-days must be at least 1.")
            expires_at = timezone.now() + timedelta(days=options["expires_days"])
        scopes = None
        if options["scopes"] is not None:
            scopes = [s for item in options["scopes"] for s in item.replace(",", " ").split()]
        try:
            api_key, secret = api_key_create(
                org=org, name=options["name"], actor=None, scopes=scopes, expires_at=expires_at
            )
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stdout.write(
            f"Created API key {api_key.name!r} ({api_key.id}) for {org.slug} with scopes "
            f"{', '.join(api_key.scopes)}. Store it now; it cannot be shown again:"
        )
        self.stdout.write(secret)
