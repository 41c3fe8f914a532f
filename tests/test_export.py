"""`headstart export`: one ONNX file (uint8 pixels in, probabilities out) that answers as `headstart predict` does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import headstart
from conftest import CATS_DOGS_TINY, FLOWERS, FLOWERS_TINY, PHOTOS
from headstart.cache import ExtractSummary
from headstart.cli.main import app
from headstart.model_export import INPUT_NAME, OUTPUT_NAME, export

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "onnx_predict.py"


def example_predictions(onnx_file: Path, images: list[Path]) -> dict[str, list[tuple[str, float]]]:
    """Top-3 per image from examples/onnx_predict.py, run in a fresh interpreter (ONNX Runtime, Pillow, NumPy only)."""
    run = subprocess.run([sys.executable, str(EXAMPLE), str(onnx_file), *map(str, images)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = [line.split("\t") for line in run.stdout.splitlines()]
    classes = [[cell for cell in row[1:] if "unknown_score" not in cell] for row in rows]  # the verdict column of a model with a detector
    return {row[0]: [(name, float(p)) for name, p in (cell.rsplit(" ", 1) for cell in cells)] for row, cells in zip(rows, classes)}


def assert_same_as_predict(onnx_file: Path, model: Path | headstart.Model, images: list[Path], tolerance: float = 1e-4) -> None:
    """The example's top-1 class is `headstart.predict`'s, and its probabilities (printed to 5 decimals) within `tolerance`."""
    expected = {str(p.path): dict(p.top_k) for p in headstart.predict(model, images, top_k=1000)}
    actual = example_predictions(onnx_file, images)
    assert len(expected) == len(images) == len(actual)
    for path, top in actual.items():
        assert top[0][0] == max(expected[path], key=expected[path].__getitem__), path
        assert all(abs(probability - expected[path][name]) <= tolerance for name, probability in top), (path, top)


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "cats_dogs.onnx"
    result = headstart.export(tiny_model_dir, out)
    assert result.path == out and result.size_bytes == out.stat().st_size
    return out


def test_onnx_file_is_valid_and_carries_classes_and_preprocessing(exported: Path, tiny_model_dir: Path) -> None:
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto, full_check=True)
    (image,) = proto.graph.input
    output = proto.graph.output[0]  # then "unknown_score", for a model with an unknown detector
    assert (image.name, output.name) == (INPUT_NAME, OUTPUT_NAME)
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value or d.dim_param for d in image.type.tensor_type.shape.dim] == ["batch", 224, 224, 3]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == ["cats", "dogs"]
    prep = json.loads(meta["preprocessing"])
    assert (prep["resize_size"], prep["input_size"], prep["interpolation"]) == (256, 224, "bicubic")
    assert meta["headstart_version"] == headstart.__version__ and meta["backbone"] == "efficientnet_lite0"


def test_standalone_example_answers_as_headstart_predict(exported: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Real photos, and the odd kinds the recipe spells out: 16-bit grey, transparency, EXIF rotation, a large JPEG."""
    from PIL import Image

    cat = Image.open(sorted((CATS_DOGS_TINY / "val" / "cats").iterdir())[0]).convert("RGB")
    grey = np.asarray(cat.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    rgba = cat.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(cat.size))
    rgba.save(tmp_path / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    cat.save(tmp_path / "rotated.jpg", exif=exif)
    cat.resize((cat.width * 6, cat.height * 6)).save(tmp_path / "large.jpg", quality=90)
    odd = [tmp_path / name for name in ("grey16.png", "alpha.png", "rotated.jpg", "large.jpg")]
    images = sorted(PHOTOS.iterdir()) + sorted((CATS_DOGS_TINY / "val" / "cats").iterdir())[:3] + odd
    assert_same_as_predict(exported, tiny_model_dir, images)


def test_export_is_checked_against_the_model_on_its_validation_photos(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = headstart.export(tiny_model_dir, tmp_path / "m.onnx")
    check = result.check
    assert check is not None and check.n_images == 20  # cats_dogs_tiny's val/
    assert check.agreement == 1.0 and check.max_difference < 1e-5
    assert check.accuracy == check.reference_accuracy


def test_mlp_head_exports_with_parity(cache_dir: Path, tmp_path: Path) -> None:
    model = headstart.train(CATS_DOGS_TINY, head="mlp", cache_dir=cache_dir, report=False)
    result = export(model, tmp_path / "mlp.onnx")
    assert result.check is not None and result.check.agreement == 1.0 and result.check.max_difference < 1e-5
    head = [
        (n.name, n.op_type)
        for n in onnx.load(str(tmp_path / "mlp.onnx")).graph.node
        if n.name.startswith(("headstart/dense", "headstart/relu"))
    ]
    assert head == [("headstart/dense1", "Gemm"), ("headstart/relu", "Relu"), ("headstart/dense4", "Gemm")]


def test_cli_export_writes_beside_the_model_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "my model"
    shutil.copytree(tiny_model_dir, folder)
    before = sorted(p.name for p in folder.iterdir())
    result = CliRunner().invoke(app, ["export", str(folder)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "my model.onnx").is_file()
    assert "same top-1 class" in result.output and "100.00%" in result.output
    assert sorted(p.name for p in folder.iterdir()) == before  # the model folder is left as it was


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "model.txt"], "give a file name ending in .onnx"),
        (["--format", "tflite", "--out", "m.onnx"], "give a file name ending in .tflite"),
        (["--format", "pdf"], "Invalid value for '--format'"),
    ],
)
def test_cli_export_refuses_bad_options_in_one_line(tiny_model_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["export", str(tiny_model_dir), *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_export_never_writes_through_a_link_or_into_its_inputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    photo = tmp_path / "photo.jpg"
    shutil.copy(PHOTOS / "dog.jpg", photo)
    (tmp_path / "photo.onnx").symlink_to(photo)
    (tmp_path / "weights.onnx").symlink_to(folder / "model.safetensors")
    before = {p: p.read_bytes() for p in (photo, folder / "model.safetensors")}
    for out, message in (("photo.onnx", "a link to"), ("weights.onnx", "a link to"), ("m/inside.onnx", "is inside an input")):
        result = CliRunner().invoke(app, ["export", str(folder), "--out", str(tmp_path / out)])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert {p: p.read_bytes() for p in before} == before
    assert not (folder / "inside.onnx").exists()
    for args, message in ((["/"], "not a model folder"), ([str(folder), "--calibration", str(PHOTOS)], "give it with --int8")):
        result = CliRunner().invoke(app, ["export", *args])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output


def test_export_of_a_moved_model_is_written_but_not_checked(tiny_model: headstart.Model, tmp_path: Path) -> None:
    import dataclasses

    from headstart.data import ImageRecord

    moved = tmp_path / "gone.jpg"
    summary = dataclasses.replace(tiny_model.summary, val_images=(ImageRecord(moved, "cats"),))
    model = headstart.Model(tiny_model.backbone, tiny_model.head, summary, tiny_model.cache_root)
    result = export(model, tmp_path / "m.onnx")
    assert result.check is None and (tmp_path / "m.onnx").is_file()
    with pytest.raises(headstart.HeadstartError, match="Give the file to write"):
        headstart.export(model)


@pytest.mark.slow
def test_earlier_layer_and_finetuned_models_export_with_parity(tmp_path: Path) -> None:
    layered = headstart.train(FLOWERS_TINY, layer=-2, cache_dir=tmp_path / "c", report=False)
    finetuned = headstart.train(CATS_DOGS_TINY, strategy="finetune", epochs=1, augment="none", cache_dir=tmp_path / "c", report=False)
    for name, model, data in (("layered", layered, FLOWERS_TINY), ("finetuned", finetuned, CATS_DOGS_TINY)):
        result = export(model, tmp_path / f"{name}.onnx")
        assert result.check is not None and result.check.agreement == 1.0 and result.check.max_difference < 1e-4
        assert_same_as_predict(tmp_path / f"{name}.onnx", model, sorted(p for p in data.rglob("*.jpg"))[:6])


@pytest.fixture(scope="module")
def flowers_model(flowers_cache: tuple[Path, ExtractSummary]) -> headstart.Model:
    return headstart.train(FLOWERS, cache_dir=flowers_cache[0], report=False)


@pytest.mark.slow
def test_flowers_photos_get_the_same_answer_from_the_export(flowers_model: headstart.Model, tmp_path: Path) -> None:
    """Every 30th flower photo through the standalone example (bench/export.py runs all 1,500)."""
    export(flowers_model, tmp_path / "flowers.onnx")
    photos = sorted(p for p in FLOWERS.rglob("*") if p.is_file())[::30]
    assert len(photos) == 50
    assert_same_as_predict(tmp_path / "flowers.onnx", flowers_model, photos)


@pytest.mark.slow
def test_int8_calibrates_on_a_flat_folder_of_photos(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["export", str(tiny_model_dir), "--int8", "--calibration", str(PHOTOS), "--out", str(tmp_path / "m.onnx")]
    )
    assert result.exit_code == 0, result.output
    assert "int8 ONNX" in result.output and "smaller than fp32 ONNX" in result.output
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")), full_check=True)


@pytest.mark.slow
def test_int8_export_of_flowers_agrees_with_fp32(flowers_model: headstart.Model, tmp_path: Path) -> None:
    """Calibrated on its recorded validation photos: top-1 agreement >= 99% and validation accuracy within 1 point of fp32."""
    result = export(flowers_model, tmp_path / "flowers.int8.onnx", int8=True)
    check = result.check
    assert check is not None and check.n_images == 300
    assert check.agreement >= 0.99
    assert check.accuracy >= check.reference_accuracy - 0.01
    assert result.reference_size_bytes is not None and result.size_bytes < result.reference_size_bytes / 3


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from Linux's /proc")
def test_int8_calibration_memory_does_not_grow_with_the_photos(exported: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """40 calibration photos: every activation of all of them at once took 2.7 GB (6.6 GB for 100); a batch at a time, 0.6 GB.

    `exported` has already put the backbone's ONNX file in the cache, so the child's peak is the int8 export's alone
    (VmHWM: ru_maxrss would count the forked pytest process, as Linux keeps it across exec).
    """
    script = (
        "import re, sys, headstart\n"
        "headstart.export(sys.argv[1], sys.argv[2], int8=True, calibration=sys.argv[3])\n"
        "print(re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tiny_model_dir), str(tmp_path / "m.int8.onnx"), str(FLOWERS_TINY)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    peak = int(run.stdout.split()[-1]) * 1024
    assert peak < 1.5 * 2**30, f"peak {peak / 2**30:.2f} GB"


def _int8_without_quantising(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Stand in for the quantiser (the fp32 file is written as it is): the number of calibration photos of each call."""
    import headstart.model_export

    counts: list[int] = []

    def quantize(fp32_path: Path, calibration: tuple[np.ndarray, ...], workdir: Path, progress: object = None) -> bytes:
        counts.append(len(calibration[0]))
        return fp32_path.read_bytes()

    monkeypatch.setattr(headstart.model_export, "quantize_int8", quantize)
    return counts


def test_int8_calibrates_on_the_recorded_photos_and_never_searches_a_folder_the_model_names(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bundle.json's `summary.data` ("/usr" scanned /usr; "/" walked the whole file system) is only a record, never searched."""
    import os

    from conftest import write_image

    elsewhere = tmp_path / "elsewhere"
    for name in ("a/1.png", "a/2.png", "b/1.png", "b/2.png"):
        write_image(elsewhere / name, (90, 120, 200))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "bundle.json").read_text())
    config["summary"]["data"] = str(elsewhere)
    (folder / "bundle.json").write_text(json.dumps(config))
    counts = _int8_without_quantising(monkeypatch)
    listed: list[str] = []
    with monkeypatch.context() as patch:
        for name in ("scandir", "listdir"):
            original = getattr(os, name)

            def recording(path: object = ".", original: Any = original) -> Any:
                if isinstance(path, str | os.PathLike):
                    listed.append(os.fspath(path))
                return original(path)

            patch.setattr(os, name, recording)
        result = headstart.export(folder, tmp_path / "m.int8.onnx", int8=True)
    assert result.int8 and counts == [20]  # cats_dogs_tiny's 20 recorded validation photos
    assert not [p for p in listed if Path(p).resolve().is_relative_to(elsewhere.resolve())]


def test_int8_calibration_folder_that_does_not_exist_is_named_as_missing(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = _int8_without_quantising(monkeypatch)
    missing = tmp_path / "nonexistent"
    result = CliRunner().invoke(
        app, ["export", str(tiny_model_dir), "--int8", "--calibration", str(missing), "--out", str(tmp_path / "m.onnx")]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{missing}: no such file or folder" in " ".join(result.output.split()) and not counts
