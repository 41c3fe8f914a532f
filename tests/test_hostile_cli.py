"""The CLI under hostile use: zero and negative counts, no readable image, a read-only folder, clashing and over-long names,
error messages that carry control characters. Each gives one clear line (or a usage error), never a traceback."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import headstart.api
from conftest import CATS_DOGS_TINY, PHOTOS, write_image
from headstart.cli.main import app
from headstart.errors import ConfigError
from headstart.gradcam import MAX_NAME_BYTES, output_name

runner = CliRunner()


def junk_images(root: Path, n: int = 3) -> Path:
    """cats/ and dogs/ of files named .jpg that are not images."""
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for k in range(n):
            (root / name / f"{k}.jpg").write_text("not a photo")
    return root


@pytest.mark.parametrize(
    "args",
    [
        ["imagenet", str(PHOTOS / "dog.jpg"), "--top-k", "0"],
        ["imagenet", str(PHOTOS / "dog.jpg"), "--top-k", "-2"],
        ["predict", "model", str(PHOTOS / "dog.jpg"), "--top-k", "0"],
        ["augment-preview", str(CATS_DOGS_TINY), "--n-images", "0"],
        ["augment-preview", str(CATS_DOGS_TINY), "--n-images", "-3"],
        ["augment-preview", str(CATS_DOGS_TINY), "--n-variants", "0"],
    ],
)
def test_counts_below_one_are_usage_errors(args: list[str], tmp_path: Path) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_the_api_refuses_counts_below_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top_k must be at least 1"):
        headstart.api.imagenet([PHOTOS / "dog.jpg"], top_k=0)
    with pytest.raises(ConfigError, match="at least 1"):
        headstart.api.augment_preview(CATS_DOGS_TINY, tmp_path / "a.png", n_images=0)


def test_evaluate_on_no_readable_image_is_an_error_naming_the_data(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = junk_images(tmp_path / "labelled")
    result = runner.invoke(app, ["evaluate", str(tiny_model_dir), str(data)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith(f"Error: {data}: no readable images; 6 skipped (first: {data / 'cats' / '0.jpg'}: ")


def test_predict_on_only_unreadable_images_says_why(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = junk_images(tmp_path / "photos")
    result = runner.invoke(app, ["predict", str(tiny_model_dir), str(data), str(tmp_path / "missing.jpg")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert f"no readable images; 7 skipped (first: {tmp_path / 'missing.jpg'}: no such file or folder)" in lines[0]
    result = runner.invoke(app, ["predict", str(tiny_model_dir), str(tmp_path / "missing.jpg")])
    assert result.exit_code == 1 and "no such file or folder" in result.output


@pytest.fixture
def checkable(tmp_path: Path) -> Path:
    """Two classes of three images, and one broken file."""
    root = tmp_path / "data"
    for name, colour in (("cats", (200, 100, 50)), ("dogs", (50, 100, 200))):
        for k in range(3):
            write_image(root / name / f"{k}.png", (colour[0] + 10 * k, colour[1], colour[2]))
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.mark.subprocess
def test_check_prints_the_table_and_writes_nothing_unasked(checkable: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "read-only"
    cwd.mkdir()
    cwd.chmod(0o555)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "headstart.cli.main", "check", str(checkable)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "COLUMNS": "300"},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "what headstart does" in done.stdout and "broken.jpg" in done.stdout  # the counts, then the first problems
        assert done.stdout.rstrip().splitlines()[-2].startswith("`--csv FILE` writes every problem")
        assert "Traceback" not in done.stderr and not list(cwd.iterdir())
    finally:
        cwd.chmod(0o755)


def test_check_writes_the_csv_only_where_asked(checkable: Path, tmp_path: Path) -> None:
    listing = tmp_path / "problems.csv"
    result = runner.invoke(app, ["check", str(checkable), "--csv", str(listing)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(listing.read_text(errors="surrogateescape").splitlines()))
    assert "broken.jpg" in {Path(r["path"]).name for r in rows} and all(r["fix"] for r in rows)
    assert f"to {listing}" in result.output and "--csv FILE" not in result.output


def test_check_that_cannot_write_its_csv_shows_the_table_then_one_error(checkable: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    result = runner.invoke(app, ["check", str(checkable), "--csv", str(tmp_path / "a-file" / "problems.csv")])
    assert result.exit_code == 1
    assert "what headstart does" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "a-file" in errors[0] and result.output.rstrip().endswith(errors[0])


def test_explain_keeps_every_heatmap_and_skips_unreadable_images(tiny_model_dir: Path, tmp_path: Path) -> None:
    cat = next((CATS_DOGS_TINY / "val" / "cats").iterdir())
    images = tmp_path / "images"
    for relative in ("a/x.jpg", "b/x.jpg", "a/x.png", "é" * 125 + ".jpg"):  # the last stem is 250 bytes
        (images / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cat, images / relative)
    (images / "a" / "broken.jpg").write_text("not a photo")
    out = tmp_path / "out"
    result = runner.invoke(app, ["explain", str(tiny_model_dir), str(images), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Wrote 4 heatmap(s)" in result.output and "Skipped 1 file(s)" in result.output and "broken.jpg" in result.output
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 4 and {"x_gradcam.png", "x_2_gradcam.png", "x_3_gradcam.png"} <= set(written)
    assert all(len(os.fsencode(name)) <= MAX_NAME_BYTES for name in written)


def test_output_names_are_unique_and_short_enough() -> None:
    taken: set[str] = set()
    assert [output_name("x", ".png", taken) for _ in range(3)] == ["x.png", "x_2.png", "x_3.png"]
    assert output_name("X", ".png", taken) == "X_4.png"  # a case-insensitive file system would merge X and x
    long = output_name("é" * 200, "_gradcam.png", set())
    assert long.endswith("_gradcam.png") and len(long.encode()) <= MAX_NAME_BYTES and long.startswith("é" * 90)


@pytest.mark.subprocess
def test_error_messages_show_control_characters_escaped_on_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "miss\x1b[31ming\nfolder[/]"
    done = subprocess.run(
        [sys.executable, "-m", "headstart.cli.main", "train", str(missing)],
        capture_output=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "300"},
    )
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert b"\x1b" not in done.stdout + done.stderr and "miss\\x1b[31ming\\x0afolder[/]" in lines[0]
