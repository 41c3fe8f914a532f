"""The file helpers every writer and reader goes through."""

from __future__ import annotations

import csv
import errno
import io
import os
from pathlib import Path

import pytest

from headstart.errors import FileRefusedError
from headstart.files import atomic_write_bytes, atomic_write_folder, csv_bytes, display, read_regular


def test_a_failed_write_names_the_target_never_the_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_replace(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "Input/output error", str(src), None, str(dst))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(tmp_path / "model.safetensors", b"data")
    assert caught.value.filename == str(tmp_path / "model.safetensors") and caught.value.filename2 is None
    assert ".tmp" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


def test_only_regular_files_of_bounded_size_are_read(tmp_path: Path) -> None:
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    with pytest.raises(FileRefusedError, match="not a regular file: a FIFO"):
        read_regular(fifo, 100)  # returns at once: opened without blocking
    with pytest.raises(FileRefusedError, match="not a regular file: a character device"):
        read_regular(Path("/dev/zero"), 100)
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(FileRefusedError, match="too large: 101 bytes"):
        read_regular(tmp_path / "big", 100)


def test_names_are_shown_on_one_line_with_their_control_characters_escaped() -> None:
    name = "a\x1b[31mb\nc\u202ed" + os.fsdecode(b"\xff.jpg")
    assert display(name) == "a\\x1b[31mb\\x0ac\\u202ed\\xff.jpg"
    assert display("café [bold] $x$.jpg") == "café [bold] $x$.jpg"


def test_csv_round_trips_non_utf8_file_names() -> None:
    path = os.fsdecode(b"photos/caf\xe9,\n.jpg")
    data = csv_bytes(["path"], [[path]])
    rows = list(csv.reader(io.StringIO(data.decode("utf-8", errors="surrogateescape"))))
    assert os.fsencode(rows[1][0]) == b"photos/caf\xe9,\n.jpg"


def test_a_folder_switch_carries_the_users_entries(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    atomic_write_folder(folder, {"a": b"1"}, replaced=["a"])
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("mine")
    (folder / "link").symlink_to("sub/notes.txt")
    os.mkfifo(folder / "pipe")
    mode = 0o750
    folder.chmod(mode)
    atomic_write_folder(folder, {"a": b"2"}, replaced=["a"])
    assert (folder / "a").read_bytes() == b"2" and (folder / "sub" / "notes.txt").read_text() == "mine"
    assert os.readlink(folder / "link") == "sub/notes.txt" and (folder / "pipe").is_fifo()
    assert (folder.stat().st_mode & 0o777) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
