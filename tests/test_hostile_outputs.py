"""Output options never replace the user's files, devices or inputs; bad seeds and splits are one-line errors (from a second hostile run)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import CATS_DOGS_TINY, unseen_cats_dogs
from headstart.cli.main import app


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    return Path(shutil.copy(next(CATS_DOGS_TINY.rglob("*.jpg")), tmp_path / "X.jpg"))


def test_check_never_writes_its_csv_over_the_dataset_csv(tmp_path: Path) -> None:
    data = tmp_path / "mine.csv"
    data.write_text("".join(f"{p},{p.parent.name}\n" for p in sorted((CATS_DOGS_TINY / "train").rglob("*.jpg"))))
    before = digest(data)
    code, output = run("check", str(data), "--csv", str(data))
    assert code == 1 and "is also an input of this command" in output
    assert digest(data) == before


def test_output_options_never_replace_a_photo_a_device_or_a_model_file(photo: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    before = digest(photo)
    os.mkfifo(tmp_path / "out.fifo.csv")
    (tmp_path / "null.csv").symlink_to("/dev/null")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = digest(model / "model.safetensors")
    attempts = [
        (["predict", str(model), str(photo), "--csv", str(photo)], "give a file name ending in .csv"),
        (["predict", str(model), str(photo), "--csv", str(tmp_path / "out.fifo.csv")], "exists and is not a regular file"),
        (["predict", str(model), str(photo), "--csv", str(tmp_path / "null.csv")], "exists and is not a regular file"),
        (["imagenet", str(photo), "--grid", str(photo)], "give a file name ending in .png"),
        (["augment-preview", str(CATS_DOGS_TINY), "--out", str(tmp_path / "loop.png")], "a symbolic link loop"),
        (["report", str(model), "--out", str(model / "model.safetensors")], "give a file name ending in .html"),
    ]
    for args, message in attempts:
        code, output = run(*args)
        assert code == 1 and message in output, (args, output)
    assert digest(photo) == before and digest(model / "model.safetensors") == weights
    assert (tmp_path / "out.fifo.csv").is_fifo() and os.readlink(tmp_path / "null.csv") == "/dev/null"


def test_explain_and_activations_never_write_over_files_already_there(photo: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mine = [out / "X_gradcam.png", out / "X_activations.png"]
    for path in mine:
        path.write_text("my own file")
    assert run("explain", str(tiny_model_dir), str(photo), "--out", str(out))[0] == 0
    assert run("activations", "efficientnet_lite0", str(photo), "--out", str(out))[0] == 0
    assert all(path.read_text() == "my own file" for path in mine)
    assert sorted(p.name for p in out.iterdir()) == ["X_2_activations.png", "X_2_gradcam.png", "X_activations.png", "X_gradcam.png"]


def test_train_into_a_symlink_loop_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    code, output = run("train", str(CATS_DOGS_TINY), "--out", str(tmp_path / "a"), "--cache-dir", str(tmp_path / "cache"))
    assert code == 1 and "a symbolic link loop" in output
    assert not (tmp_path / "cache").exists()  # refused before any feature was computed


@pytest.mark.parametrize(
    "command", [["train", str(CATS_DOGS_TINY), "--out", "x"], ["check", str(CATS_DOGS_TINY)], ["augment-preview", str(CATS_DOGS_TINY)]]
)
@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seeds_out_of_range_are_usage_errors(command: list[str], seed: str) -> None:
    code, output = run(*command, "--seed", seed)
    assert code == 2 and "--seed" in output


@pytest.mark.parametrize("val_split", ["1", "-3"])
def test_check_refuses_the_validation_fractions_train_refuses(val_split: str) -> None:
    code, output = run("check", str(CATS_DOGS_TINY), "--val-split", val_split)
    assert code == 1 and "val_split must be in [0, 1)" in output


def test_report_without_any_readable_validation_image_says_so(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((model / "bundle.json").read_text())
    assert config["summary"]["val_images"]
    config["summary"]["val_images"] = [[str(tmp_path / "gone" / f"{i}.jpg"), "cats"] for i in range(3)]
    config["summary"]["refit"] = False  # a head fitted on the training split alone: the validation split is held out
    (model / "bundle.json").write_text(json.dumps(config))
    code, output = run("report", str(model))
    assert code == 1 and "no readable images; 3 skipped" in output and "Give labelled images: headstart report" in output
    assert not (model / "report.html").exists()


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


def test_no_output_option_writes_into_a_model_folder(tiny_model_dir: Path, tmp_path: Path, photo: Path) -> None:
    """A third hostile run overwrote a model's own files through --csv, --labels-csv, --out and --html."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    other = shutil.copytree(tiny_model_dir, tmp_path / "other")
    (model / "history.csv").write_text("epoch,loss\n")  # as a fine-tuned model has
    before = folder_digest(model), folder_digest(other)
    attempts = [
        ["check", str(CATS_DOGS_TINY), "--csv", str(model / "history.csv")],
        ["check", str(CATS_DOGS_TINY), "--csv", str(other / "report.csv")],
        ["check", str(CATS_DOGS_TINY), "--labels", "--model", str(model), "--labels-csv", str(model / "metrics.csv")],
        ["predict", str(model), str(photo), "--csv", str(model / "history.csv")],
        ["predict", str(model), str(photo), "--csv", str(other / "history.csv")],
        ["predict", str(model), str(photo), "--out", str(model / "predictions.parquet")],
        ["compare", str(CATS_DOGS_TINY), "--html", str(model / "report.html")],
        ["compare", str(CATS_DOGS_TINY), "--csv", str(other / "rows.csv")],
        ["export", str(model), "--out", str(other / "m.onnx")],
        ["augment-preview", str(CATS_DOGS_TINY), "--out", str(other / "grid.png")],
        ["report", str(model), str(CATS_DOGS_TINY), "--out", str(other / "report.html")],
        ["explain", str(model), str(photo), "--out", str(model)],
        ["explain", str(model), str(photo), "--out", str(other / "cams")],
        ["activations", str(model), str(photo), "--out", str(other)],
    ]
    for args in attempts:
        code, output = run(*args)
        assert code == 1 and ("inside the model folder" in output or "inside an input of this command" in output), (args, output)
    assert (folder_digest(model), folder_digest(other)) == before


def test_outputs_replace_only_files_headstart_wrote_unless_forced(tiny_model_dir: Path, tmp_path: Path, photo: Path) -> None:
    """export --out and predict --out/--csv silently replaced a user's own file of the same name."""
    for name in ("mine.onnx", "mine.parquet", "mine.csv", "grid.png"):
        (tmp_path / name).write_bytes(b"the user's own file")
    attempts = [
        ["export", str(tiny_model_dir), "--out", str(tmp_path / "mine.onnx")],
        ["predict", str(tiny_model_dir), str(photo), "--out", str(tmp_path / "mine.parquet")],
        ["predict", str(tiny_model_dir), str(photo), "--csv", str(tmp_path / "mine.csv")],
        ["augment-preview", str(CATS_DOGS_TINY), "--out", str(tmp_path / "grid.png")],
    ]
    for args in attempts:
        code, output = run(*args)
        assert code == 1 and "headstart did not write it" in output and "--force" in output, (args, output)
        assert Path(args[-1]).read_bytes() == b"the user's own file"
    for args in attempts:  # --force replaces them; then each is headstart's own, replaced again without --force
        assert run(*args, "--force")[0] == 0, args
        code, output = run(*args)
        assert code == 0, (args, output)
        assert Path(args[-1]).read_bytes() != b"the user's own file"


def test_a_rebuilt_report_never_headlines_a_score_on_images_the_head_was_fitted_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`report MODEL` scored the refitted head on its own training images: accuracy 1.0, a perfect confusion matrix."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    code, output = run("report", str(model))
    assert code == 1 and "refitted on every labelled image" in output and "out-of-fold" in output, output
    assert not (model / "report.html").exists()
    code, output = run("report", str(model), str(unseen_cats_dogs(tmp_path / "unseen")))  # labelled images the head has not seen are scored
    assert code == 0 and (model / "report.html").is_file(), output


def test_export_checked_on_fitted_photos_shows_no_accuracy(tiny_model_dir: Path, tmp_path: Path) -> None:
    code, output = run("export", str(tiny_model_dir), "--out", str(tmp_path / "m.onnx"))
    assert code == 0 and "training photos (the head was fitted on them: agreement only)" in output, output
    assert "accuracy" not in output and "same top-1 class" in output


def test_evaluate_and_report_leave_out_the_images_the_head_was_fitted_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`evaluate MODEL DATA` and `report MODEL DATA` on the refit's own images headlined accuracy 1.0."""
    fitted = CATS_DOGS_TINY / "val"  # the default refit fits the head on train/ and val/
    code, output = run("evaluate", str(tiny_model_dir), str(fitted))
    assert code == 1 and "the head was fitted on all 20 of these images" in output, output
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    code, output = run("report", str(model), str(fitted), "--out", str(tmp_path / "r.html"))
    assert code == 1 and "the head was fitted on all 20" in output and not (tmp_path / "r.html").exists(), output
    mixed = shutil.copytree(unseen_cats_dogs(tmp_path / "unseen"), tmp_path / "mixed")
    for label in ("cats", "dogs"):
        for photo in (fitted / label).iterdir():
            shutil.copy(photo, mixed / label)
    code, output = run("evaluate", str(tiny_model_dir), str(mixed))
    assert code == 0 and "on 6 images" in output and "Skipped 20 file(s)" in output and "fitted on this image" in output, output


def test_explain_into_a_file_says_it_needs_a_folder(tiny_model_dir: Path, tmp_path: Path, photo: Path) -> None:
    existing = tmp_path / "existing.jpg"
    existing.write_bytes(b"mine")
    code, output = run("explain", str(tiny_model_dir), str(photo), "--out", str(existing))
    assert code == 1 and "exists and is not a folder" in output and existing.read_bytes() == b"mine", output


def test_train_never_saves_the_model_inside_its_data(tmp_path: Path) -> None:
    """A model saved inside the data folder was read back as bad photos by the next check."""
    data = shutil.copytree(CATS_DOGS_TINY, tmp_path / "data")
    code, output = run("train", str(data), "--out", str(data / "model"), "--no-report")
    assert code == 1 and "inside the data folder" in output and not (data / "model").exists(), output
