"""Limits a hostile or unlucky input meets: an address-space limit, a progressive-JPEG scan bomb, a folder nested
10,000 levels deep, file names that spreadsheets run as formulas, broken EXIF, and output that is not a terminal."""

from __future__ import annotations

import csv
import io
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import CATS_DOGS_TINY, FLOWERS_TINY, unseen_cats_dogs
from headstart.cli.main import app
from headstart.data import MAX_JPEG_SCANS, MAX_SCAN_PIXELS, load_image, load_image_bytes, read_csv
from headstart.errors import FileRefusedError, UnreadableImageError
from headstart.files import csv_bytes, read_csv_cell, read_regular, visible_files

runner = CliRunner()
ADDRESS_SPACE = 6 << 30  # 6 GiB of address space: a shared server's or a scheduler's `ulimit -v`


def _sos_segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan of a JPEG: its SOS marker segment and the entropy-coded data after it."""
    found, i = [], 2
    while data[i + 1] != 0xD9:
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if data[i + 1] != 0xDA:
            i += 2 + length
            continue
        j = i + 2 + length
        while not (data[j] == 0xFF and data[j + 1] != 0 and not 0xD0 <= data[j + 1] <= 0xD7):
            j += 1
        found.append((i, j))
        i = j
    return found


def scan_bomb(n_repeats: int, size: tuple[int, int] = (4000, 3000)) -> bytes:
    """A progressive JPEG whose smallest scan is repeated `n_repeats` times: every repeat makes the decoder pass over all
    the pixels again, so a few hundred kilobytes take minutes to decode."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", progressive=True, quality=80)
    data = buffer.getvalue()
    scans = _sos_segments(data)
    start, end = min(scans, key=lambda s: s[1] - s[0])
    last = scans[-1][1]
    return data[:last] + data[start:end] * n_repeats + data[last:]


def test_read_regular_allocates_what_the_file_holds_not_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(b"x" * 1000)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    code = (
        "import resource, sys; from pathlib import Path; from headstart.files import read_regular;"
        f"resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE}, {hard}));"
        f"sys.exit(len(read_regular(Path({str(path)!r}), 64 << 30)) != 1000)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(FileRefusedError, match="too large"):
        read_regular(path, 999)


@pytest.mark.subprocess
def test_the_main_commands_work_under_an_address_space_limit(tmp_path: Path) -> None:
    """`ulimit -v` as shared servers set it: train, predict, evaluate, check and export each finish in a fresh process."""
    env = {**os.environ, "HEADSTART_CACHE_DIR": str(tmp_path / "cache")}
    headstart = [sys.executable, "-m", "headstart.cli.main"]
    model = tmp_path / "model"

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, resource.getrlimit(resource.RLIMIT_AS)[1]))

    for args in (
        ["train", str(CATS_DOGS_TINY), "--out", str(model)],
        ["predict", str(model), str(CATS_DOGS_TINY / "val")],
        ["evaluate", str(model), str(unseen_cats_dogs(tmp_path / "unseen"))],
        ["check", str(CATS_DOGS_TINY)],
        ["export", str(model), "--out", str(tmp_path / "m.onnx")],
        ["export", str(model), "--int8", "--out", str(tmp_path / "m.int8.onnx")],
    ):
        done = subprocess.run(headstart + args, env=env, preexec_fn=limited, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (args[0], done.stdout[-1500:], done.stderr[-3000:])
    assert (model / "report.html").is_file() and (tmp_path / "m.onnx").is_file() and (tmp_path / "m.int8.onnx").is_file()


@pytest.mark.subprocess
def test_running_out_of_memory_is_one_line(tmp_path: Path) -> None:
    """Too little address space even for the backbone: one line saying so, never a traceback."""
    env = {**os.environ, "HEADSTART_CACHE_DIR": str(tmp_path / "cache")}

    def starved() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))

    done = subprocess.run(
        [sys.executable, "-m", "headstart.cli.main", "train", str(CATS_DOGS_TINY), "--out", str(tmp_path / "m")],
        env=env,
        preexec_fn=starved,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "memory" in done.stderr.strip().splitlines()[-1], done.stderr[-3000:]


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return scan_bomb(20_000)


def test_a_scan_bomb_is_refused_in_a_thread_where_no_time_limit_reaches(bomb: bytes) -> None:
    """A server thread or a Ray actor has no signal-based deadline: the scan count bounds the decoder's work up front."""
    outcome: list[BaseException | None] = []

    def decode() -> None:
        try:
            load_image_bytes(bomb)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    started = time.monotonic()
    worker = threading.Thread(target=decode, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "decoding a scan bomb in a thread was still running after 10 s"
    assert isinstance(outcome[0], UnreadableImageError) and "scan bomb" in outcome[0].reason, outcome
    assert time.monotonic() - started < 10


def test_a_scan_bomb_on_disk_and_its_prefix_are_refused_quickly(bomb: bytes, tmp_path: Path) -> None:
    half_the_repeats = (len(bomb) - len(scan_bomb(0))) // 2  # a download cut off halfway: truncated, and still a bomb
    for name, data in (("bomb.jpg", bomb), ("prefix.jpg", bomb[:-half_the_repeats])):
        (tmp_path / name).write_bytes(data)
        started = time.monotonic()
        with pytest.raises(UnreadableImageError, match=f"more than {MAX_JPEG_SCANS} scans"):
            load_image(tmp_path / name)
        assert time.monotonic() - started < 5, name


def test_fewer_scans_are_allowed_the_more_pixels_there_are() -> None:
    """99 scans of 7000 x 7000 pixels took 3.4 s an upload: scans x pixels is bounded too."""
    bomb = scan_bomb(60, (6000, 6000))
    started = time.monotonic()
    with pytest.raises(UnreadableImageError, match=f"more than {MAX_SCAN_PIXELS // 6000**2} scans at 6000x6000"):
        load_image_bytes(bomb)
    assert time.monotonic() - started < 5


def test_ordinary_progressive_jpegs_still_decode(tmp_path: Path) -> None:
    plain = scan_bomb(0, (640, 480))
    assert len(_sos_segments(plain)) < MAX_JPEG_SCANS
    assert load_image_bytes(plain).size == (640, 480)
    assert load_image_bytes(scan_bomb(MAX_JPEG_SCANS // 2, (640, 480))).size == (640, 480)


def nested(root: Path, depth: int) -> Path:
    """`root` with a folder nested `depth` levels deep inside (made through folder descriptors: the full path is too long
    for the system to name), a photo at its top."""
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    return root


def six_photos(data: Path) -> Path:
    """`data` holding cats/ and dogs/ of three photos each."""
    for label in ("cats", "dogs"):
        (data / label).mkdir(parents=True)
        for photo in sorted((CATS_DOGS_TINY / "train" / label).iterdir())[:3]:
            (data / label / photo.name).write_bytes(photo.read_bytes())
    return data


def unnest(folder: Path) -> None:
    """Remove the chain of `d` folders `nested` made, one level at a time (shutil.rmtree, and so pytest's clean-up, recurse)."""
    while (folder / "d").is_dir():
        os.rename(folder / "d", folder / "top")
        if (folder / "top" / "d").is_dir():
            os.rename(folder / "top" / "d", folder / "d")
        os.rmdir(folder / "top")


def test_a_folder_nested_10000_levels_deep_is_walked_without_recursion(tmp_path: Path) -> None:
    data = six_photos(tmp_path / "data")
    nested(data / "cats", 10_000)
    try:
        assert len(list(visible_files(data))) == 6
        result = runner.invoke(app, ["check", str(data)])
    finally:
        unnest(data / "cats")
    assert result.exit_code == 0 and "Training can proceed" in result.output, result.output
    assert "unreadable folder" in result.output and "File name too long" in result.output  # said, not passed over in silence
    assert result.exception is None


def test_check_names_the_folder_links_it_does_not_follow(tmp_path: Path) -> None:
    data = six_photos(tmp_path / "data")
    (data / "cats" / "more").symlink_to(CATS_DOGS_TINY / "val" / "cats")
    (data / "cats" / "loop").symlink_to(data)
    result = runner.invoke(app, ["check", str(data)])
    assert result.exit_code == 0 and result.output.count("linked folder") >= 3 and "not followed" in result.output, result.output


def test_csv_cells_that_spreadsheets_would_run_are_neutralised_and_read_back(tmp_path: Path) -> None:
    names = ['=HYPERLINK("http://x","y").jpg', "+1+cmd.jpg", "-2+3.jpg", "@SUM(A1).jpg", "\tx.jpg", "'=already.jpg", "plain.jpg"]
    text = csv_bytes(["path", "label", "score"], [[n, "=label", -0.25] for n in names]).decode()
    rows = list(csv.reader(io.StringIO(text)))[1:]
    assert all(not row[0].startswith(("=", "+", "-", "@", "\t")) for row in rows)
    assert [row[2] for row in rows] == ["-0.25"] * len(names)  # numbers stay numbers
    assert [read_csv_cell(row[0]) for row in rows] == names
    assert {read_csv_cell(row[1]) for row in rows} == {"=label"}
    photo = next((FLOWERS_TINY / "daisy").iterdir())
    (tmp_path / "=HYPERLINK(1).jpg").write_bytes(photo.read_bytes())
    listing = tmp_path / "list.csv"
    listing.write_bytes(csv_bytes(["path", "label"], [["=HYPERLINK(1).jpg", "@daisy"]]))
    records, skipped = read_csv(listing)
    assert [(r.path.name, r.label) for r in records] == [("=HYPERLINK(1).jpg", "@daisy")] and not skipped


def test_predict_csv_names_a_formula_file_as_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    photo = next((CATS_DOGS_TINY / "val" / "cats").iterdir())
    hostile = tmp_path / "=HYPERLINK(1)+2.jpg"
    hostile.write_bytes(photo.read_bytes())
    out = tmp_path / "p.csv"
    os.chdir(tmp_path)
    result = runner.invoke(app, ["predict", str(tiny_model_dir), hostile.name, "--csv", str(out)])
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader(io.StringIO(out.read_text())))
    assert row["path"] == "'=HYPERLINK(1)+2.jpg" and read_csv_cell(row["path"]) == hostile.name


def test_broken_exif_is_used_as_is_and_reported_by_check(tmp_path: Path) -> None:
    """A JPEG whose Exif sub-folder points past the end: decoded without Pillow's raw warning, reported by `check`."""
    import struct

    data = tmp_path / "data"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for photo in sorted((FLOWERS_TINY / ("daisy" if label == "a" else "roses")).iterdir())[:3]:
            (data / label / photo.name).write_bytes(photo.read_bytes())
    ifd = struct.pack("<H", 2) + struct.pack("<HHII", 0x0112, 3, 1, 6) + struct.pack("<HHII", 0x8769, 4, 1, 0xFFFFFF) + b"\0" * 4
    exif = b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd
    jpeg = next((FLOWERS_TINY / "daisy").iterdir()).read_bytes()
    broken = data / "a" / "broken_exif.jpg"
    broken.write_bytes(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + jpeg[2:])
    with Image.open(broken) as original:
        width, height = original.size
    assert load_image(broken).size == (height, width)  # turned upright by the orientation that could be read; no warning raised
    result = runner.invoke(app, ["check", str(data)])
    assert result.exit_code == 0 and "corrupt EXIF" in result.output and "UserWarning" not in result.output, result.output


def test_piped_tables_keep_long_paths_on_one_line(tmp_path: Path) -> None:
    """Not a terminal (a pipe, a CI log): tables at their natural width, so a long path can be copied and searched."""
    deep = tmp_path / ("a-long-folder-name-" * 6) / "cats"
    deep.mkdir(parents=True)
    loose = deep.parent / "loose-photo-outside-any-class-folder.jpg"
    loose.write_bytes(next((FLOWERS_TINY / "daisy").iterdir()).read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run(
        [sys.executable, "-m", "headstart.cli.main", "check", str(deep.parent)], env=env, capture_output=True, text=True, timeout=120
    )
    assert len(str(loose)) > 120
    assert any(str(loose) in line for line in done.stdout.splitlines()), done.stdout


def test_help_keeps_every_default_it_names() -> None:
    for command, phrase in (("export", "[default: MODEL.onnx"), ("train", "[default: ~/.cache/headstart]"), ("extract", "[default: 32]")):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "300"})
        assert phrase in result.output and " .\n" not in result.output and " . " not in result.output, result.output


def test_extract_says_how_many_copies_it_extracted_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for label in ("daisy", "roses"):
        (data / label).mkdir(parents=True)
        for photo in sorted((FLOWERS_TINY / label).iterdir())[:2]:
            (data / label / photo.name).write_bytes(photo.read_bytes())
    copy = next((data / "daisy").iterdir()).read_bytes()
    (data / "daisy" / "copy.jpg").write_bytes(copy)
    (data / "roses" / "copy.jpg").write_bytes(copy)
    result = runner.invoke(app, ["extract", str(data), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0 and "4 extracted" in result.output and "2 were copies of another image" in result.output, result.output
