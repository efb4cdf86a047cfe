"""Forget GitHub delivery ids past their retention (``WEBHOOK_DELIVERY_RETENTION_DAYS``, default 30 days)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from runs.webhooks.services import REDELIVERY_WINDOW_DAYS, webhook_deliveries_purge, webhook_delivery_retention_days


class Command(BaseCommand):
    help = (
        "Delete GitHub webhook delivery records older than the retention period "
        "(default WEBHOOK_DELIVERY_RETENTION_DAYS, 30)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days", type=int, default=None, help=f"Retention in days (at least {REDELIVERY_WINDOW_DAYS})."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["days"] if options["days"] is not None else webhook_delivery_retention_days()
        if days < REDELIVERY_WINDOW_DAYS:
            # A delivery id forgotten while GitHub can still redeliver it would start its run a second time.
            self.stderr.write(f"--days must be at least {REDELIVERY_WINDOW_DAYS} (GitHub's redelivery window).")
            raise SystemExit(2)
        deleted = webhook_deliveries_purge(older_than_days=days)
        self.stdout.write(f"Deleted {deleted} webhook delivery records older than {days} days.")
