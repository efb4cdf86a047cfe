"""Writes for runs and the audit trail."""

from __future__ import annotations

from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from runs.models import AuditEvent


@transaction.atomic
def audit_purge(*, older_than_days: int) -> int:
    """Delete audit events older than ``older_than_days`` days; returns how many went. Idempotent."""
    if older_than_days < 1:
        raise ValueError("older_than_days must be at least 1")
    cutoff = timezone.now() - timedelta(days=older_than_days)
    deleted, _ = AuditEvent.objects.filter(created_at__lt=cutoff).delete()
    return deleted
