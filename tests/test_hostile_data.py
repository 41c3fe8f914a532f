"""Hostile inputs found by an adversarial run: special files, aspect-ratio bombs, odd CSVs, damaged cache shards, Ctrl-C, flaky exports.

Anything that hung or crashed before the fix runs in a child process with a time limit.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import headstart
from conftest import FLOWERS_TINY, PHOTOS, copy_flowers, write_image
from headstart import onnx_export
from headstart.backbone import create_backbone
from headstart.cache import FeatureCache, extract_with_cache
from headstart.cli.main import app
from headstart.config import DataConfig
from headstart.data import MAX_CSV_BYTES, MAX_FILE_BYTES, load_dataset, load_image, read_source, split_records
from headstart.engine import OnnxEngine, TorchEngine, create_engine
from headstart.errors import DataError, FileRefusedError, UnreadableImageError
from headstart.files import file_digest
from headstart.pipeline import decode_input
from headstart.triage import PROBLEMS, inspect_file, triage

CFG = DataConfig(input_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
HEADSTART = Path(sys.executable).parent / "headstart"


@pytest.fixture(scope="module")
def lite0():  # type: ignore[no-untyped-def]
    return create_backbone("efficientnet_lite0")


def _run_python(script: str, *args: str, timeout: float) -> dict[str, object]:
    """Run `script` in a fresh interpreter (killed after `timeout` s) and return the JSON it prints last."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    parsed: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def _two_classes(root: Path, n: int = 5) -> Path:
    for k in range(n):
        write_image(root / "red" / f"red_{k}.png", (220, 30, 30))
        write_image(root / "blue" / f"blue_{k}.png", (30, 40, 220))
    return root


# A. Special files and unbounded reads.

SPECIAL_FILES = """
import json, sys
from pathlib import Path
import headstart
from headstart.files import file_digest
from headstart.data import load_image
from headstart.errors import FileRefusedError, UnreadableImageError
from headstart.triage import triage

root, cache, fifo = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
low_level = []
for call in (file_digest, load_image):
    try:
        call(fifo)
    except (FileRefusedError, UnreadableImageError) as e:
        low_level.append(e.reason)
report = triage(root)
model = headstart.train(root, cache_dir=cache, report=False)
print(json.dumps({
    "low_level": low_level,
    "check": sorted([f.path.name, f.problem, f.detail] for f in report.findings),
    "can_train": report.can_train,
    "skipped": {s.path.name: s.reason for s in model.summary.skipped},
}))
"""


@pytest.mark.subprocess
def test_fifos_devices_and_huge_files_are_skipped_by_check_and_train(tmp_path: Path, cache_dir: Path) -> None:
    root = _two_classes(tmp_path / "photos")
    os.mkfifo(root / "red" / "x.jpg")  # opening it for reading blocked forever
    os.symlink("/dev/zero", root / "red" / "z.jpg")  # reading it never ended
    with (root / "blue" / "huge.jpg").open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: takes no disk space
    found = _run_python(SPECIAL_FILES, str(root), str(cache_dir), str(root / "red" / "x.jpg"), timeout=300)
    fifo, device = "not a regular file: a FIFO (named pipe)", "not a regular file: a character device"
    assert found["low_level"] == [fifo, fifo]
    too_large = f"too large: {MAX_FILE_BYTES + 1:,} bytes, more than the {MAX_FILE_BYTES:,} allowed"
    expected = [["huge.jpg", "file too large", too_large], ["x.jpg", "special file", fifo], ["z.jpg", "special file", device]]
    assert [row for row in found["check"] if row[0] in ("x.jpg", "z.jpg", "huge.jpg")] == expected  # type: ignore[union-attr]
    assert found["can_train"] is True
    assert found["skipped"] == {"x.jpg": fifo, "z.jpg": device, "huge.jpg": too_large}
    assert PROBLEMS["special file"].action == PROBLEMS["file too large"].action == "skipped"


# B. Aspect-ratio bombs.


def _strip_png(path: Path, width: int, height: int) -> Path:
    """A 1-bit black PNG of `width` x `height`, written with zlib (a few kB, in milliseconds)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\0" + bytes((width + 7) // 8)) * height
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b""))
    return path


ASPECT_BOMB = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB: resizing the strip asked for ~80 GB
from pathlib import Path
from headstart.config import DataConfig
from headstart.pipeline import decode_batches

cfg = DataConfig(input_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
batches = list(decode_batches([Path(p) for p in sys.argv[1:]], cfg, batch_size=1, workers=1))
print(json.dumps({"kept": [i for b in batches for i in b.indices], "skipped": [[Path(s.path).name, s.reason] for b in batches for s in b.skipped]}))
"""


def test_an_aspect_ratio_bomb_is_skipped_not_a_crash(tmp_path: Path) -> None:
    bomb = _strip_png(tmp_path / "strip.png", 16, 5_000_000)  # 80 Mpx: under the pixel limit
    assert bomb.stat().st_size < 100_000
    with pytest.raises(UnreadableImageError, match=r"extreme aspect ratio: 16x5000000"):
        load_image(bomb)
    good = [write_image(tmp_path / f"good_{k}.png", (10, 200, 30)) for k in range(2)]
    found = _run_python(ASPECT_BOMB, str(good[0]), str(bomb), str(good[1]), timeout=120)
    assert found["kept"] == [0, 2]
    assert found["skipped"] == [["strip.png", "extreme aspect ratio: 16x5000000 pixels, more elongated than 100:1"]]
    assert [problem for problem, _ in inspect_file(bomb)] == ["extreme aspect ratio"]  # what `check` reports


def test_running_out_of_memory_while_resizing_skips_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(image: object, cfg: DataConfig) -> object:
        raise MemoryError

    monkeypatch.setattr("headstart.pipeline.crop_pixels", exhausted)
    with pytest.raises(UnreadableImageError, match="not enough memory"):
        decode_input(PHOTOS / "kite.jpg", CFG)


# C. CSV inputs.


def test_an_image_given_as_the_source_says_what_to_give_instead(tmp_path: Path) -> None:
    photo = PHOTOS / "kite.jpg"
    for call in (triage, load_dataset):
        with pytest.raises(DataError, match="is an image; give the folder that holds one sub-folder per class, or a CSV of path,label"):
            call(photo)
    result = CliRunner().invoke(app, ["check", str(photo)])
    assert result.exit_code == 1 and "is an image" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_latin1_csv_names_the_files_whose_names_are_latin1(tmp_path: Path) -> None:
    folder = os.fsencode(tmp_path)
    names = [b"caf\xe9_%d.png" % k for k in range(3)] + [b"th\xe9_%d.png" % k for k in range(3)]
    for name in names:
        write_image(Path(os.fsdecode(os.path.join(folder, name))), (200, 100, 50))
    rows = b"path,label\n" + b"".join(name + b"," + name.split(b"_")[0] + b"\n" for name in names)
    (tmp_path / "labels.csv").write_bytes(rows)  # Latin-1, as Excel on Windows saves it
    records, _, skipped = read_source(tmp_path / "labels.csv")
    assert skipped == []
    assert sorted(os.fsencode(r.path) for r in records) == sorted(os.path.join(folder, n) for n in names)


def test_a_csv_with_a_byte_order_mark_keeps_its_first_image(tmp_path: Path) -> None:
    images = sorted(FLOWERS_TINY.glob("*/*.jpg"))
    (tmp_path / "labels.csv").write_text("".join(f"{p},{p.parent.name}\n" for p in images), encoding="utf-8-sig")
    records, _, skipped = read_source(tmp_path / "labels.csv")
    assert skipped == [] and [r.path for r in records] == images


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"path,label\na.jpg,cat\nb\0.jpg,dog\n", r"labels.csv, line 3: NUL bytes"),
        ("path,label\n".encode("utf-16"), r"labels.csv, line 1: NUL bytes"),
        (b'path,label\na.jpg,cat\n"' + b"x" * 200_000 + b'",dog\n', r"labels.csv, line 3: field larger than field limit"),
    ],
    ids=["nul", "utf-16", "huge-field"],
)
def test_a_csv_that_is_not_csv_text_is_one_line_naming_the_line(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "labels.csv").write_bytes(content)
    with pytest.raises(DataError, match=message) as raised:
        read_source(tmp_path / "labels.csv")
    assert "\n" not in str(raised.value)


def test_a_csv_source_must_be_a_regular_file_of_bounded_size(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "labels.csv")  # opened without blocking, and refused
    with pytest.raises(FileRefusedError, match="not a regular file: a FIFO"):
        read_source(tmp_path / "labels.csv")
    with (tmp_path / "big.csv").open("wb") as f:
        f.truncate(MAX_CSV_BYTES + 1)
    with pytest.raises(FileRefusedError, match="too large"):
        read_source(tmp_path / "big.csv")


def test_the_check_csv_names_a_non_utf8_file_exactly(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "photos")
    odd = os.path.join(os.fsencode(root / "red"), b"bad\xff\xfe.png")
    Path(os.fsdecode(odd)).write_bytes(b"")  # an empty file: one finding
    listing = triage(root).write_csv(tmp_path / "problems.csv")
    with listing.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    (row,) = [r for r in rows if r["problem"] == "empty file"]
    assert os.fsencode(row["path"]) == odd


# D. Damaged cache shards.


@pytest.mark.parametrize(
    "bad",
    [np.zeros(7, np.float32), np.zeros((2, 1280), np.float32), np.zeros(1280, np.float64), np.full(1280, np.nan, np.float32)],
    ids=["short", "2d", "float64", "nan"],
)
def test_a_shard_with_a_bad_tensor_is_deleted_and_its_images_extracted_again(lite0, tmp_path: Path, bad: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    paths = sorted(FLOWERS_TINY.glob("*/*.jpg"))[:3]
    cache = FeatureCache(tmp_path, lite0)
    cache.store({file_digest(paths[0]): bad})
    result = extract_with_cache(lite0, paths, cache, make_engine=TorchEngine)
    assert result.features.shape == (3, 1280) and result.features.dtype == np.float32
    assert np.isfinite(result.features).all()
    assert (result.n_extracted, result.n_cached) == (3, 0)
    assert len(list(cache.directory.glob("*.safetensors"))) == 1  # the damaged shard is gone, the new one kept
    again = extract_with_cache(lite0, paths, cache, make_engine=lambda backbone: pytest.fail("extracted twice"))
    np.testing.assert_array_equal(again.features, result.features)


# E. Ctrl-C.


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _forked_child(process: subprocess.Popen[bytes], deadline: float) -> int:
    """The first child of `process` that runs its command line and lives on (a fork, not a short-lived helper
    such as the `ldconfig` a library may run while it is imported, whose name briefly is the parent's)."""
    command = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    while process.poll() is None and time.monotonic() < deadline:
        for child in _children(process.pid):
            try:
                forked = Path(f"/proc/{child}/cmdline").read_bytes() == command
            except OSError:
                continue
            if forked:
                time.sleep(0.05)  # still running the parent's command line: a fork, not a helper between fork and exec
                try:
                    if _state(child) not in ("gone", "Z") and Path(f"/proc/{child}/cmdline").read_bytes() == command:
                        return child
                except OSError:
                    continue
        time.sleep(0.01)
    raise AssertionError(f"no decoding worker started (exit status {process.poll()})")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.fixture(scope="module")
def flowers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 flower photos, 60 per class: extraction lasts a few seconds."""
    return copy_flowers(tmp_path_factory.mktemp("ctrl-c") / "flowers", per_class=60)


def _sigint_as_from_a_terminal() -> None:
    """In the child: Ctrl-C's default action, which a pytest started in the background (SIGINT ignored) would pass on ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_extraction(command: list[str], stderr_path: Path) -> tuple[int, str]:
    """Run `command` and press Ctrl-C (SIGINT to its process group) while its decoding worker waits for work.

    That is when a worker that handles SIGINT itself prints a traceback (a busy one
    hands the KeyboardInterrupt back to the main process as its result).
    Returns the exit status and stderr.
    """
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True, preexec_fn=_sigint_as_from_a_terminal
        )
        try:
            deadline = time.monotonic() + 240
            worker = _forked_child(process, deadline)  # the decoding worker: extraction has started
            idle = 0
            while idle < 5 and process.poll() is None and time.monotonic() < deadline:
                idle = idle + 1 if _state(worker) == "S" else 0  # asleep for 50 ms: waiting on the task queue
                time.sleep(0.01)
            assert process.poll() is None, "training ended before it could be interrupted"
            os.killpg(process.pid, signal.SIGINT)
            returncode = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return returncode, stderr_path.read_text(errors="replace")


TRAIN = "import sys, headstart; headstart.train(sys.argv[1], cache_dir=sys.argv[2], report=False)"


@pytest.mark.kill
def test_ctrl_c_during_extraction_leaves_no_worker_traceback(flowers: Path, tmp_path: Path) -> None:
    returncode, output = _interrupt_extraction([sys.executable, "-c", TRAIN, str(flowers), str(tmp_path / "cache")], tmp_path / "stderr")
    assert returncode == -signal.SIGINT, output[-3000:]
    assert output.count("Traceback") == 1 and output.rstrip().endswith("KeyboardInterrupt"), output[-3000:]  # the main process's only
    assert "_process_worker" not in output and "Process ForkProcess" not in output, output[-3000:]


@pytest.mark.kill
def test_ctrl_c_during_cli_training_is_one_line_and_exit_code_130(flowers: Path, tmp_path: Path) -> None:
    command = [
        str(HEADSTART),
        "train",
        str(flowers),
        "--out",
        str(tmp_path / "model"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-report",
    ]
    returncode, output = _interrupt_extraction(command, tmp_path / "stderr")
    assert returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert "Interrupted." in output


# F. check and train agree.


def _with_empty_files(root: Path, layout: dict[str, tuple[int, int]]) -> Path:
    for label, (n_good, n_empty) in layout.items():
        (root / label).mkdir(parents=True)
        for k in range(n_good):
            write_image(root / label / f"{label}_{k}.png", (40 * len(label), 90, 10 * k))
        for k in range(n_empty):
            (root / label / f"{label}_empty_{k}.png").write_bytes(b"")
    return root


def test_check_and_train_agree_when_unreadable_files_would_fall_into_validation(tmp_path: Path, cache_dir: Path) -> None:
    root = _with_empty_files(tmp_path / "photos", {"cats": (4, 3), "dogs": (6, 0)})
    records, _, _ = read_source(root)
    # A seed whose split of all files puts an empty file in cats' validation share: splitting before dropping left cats none.
    seed = next(s for s in range(100) if any(r.label == "cats" and "empty" in r.path.name for r in split_records(records, 0.2, s)[1]))
    assert triage(root, seed=seed).can_train
    model = headstart.train(root, seed=seed, cache_dir=cache_dir, report=False)
    assert model.summary.n_train["cats"] + model.summary.n_val["cats"] == 4
    assert model.summary.n_val["cats"] >= 1
    assert sum("empty" in str(s.path) for s in model.summary.skipped) == 3


@pytest.mark.parametrize(
    ("layout", "can_train"),
    [
        ({"cats": (1, 3), "dogs": (6, 0)}, False),  # one usable cat: too few
        ({"cats": (0, 3), "dogs": (6, 0)}, False),  # no usable cat: a single class
        ({"cats": (0, 3), "dogs": (6, 0), "birds": (5, 0)}, True),  # the class of only unreadable files is left out by both
    ],
    ids=["too-few", "single-class", "class-gone"],
)
def test_check_and_train_give_the_same_verdict(
    tmp_path: Path, cache_dir: Path, layout: dict[str, tuple[int, int]], can_train: bool
) -> None:
    root = _with_empty_files(tmp_path / "photos", layout)
    report = triage(root)
    assert report.can_train is can_train
    if can_train:
        model = headstart.train(root, cache_dir=cache_dir, report=False)
        assert sorted(model.classes) == sorted(report.usable)
    else:
        blocking = next(f for f in report.findings if f.action == "blocks training")
        with pytest.raises(DataError) as raised:
            headstart.train(root, cache_dir=cache_dir, report=False)
        assert str(raised.value) == blocking.detail


# G. Flaky ONNX exports.


@pytest.mark.slow
@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), MemoryError()], ids=["disk-full", "memory"])
def test_a_transient_export_failure_is_tried_again_next_time(
    lite0,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: BaseException,
) -> None:
    real_export = onnx_export.export_features
    calls = []

    def flaky(backbone, threads):  # type: ignore[no-untyped-def]
        calls.append(backbone)
        if len(calls) == 1:
            raise failure
        return real_export(backbone, threads)

    monkeypatch.setattr("headstart.onnx_export.export_features", flaky)
    with pytest.warns(UserWarning, match=f"{type(failure).__name__}.*PyTorch instead"):
        assert isinstance(create_engine(lite0, "auto", tmp_path), TorchEngine)
    assert not list(tmp_path.rglob("*.json"))  # nothing recorded
    assert isinstance(create_engine(lite0, "auto", tmp_path), OnnxEngine)
    assert len(calls) == 2
