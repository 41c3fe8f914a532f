"""Suspect labels: flipped labels found by confident learning on out-of-fold predictions; `check --labels`; the report section.

The photos' efficientnet_lite0 features are read from the session's flowers cache (content-keyed, so copies of
the shared photos hit it), which makes the full flowers set a matter of seconds.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CATS_DOGS_TINY, FLOWERS
from headstart.cache import ExtractSummary
from headstart.data import ImageRecord, scan_folder
from headstart.errors import DataError
from headstart.html_report import suspects_section
from headstart.suspects import SuspectLabel, find_suspects, flip_labels, recall_at_k, suspects_for_data


def flipped_csv(root: Path, per_class: int | None, fraction: float = 0.05, seed: int = 0) -> tuple[Path, list[Path]]:
    """A `path,label` CSV of flowers photos (the first `per_class` of each class, or all) with a seeded `fraction` of labels flipped."""
    records, _ = scan_folder(FLOWERS)
    if per_class is not None:
        records = [r for label in sorted({r.label for r in records}) for r in [q for q in records if q.label == label][:per_class]]
    labels, flipped = flip_labels([r.label for r in records], fraction, seed)
    assert all(labels[i] != records[i].label for i in flipped.tolist())
    listing = root / "labels.csv"
    with open(listing, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *([str(r.path), label] for r, label in zip(records, labels, strict=True))])
    return listing, [records[i].path for i in flipped.tolist()]


@pytest.mark.slow
def test_the_top_suspects_of_flowers_with_5_percent_of_labels_flipped_hold_80_percent_of_them(
    tmp_path: Path, flowers_cache: tuple[Path, ExtractSummary]
) -> None:
    listing, flipped = flipped_csv(tmp_path, per_class=None)
    assert len(flipped) == 75
    search = suspects_for_data(listing, cache_dir=flowers_cache[0], seed=0)
    assert search.n_images == 1500 and len(search.suspects) >= len(flipped)
    assert recall_at_k([s.path for s in search.suspects], flipped) >= 0.8
    first = search.suspects[0]
    assert first.rank == 1 and first.p_given < 0.1 and first.suggested != first.given and first.p_suggested > first.p_given
    assert [s.p_given for s in search.suspects] == sorted(s.p_given for s in search.suspects)


def test_the_top_suspects_of_a_flowers_subset_with_flipped_labels_hold_most_of_them(
    tmp_path: Path, flowers_cache: tuple[Path, ExtractSummary]
) -> None:
    """The fast variant: 500 photos, 25 flipped. Fewer photos make a weaker head; 18 of the 25 are found (chance: 1 or 2)."""
    listing, flipped = flipped_csv(tmp_path, per_class=100, fraction=0.05, seed=1)
    search = suspects_for_data(listing, cache_dir=flowers_cache[0], seed=0)
    assert search.n_images == 500 and len(flipped) == 25
    assert recall_at_k([s.path for s in search.suspects], flipped) >= 0.6


def test_find_suspects_ranks_the_lowest_probability_of_the_given_label_first() -> None:
    records = [ImageRecord(Path(f"{i}.jpg"), "ab"[i % 2]) for i in range(40)]
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    proba = np.full((40, 2), 0.05)
    proba[np.arange(40), y] = 0.95 - rng.uniform(0, 0.1, 40)  # confident and right...
    proba[[3, 10], y[[3, 10]]] = [0.01, 0.03]  # ...but for two images, which look like the other class
    proba[[3, 10], 1 - y[[3, 10]]] = 0.97
    proba /= proba.sum(1, keepdims=True)
    found = find_suspects(records, ["a", "b"], y, proba)
    assert [s.path.name for s in found] == ["3.jpg", "10.jpg"]
    assert (found[0].given, found[0].suggested, found[0].rank) == ("b", "a", 1)
    assert found[0].p_given == pytest.approx(proba[3, 1]) and found[0].p_suggested == pytest.approx(proba[3, 0])
    everything = find_suspects(records, ["a", "b"], y, proba, filter_by="none")
    assert len(everything) == 40 and [s.path.name for s in everything[:2]] == ["3.jpg", "10.jpg"]
    with pytest.raises(ValueError, match="expected 40 labels"):
        find_suspects(records, ["a", "b"], y[:5], proba)


def test_too_few_images_per_class_for_cross_validation_is_a_one_line_error(tmp_path: Path) -> None:
    for name, n in (("cats", 3), ("dogs", 1)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for path in sorted((CATS_DOGS_TINY / "train" / name).iterdir())[:n]:
            shutil.copy(path, tmp_path / "data" / name / path.name)
    with pytest.raises(DataError, match=r"2 classes of 2 usable images each; found cats 3, dogs 1\. Add images") as e:
        suspects_for_data(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    run = headstart("check", tmp_path / "data", "--labels", "--val-split", "0", "--cache-dir", tmp_path / "cache")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert [line for line in run.stderr.splitlines() if line.strip()] == [f"Error: {e.value}"]


def headstart(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env.update(COLUMNS="500", NO_COLOR="1")
    return subprocess.run(
        [sys.executable, "-m", "headstart.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=600,
        env=env,
    )


HOSTILE = {"b[bold]c.jpg": "b[bold]c.jpg", "\x1b[31mred.jpg": "\\x1b[31mred.jpg", os.fsdecode(b"f\xffile.jpg"): "f\\xffile.jpg"}


@pytest.mark.subprocess
def test_check_labels_lists_mislabelled_photos_with_hostile_names_and_its_csv_round_trips(
    tmp_path: Path, flowers_cache: tuple[Path, ExtractSummary]
) -> None:
    data = tmp_path / "data"
    for name in ("daisy", "roses", "sunflowers"):
        (data / name).mkdir(parents=True)
        for path in sorted((FLOWERS / name).iterdir())[:12]:
            shutil.copy(path, data / name / path.name)
    intruders = [data / "roses" / name for name in HOSTILE]  # three daisies filed as roses, under hostile names
    for path, daisy in zip(intruders, sorted((FLOWERS / "daisy").iterdir())[20:], strict=False):
        shutil.copy(daisy, path)
    listing = tmp_path / "suspects.csv"
    run = headstart("check", data, "--labels", "--labels-csv", listing, "--cache-dir", flowers_cache[0])
    assert run.returncode == 0 and "Traceback" not in run.stderr and "\x1b" not in run.stdout + run.stderr, run.stdout + run.stderr
    assert "Training can proceed" in run.stdout and "suspect label(s) among 39 images" in run.stdout
    assert all(shown in run.stdout for shown in HOSTILE.values()), run.stdout
    rows = list(csv.DictReader(io.StringIO(listing.read_bytes().decode("utf-8", errors="surrogateescape"), newline="")))
    assert list(rows[0]) == ["rank", "path", "given", "suggested", "p_given", "p_suggested", "quality"]
    by_path = {os.fsencode(r["path"]): r for r in rows}
    for path in intruders:
        row = by_path[os.fsencode(path)]  # the very bytes of the file's name
        assert (row["given"], row["suggested"]) == ("roses", "daisy") and Path(row["path"]).is_file()
        assert float(row["p_given"]) < float(row["p_suggested"]) and int(row["rank"]) <= 5  # ranks 1, 3, 4 of 39 when measured
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))


@pytest.mark.subprocess
def test_check_without_labels_is_unchanged_and_imports_nothing_of_the_suspect_search(tmp_path: Path) -> None:
    probe = (
        "import sys\nfrom headstart.cli.main import run\nsys.argv = ['headstart', 'check', sys.argv[1]]\n"
        "try:\n    run()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(code, sorted(m for m in ('cleanlab', 'sklearn', 'onnxruntime', 'torch', 'pandas') if m in sys.modules))"
    )
    env = {**os.environ, "HEADSTART_CACHE_DIR": str(tmp_path), "NO_COLOR": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", probe, str(CATS_DOGS_TINY)], capture_output=True, text=True, timeout=300, env=env)
    assert done.stdout.splitlines()[-1] == "0 []", done.stdout + done.stderr
    assert "suspect" not in done.stdout.lower() and "Training can proceed" in done.stdout


def test_the_report_section_shows_each_suspect_with_its_given_and_suggested_label() -> None:
    daisy = sorted((FLOWERS / "daisy").iterdir())[0]
    suspects = [
        SuspectLabel(1, daisy, "roses", "daisy", 0.01, 0.98, 0.01),
        SuspectLabel(2, Path("/no/such/<b>x\x1b.jpg"), "<i>", "daisy", 0.2, 0.7, 0.2),  # gone since: left out of the grid
    ]
    body = suspects_section(suspects).body
    assert body.count('class="tile"') == 1 and 'id="suspects"' in body
    assert "#1 given roses (0.01)" in body and "suggested daisy (0.98)" in body and daisy.name in body
    assert "The 1 most suspect of 2 suspect labels" in body and "<i>" not in body and "\x1b" not in body
    assert "No image&#x27;s label is suspect" in suspects_section([]).body
