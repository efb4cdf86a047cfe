"""Workspace directories on disk: one per agent run, under ``settings.WORKSPACE_ROOT``, named by the run's uuid hex.

The root is created ``0o711``: the sandbox uid must be able to traverse it to reach its own run directory (bwrap
binds the run directory from inside the sandbox's uid), but not list the other runs. Each run directory is
``0o700`` and, when the server runs as root, owned by the sandbox uid so sandboxed commands can write there.
Names come only from validated uuids, never from raw input, so no path here is model-controlled.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import uuid
from pathlib import Path

from django.conf import settings

logger = logging.getLogger("cesaflow.workspaces")

_RUN_DIR_NAME = re.compile(r"[0-9a-f]{32}")
_rmtree_checked = False


def sandbox_owner(run_id: uuid.UUID | str | None = None) -> tuple[int, int] | None:
    """(uid, gid) a run's sandboxed commands run as, or None when the server does not run as root (commands then
    run as the server's own uid, and ownership is already right).

    Each run has its own pair from ``[SANDBOX_UID, SANDBOX_UID + SANDBOX_UIDS)``, derived from its id, so runs
    cannot exhaust each other's process limit or touch each other's processes. ``run_id=None``: the base pair
    (the self-test's probe).
    """
    if os.geteuid() != 0:
        return None
    offset = 0 if run_id is None else _run_uuid(run_id).int % int(settings.SANDBOX_UIDS)
    return int(settings.SANDBOX_UID) + offset, int(settings.SANDBOX_GID) + offset


def workspace_owner(workspace: Path) -> tuple[int, int] | None:
    """Who a workspace's files belong to and its commands run as: the owner of its directory (set by
    ``workspace_create``), or None when the server does not run as root. Never root."""
    if os.geteuid() != 0:
        return None
    st = os.stat(workspace)
    if st.st_uid == 0 or st.st_gid == 0:
        raise RuntimeError("A workspace owned by root: refusing to act for it.")
    return st.st_uid, st.st_gid


def _run_uuid(run_id: uuid.UUID | str) -> uuid.UUID:
    if isinstance(run_id, uuid.UUID):
        return run_id
    try:
        return uuid.UUID(str(run_id))
    except ValueError:
        raise ValueError("Invalid run id for a workspace.") from None


def workspace_root() -> Path:
    """The configured workspace root (read at call time: tests and deployments override it)."""
    return Path(settings.WORKSPACE_ROOT)


def workspace_path(run_id: uuid.UUID | str) -> Path:
    """Where the workspace of ``run_id`` lives (it may not exist). Raises ValueError for anything but a uuid."""
    return workspace_root() / _run_uuid(run_id).hex


def ensure_root() -> Path:
    """Create the workspace root if needed (``0o711``: traversable by the sandbox uid, not listable)."""
    root = workspace_root()
    if not root.is_dir():
        root.mkdir(mode=0o711, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask; set it exactly so the sandbox uid can traverse.
        os.chmod(root, 0o711)  # noqa: S103 - traverse-only for others, by design (see the module docstring)
    return root


def untraversable_ancestor(path: Path) -> Path | None:
    """The first directory on the way to ``path`` (from ``/`` down) that other users may not traverse (no ``o+x``),
    if any: a sandbox uid, a user of its own, cannot reach a workspace below it. A clone in a home directory only
    its owner may enter (``/root``; Debian 12's homes are ``0700``) puts ``var/workspaces`` there (``make run``)."""
    for directory in [*reversed(path.parents), path]:
        try:
            mode = directory.stat().st_mode
        except OSError:
            return None
        if not mode & stat.S_IXOTH:
            return directory
    return None


def project_workspace_path(project_id: uuid.UUID | str) -> Path:
    """Where a named project's persistent workspace lives: ``<root>/projects/<uuid hex>`` (never swept as an
    orphan: orphans are run directories directly under the root)."""
    return workspace_root() / "projects" / _run_uuid(project_id).hex


def project_workspace_create(project_id: uuid.UUID | str) -> Path:
    """Create (or find) a project's workspace, owned by the project's own sandbox uid: the realpath."""
    path = project_workspace_path(project_id)
    ensure_root()
    parent = path.parent
    if not parent.is_dir():
        parent.mkdir(mode=0o711, exist_ok=True)
        os.chmod(parent, 0o711)  # noqa: S103 - traverse-only for the sandbox uids, like the root
    return _owned_dir(path, sandbox_owner(project_id))


def project_workspace_delete(project_id: uuid.UUID | str) -> bool:
    """Delete a project's workspace (symlink-attack resistant). True if something was deleted."""
    return _delete_tree(project_workspace_path(project_id))


def workspace_create(run_id: uuid.UUID | str) -> Path:
    """Create the run's workspace directory (``0o700``, owned by the sandbox uid when we are root); its realpath.

    Creating an existing workspace is not an error (a retried start), but it must be a real directory.
    """
    path = workspace_path(run_id)
    ensure_root()
    return _owned_dir(path, sandbox_owner(run_id))


def _owned_dir(path: Path, owner: tuple[int, int] | None) -> Path:
    """``path`` as a private directory (0o700) of ``owner`` (when we are root); its realpath. An existing one is
    fine (a retried start, a project's next run) as long as it is a real directory, not a link."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise
    if owner is not None:
        os.chown(path, *owner, follow_symlinks=False)
    return Path(os.path.realpath(path))


def _require_safe_rmtree() -> None:
    # providers.md §2.2.7: only the fd-based rmtree is safe against a command that swaps a directory for a symlink
    # while we delete. It is on Linux; refuse to delete anything on a platform where it is not.
    global _rmtree_checked
    if not _rmtree_checked:
        if not shutil.rmtree.avoids_symlink_attacks:
            raise RuntimeError("shutil.rmtree is not symlink-attack resistant on this platform.")
        _rmtree_checked = True


def _unlock_directories(path: Path) -> None:
    # A command may leave directories without write or search permission (chmod 000); when the server is not root
    # it could then not empty them. Directories only, never through a symlink (os.walk does not follow them).
    for dirpath, dirnames, _filenames in os.walk(path, followlinks=False):
        for name in dirnames:
            child = os.path.join(dirpath, name)
            if not os.path.islink(child):
                os.chmod(child, 0o700)


def workspace_delete(run_id: uuid.UUID | str) -> bool:
    """Delete the run's workspace and everything in it. True if something was deleted, False if it was missing."""
    return _delete_tree(workspace_path(run_id))


def _delete_tree(path: Path) -> bool:
    _require_safe_rmtree()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return True
    try:
        shutil.rmtree(path)
    except OSError:
        os.chmod(path, 0o700)
        _unlock_directories(path)
        shutil.rmtree(path)
    logger.info("workspace deleted")
    return True


def project_workspace_ids_on_disk() -> list[uuid.UUID]:
    """Project ids that have a workspace directory under ``<root>/projects`` (for the orphan sweep), sorted."""
    return _uuid_dirs(workspace_root() / "projects")


def workspace_ids_on_disk() -> list[uuid.UUID]:
    """Run ids that have a workspace directory under the root (for orphan cleanup), sorted."""
    return _uuid_dirs(workspace_root())


def _uuid_dirs(root: Path) -> list[uuid.UUID]:
    try:
        with os.scandir(root) as entries:
            return sorted(
                uuid.UUID(hex=entry.name)
                for entry in entries
                if _RUN_DIR_NAME.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
            )
    except FileNotFoundError:
        return []
