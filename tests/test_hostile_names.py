"""Names are data: class folders, file names and CSV labels that are Rich markup, mathtext, control characters or not UTF-8.

Each command runs as a user would run it, in a subprocess, on a small dataset of such names; its output must
name each file and class (in the escaped form `files.display` gives) and never pass a control character through.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import write_image

pytestmark = pytest.mark.subprocess

MATHTEXT = "cost$\\broken$"  # a class folder matplotlib would parse as maths, and fail on
NOT_UTF8 = os.fsdecode(b"caf\xe9")  # a Latin-1 folder name: no valid UTF-8
MARKUP_ESC = "[bold]esc\x1b[2J"  # a class folder that is Rich markup and clears the screen
FILES = ["b[bold]c.jpg", "\x1b[31mred.jpg", os.fsdecode(b"f\xffile.jpg"), "new\nline.jpg", "plain.jpg"]
COLOURS = {MATHTEXT: (200, 40, 40), NOT_UTF8: (40, 40, 200), MARKUP_ESC: (40, 200, 40)}
# How each name must appear on screen and in the report.
SHOWN = {
    MATHTEXT: "cost$\\broken$",
    NOT_UTF8: "caf\\xe9",
    MARKUP_ESC: "[bold]esc\\x1b[2J",
    "b[bold]c.jpg": "b[bold]c.jpg",
    "\x1b[31mred.jpg": "\\x1b[31mred.jpg",
    FILES[2]: "f\\xffile.jpg",
    "new\nline.jpg": "new\\x0aline.jpg",
    "[/]": "[/]",
    "[red]x": "[red]x",
}


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        """stdout and stderr, which must be valid UTF-8."""
        return self.stdout.decode() + self.stderr.decode()


def headstart(*args: str | Path, cwd: Path | None = None) -> Run:
    """Run the real CLI; wide columns so that no name is wrapped, and no colour, so any ESC byte came from a name."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env.update(COLUMNS="500", NO_COLOR="1")
    done = subprocess.run([sys.executable, "-m", "headstart.cli.main", *map(str, args)], capture_output=True, timeout=600, env=env, cwd=cwd)
    return Run(done.returncode, done.stdout, done.stderr)


def assert_clean(run: Run, *names: str) -> None:
    """Exit 0, no traceback, no raw ESC, each name shown in its escaped form."""
    assert run.returncode == 0, run.text
    assert b"Traceback" not in run.stdout + run.stderr and b"\x1b" not in run.stdout + run.stderr, run.text
    for name in names:
        assert SHOWN[name] in run.text, (SHOWN[name], run.text)


def hostile_set(root: Path, shade: int = 0) -> Path:
    """folders/: three hostile class folders of hostile file names (and one non-image); labels.csv: markup labels.
    Another `shade` gives other photos under the same names (ones a model trained on the first has not seen)."""
    for k, (name, colour) in enumerate(COLOURS.items()):
        for j, file in enumerate(FILES):
            write_image(root / "folders" / name / file, (colour[0] + shade + 3 * j, colour[1] + k, colour[2]), size=(40, 32))
    (root / "folders" / MATHTEXT / "notes\x1b[2J.txt").write_text("not a photo")
    usable_in_csv = [f for f in FILES if f != FILES[2]]  # the CSV itself is UTF-8
    rows = [[f"folders/{MATHTEXT}/{f}", "[/]"] for f in usable_in_csv] + [[f"folders/{MARKUP_ESC}/{f}", "[red]x"] for f in usable_in_csv]
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["path", "label"], *rows])
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hostile_set(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same names over other photos: evaluate and report leave out the photos a head was fitted on."""
    return hostile_set(tmp_path_factory.mktemp("unseen"), shade=40)


@pytest.fixture(scope="module")
def trained(data: Path) -> dict[str, tuple[Path, Run]]:
    """A model trained (with its report) on the folders and one on the CSV, and each `train` run."""
    runs = {}
    for name, source in (("folders", data / "folders"), ("csv", data / "labels.csv")):
        model = data / f"model-{name}"
        runs[name] = (model, headstart("train", source, "--out", model, "--cache-dir", data / "cache"))
    return runs


@pytest.fixture(scope="module")
def models(trained: dict[str, tuple[Path, Run]]) -> dict[str, Path]:
    for _, run in trained.values():
        assert run.returncode == 0, run.text
    return {name: model for name, (model, _) in trained.items()}


def test_train_shows_every_name_and_writes_the_report(trained: dict[str, tuple[Path, Run]]) -> None:
    model, run = trained["folders"]
    assert_clean(run, MATHTEXT, NOT_UTF8, MARKUP_ESC)
    assert "notes\\x1b[2J.txt" in run.text  # the skipped non-image, named safely
    page = (model / "report.html").read_text()
    assert "cost$\\broken$" in page and "caf\\xe9" in page and "[bold]esc\\x1b[2J" in page and "\x1b" not in page
    model, run = trained["csv"]
    assert_clean(run, "[/]", "[red]x")
    assert "[/]" in (model / "report.html").read_text()


def test_info_shows_class_names_that_are_markup_and_control_characters(models: dict[str, Path]) -> None:
    assert_clean(headstart("info", models["folders"]), MATHTEXT, NOT_UTF8, MARKUP_ESC)
    assert_clean(headstart("info", models["csv"]), "[/]", "[red]x")


def test_predict_names_each_file_and_its_csv_round_trips_non_utf8_paths(data: Path, models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    run = headstart("predict", models["folders"], data / "folders", "--csv", out)
    assert_clean(run, MATHTEXT, NOT_UTF8, MARKUP_ESC, *FILES[:4])
    rows = list(csv.DictReader(io.StringIO(out.read_bytes().decode("utf-8", errors="surrogateescape"), newline="")))
    on_disk = sorted(os.fsencode(p) for p in (data / "folders").rglob("*.jpg"))
    assert sorted(os.fsencode(r["path"]) for r in rows) == on_disk
    assert all(Path(r["path"]).is_file() for r in rows)


def test_evaluate_shows_hostile_class_names(unseen: Path, models: dict[str, Path]) -> None:
    assert_clean(headstart("evaluate", models["folders"], unseen / "folders"), MATHTEXT, NOT_UTF8, MARKUP_ESC)
    assert_clean(headstart("evaluate", models["csv"], unseen / "labels.csv"), "[/]", "[red]x")


def test_explain_draws_hostile_names(data: Path, models: dict[str, Path], tmp_path: Path) -> None:
    run = headstart("explain", models["folders"], data / "folders" / MATHTEXT, data / "folders" / NOT_UTF8, "--out", tmp_path)
    assert_clean(run)
    assert "Wrote 10 heatmap(s)" in run.text and len(list(tmp_path.glob("*_gradcam.png"))) == 10


def test_report_rebuilds_with_hostile_names(unseen: Path, models: dict[str, Path], tmp_path: Path) -> None:
    assert_clean(headstart("report", models["folders"], unseen / "folders", "--out", tmp_path / "r.html"))
    page = (tmp_path / "r.html").read_text()
    assert "cost$\\broken$" in page and "caf\\xe9" in page and "\x1b" not in page
    assert_clean(headstart("report", models["csv"], unseen / "labels.csv", "--out", tmp_path / "csv.html"))
    assert "[red]x" in (tmp_path / "csv.html").read_text()


def test_check_lists_hostile_names(data: Path, tmp_path: Path) -> None:
    run = headstart("check", data / "folders", cwd=tmp_path)
    assert_clean(run, NOT_UTF8)
    assert "notes\\x1b[2J.txt" in run.text and not list(tmp_path.iterdir())
