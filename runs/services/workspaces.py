"""Writes for agent-run workspaces: their life (live, available, downloading, downloaded, expired), the download
lease, and the retention sweep every executor runs. Files themselves are ``runs.workspaces``' business."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from runs.models import TERMINAL_STATUSES, Project, Run, WorkspaceState
from runs.workspaces import (
    project_workspace_delete,
    project_workspace_ids_on_disk,
    workspace_delete,
    workspace_ids_on_disk,
)

logger = logging.getLogger(__name__)


def run_workspace_opened(*, run_id: uuid.UUID, sandbox_mode: str, project: bool = False) -> None:
    """The executor is about to create the run's workspace: from now on it is ``live`` (recorded first, so a
    directory on disk always has a row saying whose it is). A project run works in the project's workspace, whose
    life is the project's: the run records only how its commands were sandboxed."""
    if project:
        Run.objects.filter(id=run_id).update(sandbox_mode=sandbox_mode[:16])
        return
    Run.objects.filter(id=run_id).update(workspace_state=WorkspaceState.LIVE, sandbox_mode=sandbox_mode[:16])


def run_workspace_closed(*, run_id: uuid.UUID) -> Run:
    """The run ended: its workspace can be downloaded until ``WORKSPACE_TTL_SECONDS`` from now."""
    expires = timezone.now() + timedelta(seconds=settings.WORKSPACE_TTL_SECONDS)
    Run.objects.filter(id=run_id, workspace_state=WorkspaceState.LIVE).update(
        workspace_state=WorkspaceState.AVAILABLE, workspace_expires_at=expires
    )
    return Run.objects.get(id=run_id)


WORKSPACE_BUSY = "workspace_busy"
# How long a download holds its workspace without renewing (it renews every DOWNLOAD_LEASE / 4 while streaming).
DOWNLOAD_LEASE = timedelta(minutes=10)


@transaction.atomic
def run_workspace_download_begin(*, run: Run) -> None:
    """Lease the workspace to one download (``downloading``): a second download, or the retention sweep, waits
    until it ends instead of reading or deleting files under it. ValidationError ``workspace_busy`` when another
    download holds it; ``workspace_deleted`` when it is gone."""
    locked = Run.objects.select_for_update().get(id=run.id)
    now = timezone.now()
    leased = locked.workspace_lease_until is not None and locked.workspace_lease_until > now
    if locked.workspace_state == WorkspaceState.DOWNLOADING and leased:
        raise ValidationError("Another download of this workspace is in progress.", code=WORKSPACE_BUSY)
    if locked.workspace_state not in (WorkspaceState.AVAILABLE, WorkspaceState.DOWNLOADING):
        raise ValidationError("This workspace is gone.", code="workspace_deleted")
    locked.workspace_state = WorkspaceState.DOWNLOADING
    locked.workspace_lease_until = now + DOWNLOAD_LEASE
    locked.save(update_fields=["workspace_state", "workspace_lease_until"])


def run_workspace_download_renew(*, run: Run) -> None:
    """A download still streaming keeps its lease."""
    Run.objects.filter(id=run.id, workspace_state=WorkspaceState.DOWNLOADING).update(
        workspace_lease_until=timezone.now() + DOWNLOAD_LEASE
    )


def run_workspace_download_abandoned(*, run: Run) -> None:
    """The download did not complete (the client went away): the workspace is downloadable again."""
    Run.objects.filter(id=run.id, workspace_state=WorkspaceState.DOWNLOADING).update(
        workspace_state=WorkspaceState.AVAILABLE
    )


@transaction.atomic
def run_workspace_downloaded(*, run: Run) -> bool:
    """A complete download of the workspace went out: delete it now. True if this call deleted it."""
    locked = Run.objects.select_for_update().get(id=run.id)
    if locked.workspace_state != WorkspaceState.DOWNLOADING:
        return False
    workspace_delete(locked.id)
    locked.workspace_state = WorkspaceState.DOWNLOADED
    locked.workspace_deleted_at = timezone.now()
    locked.save(update_fields=["workspace_state", "workspace_deleted_at"])
    logger.info("run %s: workspace downloaded and deleted", run.id)
    return True


def workspaces_purge() -> int:
    """Delete every workspace whose retention rule says so; returns how many directories went. Idempotent, safe
    to run from any process at any time (``manage.py purge_workspaces``, every executor's supervision loop):

    * downloadable ones past ``workspace_expires_at`` → ``expired``;
    * ``live`` ones whose run is no longer running (its process died, or it ended without closing it) → ``expired``;
    * directories no run claims (left by a crash between two steps, or by a run since deleted).
    """
    now = timezone.now()
    deleted = 0
    with transaction.atomic():
        stale = Run.objects.select_for_update(skip_locked=True).filter(
            Q(workspace_state=WorkspaceState.AVAILABLE, workspace_expires_at__lt=now)
            | Q(workspace_state=WorkspaceState.LIVE, status__in=TERMINAL_STATUSES)
            # Past its window, and no download holds it any more (its client or process vanished).
            | Q(workspace_state=WorkspaceState.DOWNLOADING, workspace_expires_at__lt=now, workspace_lease_until__lt=now)
        )
        for run in stale:
            deleted += workspace_delete(run.id)
            run.workspace_state = WorkspaceState.EXPIRED
            run.workspace_deleted_at = now
            run.save(update_fields=["workspace_state", "workspace_deleted_at"])
    # Project workspaces whose project is gone (a delete that could not remove the tree while a command wrote in it).
    project_dirs = project_workspace_ids_on_disk()
    if project_dirs:
        live_projects = set(Project.objects.filter(id__in=project_dirs).values_list("id", flat=True))
        for project_id in project_dirs:
            if project_id not in live_projects:
                deleted += project_workspace_delete(project_id)
    on_disk = workspace_ids_on_disk()
    if on_disk:
        kept = set(
            Run.objects.filter(
                id__in=on_disk,
                workspace_state__in=[WorkspaceState.LIVE, WorkspaceState.AVAILABLE, WorkspaceState.DOWNLOADING],
            ).values_list("id", flat=True)
        )
        for run_id in on_disk:
            if run_id not in kept:
                deleted += workspace_delete(run_id)
    if deleted:
        logger.info("purged %d workspace(s)", deleted)
    return deleted
