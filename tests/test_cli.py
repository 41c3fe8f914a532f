"""The command line mirrors the API: run each command as a user would."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

import headstart
from conftest import CATS_DOGS_TINY, FLOWERS_TINY, PHOTOS, unseen_cats_dogs
from headstart.cli.main import app
from headstart.errors import DataError

runner = CliRunner()


@pytest.mark.slow
def test_train_prints_accuracy_and_saves(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["train", str(FLOWERS_TINY), "--out", str(tmp_path / "m"), "--head", "mlp", "--cache-dir", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    assert "Validation accuracy" in result.output and "daisy" in result.output
    assert "40 images run through the backbone" in result.output
    assert (tmp_path / "m" / "metrics.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()


def test_predict_writes_csv(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(tiny_model_dir), str(CATS_DOGS_TINY / "val" / "cats"), "--top-k", "2", "--csv", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 10 and set(rows[0]) == {"path", "label", "probability", "label_2", "probability_2", "unknown", "unknown_score"}
    assert sum(r["label"] == "cats" for r in rows) >= 8
    assert "Wrote 10 rows" in result.output


def test_evaluate_prints_report_and_confusion_matrix(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(tiny_model_dir), str(unseen_cats_dogs(tmp_path / "unseen"))])
    assert result.exit_code == 0, result.output
    assert "Accuracy" in result.output and "precision" in result.output and "Confusion matrix" in result.output


def test_imagenet_names_the_subject() -> None:
    result = runner.invoke(app, ["imagenet", str(PHOTOS / "sk_coffee.png"), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "espresso" in result.output


def test_backbones_lists_offline_weights() -> None:
    result = runner.invoke(app, ["backbones"])
    assert result.exit_code == 0
    assert "efficientnet_lite0" in result.output and "timm:<model>" in result.output


def test_errors_are_one_line_with_exit_code_1(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error:") and "no such file or folder" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "cause"),
    [
        (["train", "{tmp}/empty"], "found no images"),
        (["train", str(CATS_DOGS_TINY), "--backbone", "efficientnet_lite9"], "Unknown backbone"),
        (["predict", "{tmp}/bad-model", str(PHOTOS / "sk_coffee.png")], "bundle.json: not valid JSON"),
        (["info", "{tmp}/bad-model"], "bundle.json: not valid JSON"),
        (["check", "{tmp}/nowhere"], "no such file or folder"),
    ],
)
def test_each_failure_is_one_line_naming_the_cause(tmp_path: Path, args: list[str], cause: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad-model").mkdir()
    (tmp_path / "bad-model" / "bundle.json").write_text("{not json")
    result = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and cause in lines[0]


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--debug", "train", str(tmp_path / "missing")])
    assert isinstance(result.exception, DataError)


@pytest.mark.parametrize("args", [["predict", "nowhere", "x.jpg"], ["evaluate", "nowhere", "data"]])
def test_missing_model_folder(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "not a headstart model" in result.output


def test_a_full_disk_is_one_line_and_the_saved_model_survives(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os
    import shutil

    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("headstart.files.os.fsync", full_disk)
    result = CliRunner().invoke(app, ["train", str(CATS_DOGS_TINY), "--out", str(out), "--no-report"])
    assert result.exit_code == 1
    lines = [line for line in result.output.strip().splitlines() if "no space left" in line]
    assert len(lines) == 1 and lines[0].startswith("Error: /") and "--cache-dir" in lines[0], result.output  # names the file
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the old model is intact
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_the_training_summary_says_how_the_head_was_chosen(
    tiny_model: headstart.Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from headstart.cli import render

    render.training(tiny_model, tmp_path)
    line = " ".join(capsys.readouterr().out.split())
    C = tiny_model.head.params["C"]
    assert f"(C={C:g} chosen by 5-fold cross-validation)" in line, line
