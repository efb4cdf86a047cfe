"""The streamed zip export: round trip, chunking, no links or special files, the size cap."""

from __future__ import annotations

import io
import os
import secrets
import zipfile
from pathlib import Path

import pytest

from runs.workspaces import ExportTooLarge, WorkspaceError, write_file, zip_chunks
from tests.runs.workspaces.conftest import plant


def _unzip(chunks: list[bytes]) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as archive:
        assert archive.testzip() is None
        return {info.filename: archive.read(info) for info in archive.infolist()}


def test_zip_round_trips_regular_files_with_sorted_relative_names(workspace: Path) -> None:
    write_file(workspace, "src/app.py", "print('hi')\n")
    write_file(workspace, "README.md", "# Demo\n")
    (workspace / "blob.bin").write_bytes(bytes(range(256)) * 1000)
    write_file(workspace, "src/empty.txt", "")
    chunks = list(zip_chunks(workspace, max_bytes=10 * 1024 * 1024))
    files = _unzip(chunks)
    assert list(files) == ["README.md", "blob.bin", "src/app.py", "src/empty.txt"]
    assert files["src/app.py"] == b"print('hi')\n"
    assert files["blob.bin"] == bytes(range(256)) * 1000
    assert files["src/empty.txt"] == b""
    with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}


def test_zip_streams_in_several_chunks(workspace: Path) -> None:
    (workspace / "random.bin").write_bytes(os.urandom(300_000))  # incompressible: forces several chunks
    chunks = list(zip_chunks(workspace, max_bytes=10 * 1024 * 1024))
    assert len(chunks) > 2
    assert len(_unzip(chunks)["random.bin"]) == 300_000


def test_zip_leaves_out_symlinks_and_fifos(workspace: Path, outside: Path) -> None:
    write_file(workspace, "keep.txt", "keep")
    plant(workspace, f"ln -s /etc/passwd leak && ln -s {outside} outdir && mkfifo pipe && ln -s keep.txt alias")
    files = _unzip(list(zip_chunks(workspace, max_bytes=1024 * 1024)))
    assert list(files) == ["keep.txt"]
    assert b"root:" not in b"".join(files.values())
    assert b"top secret" not in b"".join(files.values())


def test_zip_raises_before_reading_past_the_cap(workspace: Path) -> None:
    write_file(workspace, "a.txt", "a" * 600)
    write_file(workspace, "b.txt", "b" * 600)
    with pytest.raises(ExportTooLarge, match="export limit of 1000 bytes") as info:
        list(zip_chunks(workspace, max_bytes=1000))
    assert isinstance(info.value, WorkspaceError)
    assert len(list(zip_chunks(workspace, max_bytes=1200))) >= 1


def test_a_file_name_that_is_not_utf8_is_left_out_and_the_rest_still_exports(workspace: Path) -> None:
    write_file(workspace, "ok.txt", "fine\n")
    # What `touch $'\xff'` in a command leaves behind: zip member names must be text.
    plant(workspace, "touch $'\\xff'")
    assert os.path.exists(os.path.join(os.fsencode(workspace), b"\xff"))
    archive = zipfile.ZipFile(io.BytesIO(b"".join(zip_chunks(workspace, max_bytes=10_000))))
    assert archive.namelist() == ["ok.txt"]


def test_a_directory_swapped_for_a_link_is_not_followed(workspace: Path, outside: Path) -> None:
    # The walk holds directory fds: even a link appearing where a directory was is opened with O_NOFOLLOW relative
    # to its parent's fd, never resolved through the path.
    write_file(workspace, "d/secret.txt", "inside\n")  # the same name as the file outside
    # A big, barely compressible file in the root: the export yields its first chunk while still in the root,
    # after listing it (d is a directory then) and before descending into d.
    write_file(workspace, "a.txt", secrets.token_hex(100_000))
    chunks = zip_chunks(workspace, max_bytes=1_000_000)
    first = next(chunks)
    plant(workspace, f"rm -rf d && ln -s {outside} d")
    data = first + b"".join(chunks)
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "d/secret.txt" not in names
    assert b"top secret" not in data
