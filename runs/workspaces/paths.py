"""Path confinement for the file tools (providers.md §2.2): every model-supplied path stays inside the workspace.

The model writes the paths and a sandboxed command may have planted symlinks, so a path is resolved (symlinks
followed) against the workspace's real path and refused unless the result is still inside it. Opening the file
afterwards with ``O_NOFOLLOW`` closes the gap for a link planted at the final component; the remaining race (a link
swapped in between the check and the open) needs a process running at the same time, and the agent loop never
runs a file tool while a command is running.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


class WorkspaceError(Exception):
    """A tool-level failure whose str() is a short, model-safe observation.

    It never contains a host path outside the workspace nor file content: it goes back to the model as the tool
    result and may be shown in the UI.
    """


def show(user_path: str) -> str:
    """The model's own path, quoted and shortened, for error messages (it never names a resolved host path)."""
    return repr(user_path if len(user_path) <= 200 else user_path[:200] + "…")


def real_root(root: Path) -> Path:
    """The workspace's real path: the reference every candidate is compared with."""
    return Path(os.path.realpath(root))


def _validate(user_path: str) -> None:
    if "\x00" in user_path:
        raise WorkspaceError("Invalid path: it contains a NUL byte.")
    if not user_path.strip():
        raise WorkspaceError(
            "Invalid path: it is empty. Use a path relative to the workspace root, such as 'src/app.py'."
        )
    if os.path.isabs(user_path):
        raise WorkspaceError(
            f"Invalid path {show(user_path)}: absolute paths are not allowed. "
            "Use a path relative to the workspace root, such as 'src/app.py'."
        )


def confine(root: Path, user_path: str) -> Path:
    """The absolute, symlink-resolved path of ``user_path`` inside ``root``, or a ``WorkspaceError``.

    Refuses NUL bytes, empty paths and absolute paths (paths are relative to the workspace root), and anything that
    resolves outside the workspace: ``../x``, ``a/../../x`` and a symlink pointing out alike. The result may be the
    root itself (``"."``) and may not exist yet.
    """
    _validate(user_path)
    base = real_root(root)
    try:
        candidate = (base / user_path).resolve()
    except (OSError, RuntimeError):
        # RuntimeError is Python 3.11's "Symlink loop"; OSError covers ELOOP and names that are too long.
        raise WorkspaceError(f"Invalid path {show(user_path)}: it cannot be resolved (symlink loop?).") from None
    if candidate != base and not candidate.is_relative_to(base):
        raise WorkspaceError(f"Invalid path {show(user_path)}: it points outside the workspace.")
    return candidate


def confine_parent(root: Path, user_path: str) -> tuple[Path, str]:
    """The confined, resolved parent directory of ``user_path`` and its final name, the name left unresolved.

    For operations on a directory entry itself, such as deleting a symlink without following it.
    """
    _validate(user_path)
    pure = PurePosixPath(user_path)
    if pure.name in {"", ".", ".."}:
        raise WorkspaceError(f"Invalid path {show(user_path)}: it does not name a file.")
    return confine(root, str(pure.parent)), pure.name


def relative(root: Path, path: Path) -> str:
    """``path`` (already confined) relative to the workspace root, in posix form; ``"."`` for the root."""
    return path.relative_to(real_root(root)).as_posix()
