"""File digests: each file hashed once per process, and never a stale digest for a rewritten file."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from headstart import files
from headstart.files import file_digest


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files actually read and hashed."""
    seen: list[Path] = []

    def counting(path: Path, max_bytes: int, original=files._sha256) -> str:  # type: ignore[no-untyped-def]
        seen.append(path)
        return original(path, max_bytes)

    monkeypatch.setattr(files, "_sha256", counting)
    files._remembered_sha256.cache_clear()
    return seen


def test_an_unchanged_file_is_hashed_once_and_a_rewritten_one_again(tmp_path: Path, hashed: list[Path]) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"first")
    time.sleep(2.1)  # older than the file system's clock granularity could hide
    assert file_digest(path) == file_digest(path) == hashlib.sha256(b"first").hexdigest()
    assert len(hashed) == 1
    mtime = path.stat().st_mtime_ns
    path.write_bytes(b"other")  # the same size
    os.utime(path, ns=(mtime, mtime))  # and the old modification time: only the change time moves
    assert file_digest(path) == hashlib.sha256(b"other").hexdigest()


def test_a_file_written_just_now_is_not_remembered(tmp_path: Path, hashed: list[Path]) -> None:
    (tmp_path / "a.jpg").write_bytes(b"fresh")
    file_digest(tmp_path / "a.jpg")
    file_digest(tmp_path / "a.jpg")
    assert len(hashed) == 2
