"""Looking for a canary on disk: what the no-temp-file tests of request bodies (tests/test_body_limits.py,
tests/deploy/test_tls_proxy.py) scan."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

MIB = 1024 * 1024


def holds(path: str, canary: bytes) -> bool:
    """Whether the file (or /proc/<pid>/fd/<n>) holds ``canary`` in its first 64 MiB."""
    try:
        with open(path, "rb") as handle:
            return canary in handle.read(64 * MIB)
    except OSError:
        return False


def files_holding(canary: bytes, roots: Iterable[Path], *, since: float) -> list[str]:
    """Regular files under ``roots`` written since ``since`` (a ``time.time()``) that hold ``canary``."""
    found: list[str] = []
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                try:
                    info = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode) and info.st_mtime >= since and holds(path, canary):
                    found.append(path)
    return found
