from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from runs.services.workspaces import workspaces_purge


class Command(BaseCommand):
    help = (
        "Delete agent workspaces whose retention rule says so: past their download window (CESAFLOW_WORKSPACE_TTL), "
        "left live by a run that is no longer running, or claimed by no run. Every executor also does this "
        "periodically and at startup."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        deleted = workspaces_purge()
        self.stdout.write(f"Deleted {deleted} workspace(s).")
