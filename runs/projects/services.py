"""Writes for projects: create, update, delete (its workspace at once), and agent runs on a project."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from keys.models import ProviderKey
from keys.selectors import provider_key_get_usable_for_org
from orgs.models import Actor, Organization, User, actor_label
from runs.audit import audit_record
from runs.models import AuditEvent, Project, Run, RunKind, RunStatus
from runs.services import MODEL_MAX_CHARS, run_create, run_request_cancel
from runs.workspaces import project_workspace_delete, usage

logger = logging.getLogger("cesaflow.runs")

NAME_MAX_CHARS = 100
DESCRIPTION_MAX_CHARS = 2000
_KEEP: Any = object()


def _clean_name(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > NAME_MAX_CHARS or "\x00" in name:
        raise ValidationError({"name": f"Give the project a name (at most {NAME_MAX_CHARS} characters)."})
    return name


def _clean_description(description: str) -> str:
    description = (description or "").strip()
    if len(description) > DESCRIPTION_MAX_CHARS or "\x00" in description:
        raise ValidationError({"description": f"Keep the description under {DESCRIPTION_MAX_CHARS:,} characters."})
    return description


def _resolve_key(org: Organization, key_id: uuid.UUID | str | None) -> ProviderKey | None:
    if key_id is None or key_id == "":
        return None
    key = provider_key_get_usable_for_org(org=org, key_id=key_id)
    if key is None:
        raise ValidationError({"default_provider_key": "No such provider key."})  # another org's looks missing
    return key


def _clean_model(model: str) -> str:
    model = (model or "").strip()
    if len(model) > MODEL_MAX_CHARS or "\x00" in model:
        raise ValidationError({"default_model": f"At most {MODEL_MAX_CHARS} characters."})
    return model


@transaction.atomic
def project_create(
    *,
    org: Organization,
    actor: Actor,
    name: str,
    description: str = "",
    default_provider_key_id: uuid.UUID | str | None = None,
    default_model: str = "",
) -> Project:
    project = Project(
        org=org,
        name=_clean_name(name),
        description=_clean_description(description),
        default_provider_key=_resolve_key(org, default_provider_key_id),
        default_model=_clean_model(default_model),
        created_by=actor if isinstance(actor, User) else None,
        created_by_label=actor_label(actor),
    )
    try:
        with transaction.atomic():
            project.save()
    except IntegrityError:
        raise ValidationError({"name": "A project with this name already exists."}, code="duplicate") from None
    audit_record(
        event=AuditEvent.PROJECT_CREATED, org=org, actor=actor, target=project, metadata={"name": project.name}
    )
    return project


@transaction.atomic
def project_update(
    *,
    project: Project,
    actor: Actor,
    name: str | None = None,
    description: str | None = None,
    default_provider_key_id: Any = _KEEP,
    default_model: str | None = None,
) -> Project:
    """Change what is passed (``default_provider_key_id=None`` clears the default key)."""
    changes: dict[str, list[Any]] = {}
    if name is not None and _clean_name(name) != project.name:
        changes["name"] = [project.name, _clean_name(name)]
        project.name = _clean_name(name)
    if description is not None and _clean_description(description) != project.description:
        changes["description"] = ["…", "…"]  # free text: recorded as changed, not copied into the trail
        project.description = _clean_description(description)
    if default_provider_key_id is not _KEEP:
        key = _resolve_key(project.org, default_provider_key_id)
        if (key.id if key else None) != project.default_provider_key_id:
            changes["default_provider_key"] = [str(project.default_provider_key_id or ""), str(key.id if key else "")]
            project.default_provider_key = key
    if default_model is not None and _clean_model(default_model) != project.default_model:
        changes["default_model"] = [project.default_model, _clean_model(default_model)]
        project.default_model = _clean_model(default_model)
    if changes:
        project.updated_at = timezone.now()
        try:
            with transaction.atomic():
                project.save()
        except IntegrityError:
            raise ValidationError({"name": "A project with this name already exists."}, code="duplicate") from None
        audit_record(
            event=AuditEvent.PROJECT_UPDATED,
            org=project.org,
            actor=actor,
            target=project,
            metadata={"changes": changes},
        )
    return project


def project_delete(*, project: Project, actor: Actor) -> int:
    """Delete the project and its workspace at once; its runs keep their metadata. Runs still queued or running on
    it are cancelled first. Returns how many runs were cancelled."""
    cancelled = 0
    with transaction.atomic():
        locked = Project.objects.select_for_update().get(id=project.id)
        active = Run.objects.filter(project=locked, status__in=[RunStatus.QUEUED, RunStatus.RUNNING])
        for run in active:
            run_request_cancel(run=run, actor=actor)
            cancelled += 1
        audit_record(
            event=AuditEvent.PROJECT_DELETED,
            org=locked.org,
            actor=actor,
            target=locked,
            metadata={"name": locked.name, "runs_cancelled": cancelled},
        )
        project_id = locked.id
        locked.delete()
    try:
        project_workspace_delete(project_id)
    except OSError:
        # A cancelled run's command may still be writing in it: the retention sweep removes the directory of a
        # project that no longer exists on its next tick.
        logger.warning("project %s: workspace not deleted at once; the retention sweep will", project_id)
    return cancelled


def project_run_create(
    *,
    project: Project,
    actor: Actor,
    objective: str,
    provider_key_id: uuid.UUID | str | None = None,
    model: str = "",
    watch: bool | None = None,
    limits: dict[str, Any] | None = None,
    label: str | None = None,
) -> Run:
    """An agent run on ``project`` (its key and model default to the project's). It waits ``queued`` while another
    run works on the project. ``label``: who started it when no user or key did (a webhook)."""
    key_id = provider_key_id or project.default_provider_key_id
    if not key_id:
        raise ValidationError({"provider_key": "Choose a provider key (the project has no default)."})
    return run_create(
        org=project.org,
        actor=actor,
        provider_key_id=key_id,
        model=model or project.default_model,
        objective=objective,
        kind=RunKind.AGENT,
        watch=watch,
        limits=limits,
        project=project,
        created_by_label=label,
    )


def project_record_run(*, project_id: uuid.UUID, root: Any) -> None:
    """After a run on the project: its workspace's size and the time of its last run (metadata only)."""
    size, _files = usage(root)
    Project.objects.filter(id=project_id).update(workspace_bytes=size, last_run_at=timezone.now())


def project_is_busy(*, project_id: uuid.UUID) -> bool:
    return Run.objects.filter(Q(project_id=project_id), status=RunStatus.RUNNING).exists()
