"""Reads of run and audit data, always scoped to an org."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.db.models import Q, QuerySet

from orgs.models import Organization
from runs.models import AuditEvent


def audit_events_for_org(
    *,
    org: Organization,
    event: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[AuditEvent]:
    """The org's audit trail, newest first. ``actor`` matches a user id, an API key id or the actor label
    (case-insensitive substring, e.g. part of an email)."""
    events = AuditEvent.objects.filter(org=org).select_related("actor_user", "actor_api_key")
    if event:
        events = events.filter(event=event)
    if actor:
        match = Q(actor_label__icontains=actor)
        if _looks_like_uuid(actor):
            match |= Q(actor_user_id=actor) | Q(actor_api_key_id=actor)
        events = events.filter(match)
    if since is not None:
        events = events.filter(created_at__gte=since)
    if until is not None:
        events = events.filter(created_at__lt=until)
    return events.order_by("-created_at", "-id")


def _looks_like_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
