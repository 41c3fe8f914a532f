"""`headstart check` and the checks at the start of `train`, on a generated corpus with every kind of bad input."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import headstart
from conftest import CATS_DOGS_TINY, write_image
from headstart.cli.main import app
from headstart.triage import PROBLEMS, triage

JPEG = CATS_DOGS_TINY / "train" / "cats" / "cat.1.jpg"


def make_bad_corpus(root: Path) -> dict[str, str]:
    """A train/val tree with good images and one of every bad input; returns {relative path: expected problem}."""
    colours = {"cats": (200, 120, 60), "dogs": (60, 120, 200), "birds": (90, 200, 90)}
    counts = {"cats": 15, "dogs": 12, "birds": 3}
    for split, share in (("train", 1.0), ("val", 0.4)):
        for name, n in counts.items():
            for k in range(max(1, round(n * share))):
                write_image(root / split / name / f"{split}_{name}_{k}.png", colours[name], size=(64 + k, 48))
    expected: dict[str, str] = {}

    def bad(relative: str, problem: str) -> Path:
        expected[relative] = problem
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    bad("train/cats/empty.jpg", "empty file").write_bytes(b"")
    bad("train/cats/truncated.jpg", "unreadable image").write_bytes(JPEG.read_bytes()[: JPEG.stat().st_size // 2])
    bad("train/dogs/notes.jpg", "not an image").write_text("shopping list: milk, eggs\n")
    bad("train/dogs/page.png", "not an image").write_bytes(b"<html><body>404 Not Found</body></html>")
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(bad("train/birds/flapping.gif", "animated"), save_all=True, append_images=frames[1:], duration=100)
    Image.open(JPEG).convert("CMYK").save(bad("train/cats/cmyk.jpg", "converted to RGB"))
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(bad("train/dogs/deep.png", "converted to RGB"))
    Image.open(JPEG).convert("P").save(bad("train/cats/palette.png", "converted to RGB"))
    Image.open(JPEG).convert("RGBA").save(bad("train/dogs/alpha.png", "converted to RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.open(JPEG).save(bad("train/cats/rotated.jpg", "rotated by EXIF"), exif=exif)
    write_image(bad("train/dogs/icon.png", "too small"), (0, 0, 0), size=(8, 8))
    Image.new("1", (10_000, 10_000)).save(bad("train/cats/bomb.png", "decompression bomb"))  # 100 Mpx in a few kB
    os.symlink("loop_b.jpg", bad("train/cats/loop_a.jpg", "broken link"))
    os.symlink("loop_a.jpg", bad("train/cats/loop_b.jpg", "broken link"))
    os.symlink("/nonexistent/photo.jpg", bad("train/dogs/gone.jpg", "broken link"))
    bad("train/cats/.DS_Store", "hidden file").write_bytes(b"\0\0\0\1Bud1")
    write_image(bad("train/dogs/.thumbnail.png", "hidden file"), (1, 2, 3))
    bad("train/fish", "empty class folder").mkdir()
    bad("train/cats/readme.txt", "not an image extension").write_text("photos of cats\n")
    bad("train/dogs/IMG_0001.HEIC", "HEIC photo").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic")
    write_image(bad("train/stray.png", "outside class folders"), (9, 9, 9))
    shutil.copy(root / "train/dogs/train_dogs_0.png", bad("train/dogs/train_dogs_0_copy.png", "duplicate"))
    shutil.copy(root / "train/cats/train_cats_0.png", bad("val/cats/leaked.png", "train/val leak"))
    expected["."] = "class imbalance"  # 15 cats + extras vs 3 birds
    return expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("bad") / "photos"
    return root, make_bad_corpus(root)


def _found(root: Path, report: headstart.Triage) -> set[tuple[str, str]]:
    return {(os.path.relpath(f.path, root), f.problem) for f in report.findings}


def test_check_reports_every_bad_input_with_its_reason(corpus: tuple[Path, dict[str, str]]) -> None:
    root, expected = corpus
    report = triage(root)
    found = _found(root, report)
    assert {(path, problem) for path, problem in expected.items()} <= found
    also = {
        ("val/cats/leaked.png", "duplicate"),
        ("train/birds/flapping.gif", "converted to RGB"),
    }  # a leak is a duplicate; GIFs are palette images
    assert found - set(expected.items()) == also
    assert report.can_train
    assert set(report.usable) == {"cats", "dogs", "birds"}
    assert all(f.fix == PROBLEMS[f.problem].fix and f.fix for f in report.findings)
    assert {problem for problem, _, _ in report.counts()} == set(expected.values())


def test_train_proceeds_on_the_good_files(corpus: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, expected = corpus
    model = headstart.train(root, cache_dir=tmp_path)
    skipped = {os.path.relpath(s.path, root) for s in model.summary.skipped}
    unusable = {p for p, problem in expected.items() if PROBLEMS[problem].action == "skipped"}
    assert unusable <= skipped
    used = {p for p, problem in expected.items() if PROBLEMS[problem].action == "used as is"}
    assert not used & skipped  # converted, rotated and animated images are trained on
    assert model.summary.n_train["cats"] >= 15
    warnings = {w.problem for w in model.summary.warnings}
    assert {"duplicate", "train/val leak", "class imbalance", "empty class folder"} <= warnings


def test_cli_check_writes_the_problem_list_and_says_training_can_proceed(corpus: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, expected = corpus
    listing = tmp_path / "problems.csv"
    result = CliRunner().invoke(app, ["check", str(root), "--csv", str(listing)])
    assert result.exit_code == 0, result.output
    assert "decompression bomb" in result.output and "training can proceed" in result.output.lower()
    rows = list(csv.DictReader(listing.read_text().splitlines()))
    assert {(os.path.relpath(r["path"], root), r["problem"]) for r in rows} >= set(expected.items())
    assert all(r["fix"] for r in rows)


@pytest.mark.parametrize(
    ("layout", "problem"),
    [({"cats": 5}, "single class"), ({"cats": 5, "dogs": 1}, "too few images"), ({}, "no images")],
)
def test_check_exit_code_says_training_cannot_proceed(tmp_path: Path, layout: dict[str, int], problem: str) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    for name, n in layout.items():
        for k in range(n):
            write_image(root / name / f"{k}.png", (10 * k, 50, 90))
    report = triage(root)
    assert not report.can_train and problem in {f.problem for f in report.findings}
    result = CliRunner().invoke(app, ["check", str(root), "--csv", str(tmp_path / "p.csv")])
    assert result.exit_code == 1
    assert "cannot" in result.output.lower() and problem in result.output
