from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from runs.services import audit_purge


class Command(BaseCommand):
    help = "Delete audit events older than the retention period (default CESAFLOW_AUDIT_RETENTION_DAYS, 90)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=int, default=None, help="Retention in days (at least 1).")

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["days"] if options["days"] is not None else settings.AUDIT_RETENTION_DAYS
        if days < 1:
            self.stderr.write("--days must be at least 1.")
            raise SystemExit(2)
        deleted = audit_purge(older_than_days=days)
        self.stdout.write(f"Deleted {deleted} audit events older than {days} days.")
