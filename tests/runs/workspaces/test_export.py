"""The streamed zip export: round trip, chunking, no links or special files, the size cap."""

from __future__ import annotations

import io
import os
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
