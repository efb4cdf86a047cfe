"""The agent's file tools (providers.md §2.2): list, read, write, edit and delete inside one workspace.

Every path goes through ``confine`` first. Files are then opened with ``O_NOFOLLOW`` and checked with ``fstat``, and
writes walk the parent directories with ``O_NOFOLLOW`` directory fds, so a symlink a command planted is refused
rather than followed out of the workspace. ``O_NONBLOCK`` keeps a planted fifo from blocking the server on open.
Failures are ``WorkspaceError``s whose text goes back to the model; they name the model's own path, never a host
path or file content. When the server runs as root, what it writes is chowned to the sandbox uid so sandboxed
commands can change it afterwards.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from django.conf import settings

from runs.workspaces.paths import WorkspaceError, confine, confine_parent, real_root, relative, show
from runs.workspaces.storage import workspace_owner

SKIPPED_DIRS = frozenset({".git", "node_modules", "__pycache__"})
LIST_MAX_ENTRIES = 500
LIST_MAX_DEPTH = 10
READ_MAX_LINES = 2000
READ_MAX_BYTES = 100 * 1024
WRITE_MAX_BYTES = 1024 * 1024
TREE_MAX_ENTRIES = 2000
# Like git: a NUL byte in the first 8 KiB means binary.
_BINARY_PROBE_BYTES = 8192

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class FileChange:
    """What a file tool changed: the path relative to the workspace root (posix), the operation, the size after."""

    path: str
    op: Literal["created", "modified", "deleted"]
    bytes: int


def _open_error(exc: OSError, user_path: str) -> WorkspaceError:
    # Only the model's own path and the errno's generic text: never the resolved host path.
    if exc.errno == errno.ENOENT:
        return WorkspaceError(f"No such file: {show(user_path)}.")
    if exc.errno == errno.ELOOP:
        return WorkspaceError(f"Refused: {show(user_path)} is a symbolic link; file tools do not follow links.")
    if exc.errno == errno.ENXIO:
        return WorkspaceError(f"Refused: {show(user_path)} is not a regular file.")
    if exc.errno == errno.EISDIR:
        return WorkspaceError(f"{show(user_path)} is a directory.")
    if exc.errno == errno.ENOTDIR:
        return WorkspaceError(f"Invalid path {show(user_path)}: a parent is not a directory.")
    return WorkspaceError(f"Cannot access {show(user_path)}: {os.strerror(exc.errno or errno.EIO)}.")


def _open_beneath(base: Path, target: Path, flags: int) -> int:
    """Open ``target`` (a confined path under the real root ``base``) one component at a time from a directory fd
    on ``base``, never following a symlink at any depth. ``confine`` checked the path as it was; a command running
    at the same time (a project's run while someone browses its files) could swap a directory for a link between
    that check and a plain ``open``, which follows links in every component but the last."""
    parts = target.relative_to(base).parts
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return os.open(parts[-1] if parts else ".", flags, dir_fd=fd)
    finally:
        os.close(fd)


def _open_regular(root: Path, target: Path, user_path: str) -> int:
    """An O_RDONLY fd on a regular file that is not a symlink (at any depth), or a WorkspaceError."""
    try:
        fd = _open_beneath(real_root(root), target, _READ_FLAGS)
    except OSError as exc:
        raise _open_error(exc, user_path) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise WorkspaceError(f"{show(user_path)} is a directory; use list_files to see what it contains.")
        raise WorkspaceError(f"Refused: {show(user_path)} is not a regular file.")
    return fd


def _lines(fh: IO[bytes], limit: int) -> Iterator[tuple[bytes, bool]]:
    """Each line's first ``limit`` bytes (without the newline) and whether it was cut; memory stays bounded."""
    while True:
        piece = fh.readline(limit)
        if not piece:
            return
        if piece.endswith(b"\n"):
            yield piece.rstrip(b"\r\n"), False
            continue
        if len(piece) < limit:  # the last line, without a newline
            yield piece.rstrip(b"\r"), False
            return
        rest = piece
        while rest and not rest.endswith(b"\n"):  # skip the remainder of an overlong line
            rest = fh.readline(limit)
        yield piece, True


def read_file(root: Path, path: str, start_line: int | None = None, end_line: int | None = None) -> str:
    """The file's lines numbered like ``cat -n``, from ``start_line`` to ``end_line`` (1-based, inclusive).

    At most 2,000 lines and about 100 KB come back, with a note saying how to read on. Binary files (a NUL byte in the
    first 8 KiB) and anything but a regular file are refused.
    """
    first = 1 if start_line is None else start_line
    if first < 1:
        raise WorkspaceError("start_line must be 1 or more.")
    if end_line is not None and end_line < first:
        raise WorkspaceError("end_line must not be before start_line.")
    target = confine(root, path)
    with os.fdopen(_open_regular(root, target, path), "rb") as fh:
        if b"\x00" in fh.read(_BINARY_PROBE_BYTES):
            raise WorkspaceError(f"Refused: {show(path)} looks like a binary file (it contains NUL bytes).")
        fh.seek(0)
        out: list[str] = []
        used = 0
        lineno = 0
        stopped_at: int | None = None
        for raw, cut in _lines(fh, READ_MAX_BYTES):
            lineno += 1
            if lineno < first:
                continue
            if end_line is not None and lineno > end_line:
                break
            text = f"{lineno:>6}\t{raw.decode('utf-8', 'replace')}" + (" [… line cut at 100 KB]" if cut else "")
            size = len(text.encode("utf-8")) + 1
            if len(out) >= READ_MAX_LINES or (out and used + size > READ_MAX_BYTES):
                stopped_at = lineno
                break
            out.append(text)
            used += size
        if stopped_at is not None:
            total = stopped_at + sum(1 for _ in _lines(fh, READ_MAX_BYTES))
            out.append(
                f"[… truncated: showing lines {first} to {stopped_at - 1} of {total}. "
                f"Read on with start_line={stopped_at}.]"
            )
    if lineno == 0:
        return "[empty file]"
    if not out:
        raise WorkspaceError(f"start_line {first} is past the end of {show(path)} ({lineno} lines).")
    return "\n".join(out)


def _fmt_size(size: int) -> str:
    return f"{size} bytes" if size != 1 else "1 byte"


def list_files(root: Path, path: str = ".", max_depth: int = 3) -> str:
    """A sorted, indented tree of ``path`` down to ``max_depth`` levels, directories ending in ``/``.

    Skips ``.git``, ``node_modules`` and ``__pycache__``; shows symlinks without following them; stops after 500
    entries with an "… N more" line.
    """
    if max_depth < 1:
        raise WorkspaceError("max_depth must be 1 or more.")
    depth_limit = min(max_depth, LIST_MAX_DEPTH)
    target = confine(root, path)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        raise WorkspaceError(f"No such directory: {show(path)}.") from None
    if not stat.S_ISDIR(st.st_mode):
        raise WorkspaceError(f"{show(path)} is a file, not a directory; use read_file to read it.")
    rel = relative(root, target)
    lines = ["./" if rel == "." else f"{rel}/"]
    shown = 0
    more = 0

    def walk(directory: str, depth: int) -> None:
        nonlocal shown, more
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            if shown < LIST_MAX_ENTRIES:
                lines.append("  " * depth + "[unreadable directory]")
            return
        for entry in entries:
            is_dir = entry.is_dir(follow_symlinks=False)
            if is_dir and entry.name in SKIPPED_DIRS:
                continue
            if shown >= LIST_MAX_ENTRIES:
                more += 1
            else:
                shown += 1
                lines.append("  " * depth + _describe(entry, is_dir))
            if is_dir and depth + 1 < depth_limit:
                walk(entry.path, depth + 1)

    walk(os.fspath(target), 0)
    if shown == 0:
        lines.append("  [empty directory]")
    if more:
        lines.append(f"… {more} more")
    return "\n".join(lines)


def _describe(entry: os.DirEntry[str], is_dir: bool) -> str:
    if is_dir:
        return f"{entry.name}/"
    if entry.is_symlink():
        return f"{entry.name} -> (link, not followed)"
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return f"{entry.name} (unreadable)"
    if stat.S_ISREG(st.st_mode):
        return f"{entry.name} ({_fmt_size(st.st_size)})"
    return f"{entry.name} (not a regular file)"


def _regular_files(base: Path) -> Iterator[tuple[str, int]]:
    """(relative posix path, size) of each regular file under ``base``; walked with directory fds (``os.fwalk``)
    and lstat relative to them, so a directory swapped for a link while we walk is never followed."""
    if not os.path.isdir(base):
        return
    for dirpath, dirnames, filenames, dirfd in os.fwalk(base, follow_symlinks=False):
        dirnames.sort()
        relative = Path(dirpath).relative_to(base)
        for name in sorted(filenames):
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield (relative / name).as_posix(), st.st_size


def read_text(root: Path, path: str, *, max_bytes: int) -> str:
    """A text file's content as it is (for people and API clients; ``read_file`` is the model's numbered view).
    Confined like every file tool; refuses binary files, invalid UTF-8, non-regular files and files over
    ``max_bytes`` with a WorkspaceError."""
    target = confine(root, path)
    with os.fdopen(_open_regular(root, target, path), "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise WorkspaceError(f"Refused: {show(path)} is larger than {max_bytes:,} bytes.")
    if b"\x00" in data:
        raise WorkspaceError(f"Refused: {show(path)} looks like a binary file (it contains NUL bytes).")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise WorkspaceError(f"Refused: {show(path)} is not UTF-8 text.") from None


def tree(root: Path) -> list[tuple[str, int]]:
    """Every regular file as (relative posix path, bytes), sorted; symlinks and special files skipped.

    Capped at 2,000 entries (the walk stops there, so a huge workspace costs no more than that).
    """
    found: list[tuple[str, int]] = []
    for item in _regular_files(real_root(root)):
        if len(found) >= TREE_MAX_ENTRIES:
            break
        found.append(item)
    return sorted(found)


def usage(root: Path) -> tuple[int, int]:
    """(total bytes, file count) of the regular files in the workspace, by lstat (links are not followed)."""
    total = 0
    count = 0
    for _path, size in _regular_files(real_root(root)):
        total += size
        count += 1
    return total, count


def _existing_size(target: Path, user_path: str) -> int | None:
    """The current size of the file at ``target``, None if there is none; refuses directories and special files."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _open_error(exc, user_path) from None
    if stat.S_ISDIR(st.st_mode):
        raise WorkspaceError(f"{show(user_path)} is a directory; write_file writes files only.")
    if not stat.S_ISREG(st.st_mode):
        raise WorkspaceError(f"Refused: {show(user_path)} is not a regular file.")
    return st.st_size


def _check_caps(root: Path, old_size: int | None, new_size: int) -> None:
    total, count = usage(root)
    total += new_size - (old_size or 0)
    count += 0 if old_size is not None else 1
    max_bytes = int(settings.WORKSPACE_MAX_BYTES)
    max_files = int(settings.WORKSPACE_MAX_FILES)
    if total > max_bytes:
        raise WorkspaceError(
            f"Refused: the workspace would hold {total} bytes, over its limit of {max_bytes} bytes. "
            "Delete files you no longer need first."
        )
    if count > max_files:
        raise WorkspaceError(
            f"Refused: the workspace would hold {count} files, over its limit of {max_files}. "
            "Delete files you no longer need first."
        )


def _open_parent(base: Path, target: Path, user_path: str, owner: tuple[int, int] | None) -> int:
    """An fd on ``target``'s parent directory, creating missing directories; no symlink is followed on the way.

    Walking with O_NOFOLLOW directory fds is the race-free form of "makedirs, then re-resolve the parent": a link
    swapped in after ``confine`` makes the open fail instead of leading outside. The final fd is still re-resolved
    through /proc and checked against the workspace, as a second, independent check.
    """
    fd = os.open(base, _DIR_FLAGS)
    try:
        for part in target.parent.relative_to(base).parts:
            created = False
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
                created = True
            except FileExistsError:
                pass
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise WorkspaceError(
                        f"Refused: a parent of {show(user_path)} is a symbolic link or not a directory."
                    ) from None
                raise _open_error(exc, user_path) from None
            os.close(fd)
            fd = child
            if created and owner is not None:
                os.fchown(fd, *owner)
        resolved = Path(os.path.realpath(f"/proc/self/fd/{fd}"))
        if resolved != base and not resolved.is_relative_to(base):
            raise WorkspaceError(f"Invalid path {show(user_path)}: it points outside the workspace.")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write(root: Path, target: Path, user_path: str, data: bytes) -> FileChange:
    base = real_root(root)
    if target == base:
        raise WorkspaceError(f"{show(user_path)} is the workspace root, not a file.")
    old_size = _existing_size(target, user_path)
    _check_caps(root, old_size, len(data))
    owner = workspace_owner(base)
    parent_fd = _open_parent(base, target, user_path, owner)
    try:
        try:
            fd = os.open(target.name, _WRITE_FLAGS, 0o644, dir_fd=parent_fd)
        except OSError as exc:
            raise _open_error(exc, user_path) from None
    finally:
        os.close(parent_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise WorkspaceError(f"Refused: {show(user_path)} is not a regular file.")
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return FileChange(path=relative(root, target), op="created" if old_size is None else "modified", bytes=len(data))


def _encode(content: str) -> bytes:
    try:
        data = content.encode("utf-8")
    except UnicodeEncodeError:
        raise WorkspaceError("Refused: the content is not valid Unicode text.") from None
    if len(data) > WRITE_MAX_BYTES:
        raise WorkspaceError(
            f"Refused: the content is {len(data)} bytes; "
            f"a single file may hold at most {WRITE_MAX_BYTES} bytes (1 MiB)."
        )
    return data


def write_file(root: Path, path: str, content: str) -> FileChange:
    """Create or overwrite ``path`` with ``content`` (UTF-8), creating parent directories.

    Refused over 1 MiB, or when the workspace would exceed ``WORKSPACE_MAX_BYTES`` or ``WORKSPACE_MAX_FILES``.
    """
    data = _encode(content)
    return _write(root, confine(root, path), path, data)


def edit_file(root: Path, path: str, old_str: str, new_str: str) -> FileChange:
    """Replace the one occurrence of ``old_str`` with ``new_str``; refused (saying the count) unless there is one."""
    if not old_str:
        raise WorkspaceError("old_str must not be empty.")
    target = confine(root, path)
    with os.fdopen(_open_regular(root, target, path), "rb") as fh:
        raw = fh.read(WRITE_MAX_BYTES + 1)
    if len(raw) > WRITE_MAX_BYTES:
        raise WorkspaceError(f"Refused: {show(path)} is over 1 MiB; edit it with a command instead.")
    if b"\x00" in raw:
        raise WorkspaceError(f"Refused: {show(path)} looks like a binary file (it contains NUL bytes).")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WorkspaceError(f"Refused: {show(path)} is not UTF-8 text.") from None
    count = text.count(old_str)
    if count == 0:
        raise WorkspaceError(f"old_str was not found in {show(path)} (0 occurrences); nothing was changed.")
    if count > 1:
        raise WorkspaceError(
            f"old_str occurs {count} times in {show(path)}; it must occur exactly once. "
            "Include more surrounding lines to make it unique. Nothing was changed."
        )
    return _write(root, target, path, _encode(text.replace(old_str, new_str, 1)))


def delete_file(root: Path, path: str) -> FileChange:
    """Delete a file; a symlink is removed itself, never followed. Directories are refused."""
    parent, name = confine_parent(root, path)
    target = parent / name
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        raise WorkspaceError(f"No such file: {show(path)}.") from None
    if stat.S_ISDIR(st.st_mode):
        raise WorkspaceError(
            f"{show(path)} is a directory; delete_file removes single files. Remove directories with a command."
        )
    try:
        os.unlink(target)
    except OSError as exc:
        raise _open_error(exc, path) from None
    return FileChange(path=relative(root, target), op="deleted", bytes=0)
