"""Writes to the installation audit trail (``nexus.models.InstallationEvent``). Client IP and user agent come from
the request context middleware, like the organizations' trail. Never a secret, a key or a password in metadata."""

from __future__ import annotations

from typing import Any

from django.db.models import Model

from cesaflow.lib import request_context
from nexus.models import InstallationEvent, Operator
from orgs.models import Organization

# Event names (code refers to these constants, never to literals).
SIGNED_IN = "operator.signed_in"
SIGN_IN_FAILED = "operator.sign_in_failed"
LOCKED_OUT = "operator.locked_out"
SIGNED_OUT = "operator.signed_out"
ENROLLED = "operator.enrolled"
CREATED = "operator.created"  # by manage.py create_operator
ENROLMENT_ISSUED = "operator.enrolment_issued"  # a new enrolment link (create_operator --reset-totp)
ACTION = "operator.action"  # an action on an organization: metadata["action"] names it


def installation_record(
    *,
    event: str,
    operator: Operator | None,
    operator_label: str = "",
    org: Organization | None = None,
    target: Model | None = None,
    reason: str = "",
    metadata: dict[str, Any] | None = None,
) -> InstallationEvent:
    context = request_context.current()
    return InstallationEvent.objects.create(
        event=event,
        operator=operator,
        operator_label=(operator.email if operator is not None else operator_label)[:254],
        org=org,
        target_type=(target._meta.model_name or "") if target is not None else "",
        target_id=str(target.pk) if target is not None else "",
        reason=reason[:2000],
        ip=context.ip,
        user_agent=context.user_agent[:256],
        metadata=metadata or {},
    )
