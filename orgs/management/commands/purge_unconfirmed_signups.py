"""Delete sign-ups whose confirmation link expired unused (every executor also does this hourly)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from orgs.services import signups_unconfirmed_purge


class Command(BaseCommand):
    help = "Delete the accounts (and their organizations) of sign-ups never confirmed within the link's lifetime."

    def handle(self, *args: Any, **options: Any) -> None:
        deleted = signups_unconfirmed_purge()
        self.stdout.write(f"Deleted {deleted} unconfirmed sign-up(s).")
