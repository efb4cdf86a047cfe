"""Workspace fixtures: a fresh workspace root under /tmp for each test, and one run's workspace in it.

The root must be traversable by the sandbox uid (bwrap runs as 65534 when the tests run as root and has to reach
the run directory it binds), so it is a 0o711 directory directly under /tmp, not pytest's 0700 ``tmp_path``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runs.workspaces import workspace_create


@pytest.fixture
def workspace_root(settings) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="cesaflow-ws-test-", dir="/tmp"))
    root.chmod(0o711)
    settings.WORKSPACE_ROOT = root / "workspaces"
    yield settings.WORKSPACE_ROOT
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workspace(workspace_root: Path) -> Path:
    return workspace_create(uuid.uuid4())


@pytest.fixture
def outside() -> Iterator[Path]:
    """A directory outside every workspace, holding a secret file that must never be reached."""
    path = Path(tempfile.mkdtemp(prefix="cesaflow-outside-", dir="/tmp"))
    (path / "secret.txt").write_text("top secret\n")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def plant(workspace: Path, script: str) -> None:
    """Do what a sandboxed command could do (plant links, fifos), as the workspace's owner, without the sandbox."""
    st = workspace.stat()
    subprocess.run(
        ["bash", "-c", script],
        cwd=workspace,
        check=True,
        user=st.st_uid if os.geteuid() == 0 else None,
        group=st.st_gid if os.geteuid() == 0 else None,
        extra_groups=[] if os.geteuid() == 0 else None,
        env={"PATH": "/usr/bin:/bin"},
    )
