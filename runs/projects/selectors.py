"""Reads of projects, always scoped to an org (another org's project and a missing one look the same: None)."""

from __future__ import annotations

import uuid

from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from orgs.models import Organization
from runs.models import Project, Run, WebhookDelivery


def project_get_for_org(*, org: Organization, project_id: uuid.UUID | str) -> Project | None:
    try:
        return Project.objects.select_related("default_provider_key").get(org=org, id=project_id)
    except (Project.DoesNotExist, ValidationError, ValueError, TypeError):
        return None


def projects_for_org(*, org: Organization) -> QuerySet[Project]:
    return Project.objects.filter(org=org).select_related("default_provider_key").order_by("name", "id")


def project_runs(*, project: Project, limit: int = 50) -> list[Run]:
    return list(
        Run.objects.filter(project=project)
        .select_related("provider_key", "created_by_user", "created_by_api_key")
        .order_by("-created_at", "-id")[:limit]
    )


def project_deliveries(*, project: Project, limit: int = 50) -> list[WebhookDelivery]:
    return list(WebhookDelivery.objects.filter(project=project).order_by("-received_at")[:limit])


def unscoped_project_for_webhook(*, project_id: uuid.UUID | str) -> Project | None:
    """The project a webhook URL names, whatever its org: the delivery's signature, checked next, is what proves
    the sender knows the project's secret (an unknown id and a bad signature answer the same)."""
    try:
        return Project.objects.select_related("org", "default_provider_key").get(id=project_id)
    except (Project.DoesNotExist, ValidationError, ValueError, TypeError):
        return None
