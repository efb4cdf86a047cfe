"""Workspace directories on disk: naming, permissions, ownership, deletion and orphan discovery."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest

from runs.workspaces import workspace_create, workspace_delete, workspace_ids_on_disk, workspace_path, write_file
from runs.workspaces.storage import sandbox_owner
from tests.runs.workspaces.conftest import plant


def test_workspace_path_is_the_uuid_hex_under_the_root(workspace_root: Path) -> None:
    run_id = uuid.uuid4()
    assert workspace_path(run_id) == workspace_root / run_id.hex
    assert workspace_path(str(run_id)) == workspace_root / run_id.hex


@pytest.mark.parametrize("bad", ["../../etc", "not-a-uuid", "", "0" * 31])
def test_workspace_path_refuses_anything_but_a_uuid(workspace_root: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="Invalid run id"):
        workspace_path(bad)


def test_create_makes_a_private_run_dir_under_a_traversable_root(workspace_root: Path, settings) -> None:
    run_id = uuid.uuid4()
    path = workspace_create(run_id)
    assert path == Path(os.path.realpath(workspace_root / run_id.hex))
    assert stat.S_IMODE(os.stat(workspace_root).st_mode) == 0o711
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    if os.geteuid() == 0:
        # The run's own uid/gid, from the sandbox range.
        assert (path.stat().st_uid, path.stat().st_gid) == sandbox_owner(run_id)
        assert settings.SANDBOX_UID <= path.stat().st_uid < settings.SANDBOX_UID + settings.SANDBOX_UIDS
    else:
        assert path.stat().st_uid == os.geteuid()
    # A retried start finds the same directory.
    assert workspace_create(run_id) == path


def test_delete_removes_everything_and_reports_missing(workspace_root: Path, outside: Path) -> None:
    run_id = uuid.uuid4()
    path = workspace_create(run_id)
    write_file(path, "a/b/c.txt", "x")
    # A link out of the workspace is removed, its target left alone.
    plant(path, f"ln -s {outside} out && mkdir -p locked/inner && touch locked/inner/f && chmod 000 locked")
    assert workspace_delete(run_id) is True
    assert not path.exists()
    assert (outside / "secret.txt").read_text() == "top secret\n"
    assert workspace_delete(run_id) is False


def test_ids_on_disk_lists_only_run_directories(workspace_root: Path) -> None:
    assert workspace_ids_on_disk() == []  # the root does not even exist yet
    first, second = uuid.uuid4(), uuid.uuid4()
    workspace_create(first)
    workspace_create(second)
    (workspace_root / ".selftest-abc").mkdir()
    (workspace_root / "notes").mkdir()
    (workspace_root / uuid.uuid4().hex).write_text("a file, not a workspace")
    assert workspace_ids_on_disk() == sorted([first, second])
    workspace_delete(first)
    assert workspace_ids_on_disk() == [second]
