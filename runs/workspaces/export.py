"""The workspace as a zip, built on the fly and streamed in chunks (providers.md §2.2.6).

Nothing is written to disk: ``zipfile`` writes into a non-seekable in-memory sink (so it uses data descriptors) and
the sink is drained after each block. Only regular files go in. A command can plant ``ln -s /etc/passwd leak`` or a
link to the app's settings or database, so the walk never follows links, skips symlinks, fifos, devices and
sockets, and opens each file with ``O_NOFOLLOW`` and checks it again with ``fstat``.
"""

from __future__ import annotations

import logging
import os
import stat
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from runs.workspaces.paths import WorkspaceError, real_root

logger = logging.getLogger("cesaflow.workspaces")

_BLOCK = 64 * 1024
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Zip timestamps cannot predate 1980.
_ZIP_EPOCH = time.mktime((1980, 1, 1, 0, 0, 0, 0, 0, -1))


class ExportTooLarge(WorkspaceError):
    """The workspace holds more than the export allows; callers check ``usage()`` first, this is the backstop."""


class _Sink:
    """A write-only, non-seekable buffer: zipfile sees no ``tell``/``seek`` and streams with data descriptors."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes, /) -> int:
        self._parts.append(bytes(data))
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def drain(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        self.size = 0
        return data


def _members(base: Path) -> Iterator[tuple[str, int]]:
    """(arcname, open read-only fd) of every regular file under ``base``, sorted per directory; the caller closes
    each fd. Walked with directory fds (``os.fwalk``) and opened relative to them with ``O_NOFOLLOW``: a directory
    swapped for a symlink during the walk is never followed, at any depth, not only at the last component. Names
    that are not UTF-8 (a command can create them) cannot be stored in a zip portably and are left out."""
    if not os.path.isdir(base):
        return  # a workspace nothing was ever written to: an empty zip
    for dirpath, dirnames, filenames, dirfd in os.fwalk(base, follow_symlinks=False):
        dirnames.sort()
        relative = Path(dirpath).relative_to(base)
        for name in sorted(filenames):
            arcname = (relative / name).as_posix()
            try:
                arcname.encode("utf-8")
            except UnicodeEncodeError:
                logger.info("workspace export: a file name that is not UTF-8 was left out")
                continue
            try:
                fd = os.open(name, _READ_FLAGS, dir_fd=dirfd)
            except OSError:
                continue  # vanished, or swapped for a link or a fifo since the listing
            yield arcname, fd


def _too_large(max_bytes: int) -> ExportTooLarge:
    return ExportTooLarge(f"The workspace is larger than the export limit of {max_bytes} bytes.")


def zip_chunks(root: Path, *, max_bytes: int) -> Iterator[bytes]:
    """Yield a deflated zip of the workspace's regular files (relative, sorted arcnames) in chunks.

    Raises ``ExportTooLarge`` before more than ``max_bytes`` of file content has been read.
    """
    base = real_root(root)
    sink = _Sink()
    archive = zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_DEFLATED)
    read_total = 0
    files = 0
    for arcname, fd in _members(base):
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            if read_total + st.st_size > max_bytes:
                raise _too_large(max_bytes)
            info = zipfile.ZipInfo(arcname, date_time=time.localtime(max(st.st_mtime, _ZIP_EPOCH))[:6])
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | (st.st_mode & 0o755)) << 16
            with archive.open(info, mode="w") as member:
                while block := fh.read(_BLOCK):
                    read_total += len(block)
                    if read_total > max_bytes:  # the file grew after the fstat
                        raise _too_large(max_bytes)
                    member.write(block)
                    if sink.size >= _BLOCK:
                        yield sink.drain()
        files += 1
        if sink.size >= _BLOCK:
            yield sink.drain()
    archive.close()
    logger.info("workspace exported: %d files, %d bytes", files, read_total)
    yield sink.drain()
