"""The Nexus home page's health panel: counts, executors' heartbeats, the keyring, and the services behind them.

Reads only; every probe that can fail is caught and shown as "unavailable", never raised (the operator needs
this page most when something is down).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Max
from django.utils import timezone

from cesaflow.views import service_checks
from keys.checks import check_keyring_config, check_stored_kids
from keys.selectors import unscoped_provider_key_counts_by_kid
from orgs.models import Organization, User
from runs.models import Run, RunStatus


@dataclass(frozen=True)
class Health:
    counts: dict[str, int]
    failed_by_kind: dict[str, int]
    executors: list[dict[str, Any]]
    keyring: dict[str, Any]
    services: dict[str, str]


def health_summary() -> Health:
    now = timezone.now()
    day = now - timedelta(hours=24)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    counts = {
        "organizations": Organization.objects.count(),
        "suspended organizations": Organization.objects.exclude(suspended_at=None).count(),
        "users": User.objects.count(),
        "runs today": Run.objects.filter(created_at__gte=today).count(),
        "running now": Run.objects.filter(status=RunStatus.RUNNING).count(),
        "queued now": Run.objects.filter(status=RunStatus.QUEUED).count(),
    }
    failed = dict(
        Run.objects.filter(status=RunStatus.FAILED, finished_at__gte=day)
        .values_list("kind")
        .annotate(n=Count("id"))
        .values_list("kind", "n")
    )
    # Executors prove they are alive by heart-beating their running runs (runs.executor).
    stale_after = timedelta(seconds=float(settings.RUN_STALE_AFTER_SECONDS))
    executors = [
        {"worker": row["worker_id"], "runs": row["n"], "last": row["last"], "stale": row["last"] < now - stale_after}
        for row in Run.objects.filter(status=RunStatus.RUNNING)
        .exclude(worker_id="")
        .exclude(heartbeat_at=None)
        .values("worker_id")
        .annotate(n=Count("id"), last=Max("heartbeat_at"))
        .order_by("worker_id")
    ]
    keyring = settings.KEYRING
    messages = [*check_keyring_config(), *check_stored_kids()]
    keyring_status = {
        "primary_kid": keyring.primary_kid,
        "min_kid": keyring.min_kid,
        "kids": sorted(keyring.keys),
        "keys_by_kid": unscoped_provider_key_counts_by_kid(),
        "checks": [f"{message.id}: {message.msg}" for message in messages],
    }
    return Health(
        counts=counts,
        failed_by_kind=failed,
        executors=executors,
        keyring=keyring_status,
        services=service_checks(),
    )
