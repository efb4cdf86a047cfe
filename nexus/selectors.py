"""Reads of operator accounts."""

from __future__ import annotations

from datetime import datetime

from django.utils import timezone

from nexus.models import Operator
from nexus.services import enrolment_token_digest


def operator_get_for_enrolment_token(*, token: str, now: datetime | None = None) -> Operator | None:
    """The active operator whose unexpired, unused enrolment link carries ``token``; None for anything else."""
    if not token or len(token) > 128:
        return None
    return Operator.objects.filter(
        enrolment_token_hash=enrolment_token_digest(token),
        enrolment_expires_at__gt=now or timezone.now(),
        is_active=True,
    ).first()


def operator_get_by_email(*, email: str) -> Operator | None:
    return Operator.objects.filter(email__iexact=email.strip()).first()
