"""The file tools: confinement (paths.py) and list/read/write/edit/delete/tree/usage (files.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runs.workspaces import (
    FileChange,
    WorkspaceError,
    confine,
    delete_file,
    edit_file,
    list_files,
    read_file,
    run_command,
    tree,
    usage,
    write_file,
)
from runs.workspaces.files import LIST_MAX_ENTRIES, WRITE_MAX_BYTES
from tests.runs.workspaces.conftest import plant

# --- confine ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "..", "sub/../../../etc/passwd"])
def test_confine_refuses_paths_that_climb_out(workspace: Path, bad: str) -> None:
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        confine(workspace, bad)


@pytest.mark.parametrize("bad", ["/etc/x", "/etc/passwd", "/"])
def test_confine_refuses_absolute_paths_and_says_so(workspace: Path, bad: str) -> None:
    with pytest.raises(WorkspaceError, match="absolute paths are not allowed"):
        confine(workspace, bad)


def test_confine_refuses_nul_and_empty(workspace: Path) -> None:
    with pytest.raises(WorkspaceError, match="NUL"):
        confine(workspace, "a\x00b")
    with pytest.raises(WorkspaceError, match="empty"):
        confine(workspace, "  ")


def test_confine_resolves_inside_the_real_root(workspace: Path) -> None:
    assert confine(workspace, "a/b/../c.txt") == workspace / "a" / "c.txt"
    assert confine(workspace, ".") == workspace


def test_confine_error_never_names_the_resolved_host_path(workspace: Path) -> None:
    plant(workspace, "ln -s /etc evil")
    with pytest.raises(WorkspaceError) as info:
        confine(workspace, "evil/passwd")
    assert str(workspace) not in str(info.value)
    assert "/etc/passwd" not in str(info.value)


# --- planted symlinks ------------------------------------------------------------------------------------------


async def test_symlink_to_etc_passwd_planted_by_a_command_is_refused_by_every_tool(workspace: Path) -> None:
    result = await run_command(workspace, "ln -s /etc/passwd leak && ls -l leak", timeout_s=5, mode="none")
    assert result.exit_code == 0
    assert os.path.islink(workspace / "leak")
    before = Path("/etc/passwd").read_bytes()

    for attempt in (
        lambda: read_file(workspace, "leak"),
        lambda: write_file(workspace, "leak", "pwned\n"),
        lambda: edit_file(workspace, "leak", "root", "toor"),
    ):
        with pytest.raises(WorkspaceError, match="outside the workspace"):
            attempt()
    assert Path("/etc/passwd").read_bytes() == before
    # Deleting removes the link itself, never its target.
    assert delete_file(workspace, "leak") == FileChange(path="leak", op="deleted", bytes=0)
    assert not os.path.lexists(workspace / "leak")
    assert Path("/etc/passwd").read_bytes() == before


def test_write_through_a_symlinked_parent_dir_is_refused(workspace: Path, outside: Path) -> None:
    plant(workspace, f"ln -s {outside} linked")
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        write_file(workspace, "linked/new.txt", "x")
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        write_file(workspace, "linked/deeper/new.txt", "x")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_symlink_inside_the_workspace_is_followed_to_its_target(workspace: Path) -> None:
    write_file(workspace, "docs/real.md", "hello\n")
    plant(workspace, "ln -s docs/real.md alias.md")
    assert read_file(workspace, "alias.md") == "     1\thello"
    change = write_file(workspace, "alias.md", "bye\n")
    assert change == FileChange(path="docs/real.md", op="modified", bytes=4)
    assert os.path.islink(workspace / "alias.md")


def test_fifo_is_refused_without_blocking(workspace: Path) -> None:
    plant(workspace, "mkfifo pipe")
    with pytest.raises(WorkspaceError, match="not a regular file"):
        read_file(workspace, "pipe")
    with pytest.raises(WorkspaceError, match="not a regular file"):
        write_file(workspace, "pipe", "x")


# --- write / edit / delete ---------------------------------------------------------------------------------------


def test_write_creates_parents_then_modifies(workspace: Path) -> None:
    assert write_file(workspace, "src/pkg/app.py", "print('hi')\n") == FileChange(
        path="src/pkg/app.py", op="created", bytes=12
    )
    assert (workspace / "src" / "pkg" / "app.py").read_text() == "print('hi')\n"
    assert write_file(workspace, "src/pkg/app.py", "é") == FileChange(path="src/pkg/app.py", op="modified", bytes=2)
    assert oct((workspace / "src" / "pkg" / "app.py").stat().st_mode & 0o777) == oct(0o644)


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership hand-over only happens when the server runs as root")
def test_files_written_as_root_belong_to_the_sandbox_uid(workspace: Path, settings) -> None:
    write_file(workspace, "a/b/c.txt", "x")
    for path in (workspace / "a", workspace / "a" / "b", workspace / "a" / "b" / "c.txt"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (workspace.stat().st_uid, workspace.stat().st_gid)
        assert st.st_uid >= settings.SANDBOX_UID


def test_write_refuses_a_file_over_one_mib(workspace: Path) -> None:
    write_file(workspace, "ok.txt", "a" * WRITE_MAX_BYTES)
    with pytest.raises(WorkspaceError, match="at most 1048576 bytes"):
        write_file(workspace, "big.txt", "a" * (WRITE_MAX_BYTES + 1))
    assert not (workspace / "big.txt").exists()


def test_write_refuses_when_the_workspace_would_exceed_its_byte_cap(workspace: Path, settings) -> None:
    settings.WORKSPACE_MAX_BYTES = 100
    write_file(workspace, "a.txt", "a" * 60)
    with pytest.raises(WorkspaceError, match="over its limit of 100 bytes"):
        write_file(workspace, "b.txt", "b" * 41)
    write_file(workspace, "b.txt", "b" * 40)
    # Overwriting counts the new size, not old + new.
    write_file(workspace, "a.txt", "a" * 60)
    assert usage(workspace) == (100, 2)


def test_write_refuses_when_the_workspace_would_exceed_its_file_cap(workspace: Path, settings) -> None:
    settings.WORKSPACE_MAX_FILES = 3
    for name in ("1", "2", "3"):
        write_file(workspace, name, "x")
    with pytest.raises(WorkspaceError, match="would hold 4 files, over its limit of 3"):
        write_file(workspace, "4", "x")
    write_file(workspace, "3", "overwrite is fine")
    assert usage(workspace)[1] == 3


def test_write_refuses_the_root_and_directories(workspace: Path) -> None:
    (workspace / "d").mkdir()
    with pytest.raises(WorkspaceError, match="directory"):
        write_file(workspace, "d", "x")
    with pytest.raises(WorkspaceError, match="workspace root"):
        write_file(workspace, ".", "x")
    write_file(workspace, "f.txt", "x")
    with pytest.raises(WorkspaceError, match="a parent is not a directory"):
        write_file(workspace, "f.txt/inner.txt", "x")


def test_edit_replaces_exactly_one_occurrence(workspace: Path) -> None:
    write_file(workspace, "f.txt", "alpha beta\ngamma\n")
    assert edit_file(workspace, "f.txt", "beta", "BETA") == FileChange(path="f.txt", op="modified", bytes=17)
    assert (workspace / "f.txt").read_text() == "alpha BETA\ngamma\n"


def test_edit_with_zero_matches_reports_zero_and_changes_nothing(workspace: Path) -> None:
    write_file(workspace, "f.txt", "alpha\n")
    with pytest.raises(WorkspaceError, match=r"\(0 occurrences\)"):
        edit_file(workspace, "f.txt", "omega", "x")
    assert (workspace / "f.txt").read_text() == "alpha\n"


def test_edit_with_two_matches_reports_two_and_changes_nothing(workspace: Path) -> None:
    write_file(workspace, "f.txt", "x = 1\nx = 1\n")
    with pytest.raises(WorkspaceError, match="occurs 2 times"):
        edit_file(workspace, "f.txt", "x = 1", "x = 2")
    assert (workspace / "f.txt").read_text() == "x = 1\nx = 1\n"


def test_edit_missing_file(workspace: Path) -> None:
    with pytest.raises(WorkspaceError, match="No such file"):
        edit_file(workspace, "nope.txt", "a", "b")


def test_delete_refuses_directories_and_missing_files(workspace: Path) -> None:
    write_file(workspace, "d/f.txt", "x")
    with pytest.raises(WorkspaceError, match="is a directory"):
        delete_file(workspace, "d")
    with pytest.raises(WorkspaceError, match="No such file"):
        delete_file(workspace, "d/missing.txt")
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        delete_file(workspace, "../outside.txt")
    assert delete_file(workspace, "d/f.txt") == FileChange(path="d/f.txt", op="deleted", bytes=0)
    assert (workspace / "d").is_dir()
    assert not (workspace / "d" / "f.txt").exists()


# --- read ------------------------------------------------------------------------------------------------------


def test_read_numbers_lines_and_honours_the_range(workspace: Path) -> None:
    write_file(workspace, "f.txt", "one\ntwo\nthree\n")
    assert read_file(workspace, "f.txt") == "     1\tone\n     2\ttwo\n     3\tthree"
    assert read_file(workspace, "f.txt", start_line=2, end_line=2) == "     2\ttwo"
    with pytest.raises(WorkspaceError, match="past the end"):
        read_file(workspace, "f.txt", start_line=9)
    with pytest.raises(WorkspaceError, match="start_line"):
        read_file(workspace, "f.txt", start_line=0)


def test_read_refuses_binary_files(workspace: Path) -> None:
    (workspace / "img.bin").write_bytes(b"\x89PNG\x00\x00data")
    with pytest.raises(WorkspaceError, match="binary"):
        read_file(workspace, "img.bin")


def test_read_refuses_directories_and_missing_files(workspace: Path) -> None:
    (workspace / "d").mkdir()
    with pytest.raises(WorkspaceError, match="directory"):
        read_file(workspace, "d")
    with pytest.raises(WorkspaceError, match="No such file"):
        read_file(workspace, "missing.txt")


def test_read_truncates_at_2000_lines_with_a_note(workspace: Path) -> None:
    write_file(workspace, "long.txt", "".join(f"line {n}\n" for n in range(1, 2501)))
    text = read_file(workspace, "long.txt")
    lines = text.splitlines()
    assert lines[0] == "     1\tline 1"
    assert lines[1999] == "  2000\tline 2000"
    assert lines[-1] == "[… truncated: showing lines 1 to 2000 of 2500. Read on with start_line=2001.]"
    assert len(lines) == 2001
    rest = read_file(workspace, "long.txt", start_line=2001)
    assert rest.splitlines()[-1] == "  2500\tline 2500"


def test_read_truncates_at_100_kb(workspace: Path) -> None:
    write_file(workspace, "wide.txt", ("x" * 999 + "\n") * 300)
    text = read_file(workspace, "wide.txt")
    assert len(text.encode()) <= 100 * 1024 + 200
    assert "truncated" in text.splitlines()[-1]
    assert "of 300" in text.splitlines()[-1]


def test_read_cuts_one_overlong_line(workspace: Path) -> None:
    write_file(workspace, "min.js", "a" * 300_000 + "\nnext\n")
    text = read_file(workspace, "min.js")
    assert "[… line cut at 100 KB]" in text
    assert len(text.encode()) <= 100 * 1024 + 200
    assert read_file(workspace, "min.js", start_line=2) == "     2\tnext"


def test_read_empty_file(workspace: Path) -> None:
    write_file(workspace, "empty.txt", "")
    assert read_file(workspace, "empty.txt") == "[empty file]"


# --- list / tree / usage ---------------------------------------------------------------------------------------


def test_list_files_sorted_tree_skips_noise_and_shows_links(workspace: Path) -> None:
    write_file(workspace, "b.txt", "bb")
    write_file(workspace, "a/x.py", "x")
    write_file(workspace, "a/deep/er/still.txt", "x")
    write_file(workspace, ".git/HEAD", "ref")
    write_file(workspace, "node_modules/m/index.js", "x")
    write_file(workspace, "a/__pycache__/x.pyc", "x")
    plant(workspace, "ln -s /etc/passwd leak")
    assert list_files(workspace) == "\n".join(
        [
            "./",
            "a/",
            "  deep/",
            "    er/",
            "  x.py (1 byte)",
            "b.txt (2 bytes)",
            "leak -> (link, not followed)",
        ]
    )
    assert list_files(workspace, "a", max_depth=1) == "a/\ndeep/\nx.py (1 byte)"


def test_list_files_caps_entries(workspace: Path) -> None:
    for n in range(LIST_MAX_ENTRIES + 7):
        (workspace / f"f{n:04d}").write_text("")
    lines = list_files(workspace).splitlines()
    assert len(lines) == 1 + LIST_MAX_ENTRIES + 1
    assert lines[-1] == "… 7 more"


def test_list_files_refuses_files_and_outside(workspace: Path) -> None:
    write_file(workspace, "f.txt", "x")
    with pytest.raises(WorkspaceError, match="not a directory"):
        list_files(workspace, "f.txt")
    with pytest.raises(WorkspaceError, match="outside"):
        list_files(workspace, "..")


def test_tree_and_usage_count_regular_files_only(workspace: Path, outside: Path) -> None:
    write_file(workspace, "b.txt", "bb")
    write_file(workspace, "a/c.txt", "ccc")
    plant(workspace, f"ln -s /etc/passwd leak && ln -s {outside} outdir && mkfifo pipe")
    assert tree(workspace) == [("a/c.txt", 3), ("b.txt", 2)]
    assert usage(workspace) == (5, 2)


def test_tree_is_capped(workspace: Path) -> None:
    for n in range(2005):
        (workspace / f"f{n:04d}").write_text("")
    assert len(tree(workspace)) == 2000


def test_a_directory_swapped_for_a_link_after_confinement_is_not_followed(workspace: Path, outside: Path) -> None:
    # The window a command running at the same time could use: confine() saw a real directory, then it became a
    # link to the host. Opening walks from the root's fd with O_NOFOLLOW at every level, so the read fails.
    from runs.workspaces.files import _open_regular
    from runs.workspaces.paths import confine

    write_file(workspace, "d/secret.txt", "inside\n")
    target = confine(workspace, "d/secret.txt")
    plant(workspace, f"rm -rf d && ln -s {outside} d")
    with pytest.raises(WorkspaceError):
        _open_regular(workspace, target, "d/secret.txt")


def test_listing_never_follows_a_directory_link(workspace: Path, outside: Path) -> None:
    write_file(workspace, "a.txt", "a\n")
    plant(workspace, f"ln -s {outside} d")
    assert tree(workspace) == [("a.txt", 2)]
    assert usage(workspace) == (2, 1)
