"""TFLite export: the .tflite file answers as the ONNX file it came from (fp32 and int8), run in LiteRT on real photos."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from PIL import Image

import headstart
from conftest import FLOWERS_TINY, SHARED
from headstart.errors import ConfigError, TFLiteConversionError
from headstart.files import written_by_headstart
from headstart.model_export import INPUT_NAME, OUTPUT_NAME
from headstart.tflite import convert, run_tflite
from headstart.transforms import crop_pixels

FLOWERS = SHARED / "datasets" / "flowers"
needs_converter = pytest.mark.skipif(
    importlib.util.find_spec("onnx2tf") is None or importlib.util.find_spec("ai_edge_litert") is None,
    reason="the tflite extra is not installed: pip install 'headstart[tflite]'",
)  # looked up, not imported: importing TensorFlow at collection would cost every run seconds


def flower_pixels(start: int, per_class: int, model: headstart.Model) -> NDArray[np.uint8]:
    """Photos start..start+per_class of each class of ../shared/datasets/flowers, resized and cropped for `model`."""
    data_config = model.backbone.data_config
    paths = [p for folder in sorted(FLOWERS.iterdir()) for p in sorted(folder.iterdir())[start : start + per_class]]
    return np.stack([crop_pixels(Image.open(p).convert("RGB"), data_config) for p in paths])


def onnx_probabilities(onnx_file: Path, pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    proba: NDArray[np.float32] = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
    return proba


@pytest.fixture(scope="module")
def flowers_model(cache_dir: Path) -> headstart.Model:
    return headstart.train(FLOWERS_TINY, cache_dir=cache_dir, report=False)


@pytest.fixture(scope="module")
def flowers_onnx(flowers_model: headstart.Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from headstart.model_export import onnx_model_bytes

    path = tmp_path_factory.mktemp("tflite") / "flowers.onnx"
    path.write_bytes(onnx_model_bytes(flowers_model))
    return path


@pytest.fixture(scope="module")
def test_pixels(flowers_model: headstart.Model) -> NDArray[np.uint8]:
    return flower_pixels(250, 10, flowers_model)  # 50 photos, none of them in flowers5_tiny


@needs_converter
@pytest.mark.slow
def test_fp32_tflite_answers_as_the_onnx_file(flowers_onnx: Path, test_pixels: NDArray[np.uint8], tmp_path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    out = convert(flowers_onnx, tmp_path / "flowers.tflite")
    assert out == tmp_path / "flowers.tflite" and sorted(p.name for p in tmp_path.iterdir()) == ["flowers.tflite"]
    interpreter = Interpreter(model_path=str(out))
    (inp,) = interpreter.get_input_details()
    assert inp["dtype"] is np.uint8 and list(inp["shape_signature"]) == [-1, 224, 224, 3]
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": [INPUT_NAME], "outputs": [OUTPUT_NAME]}}
    assert written_by_headstart(out) and written_by_headstart(flowers_onnx)  # export may replace them without --force
    expected = onnx_probabilities(flowers_onnx, test_pixels)
    proba = run_tflite(out, test_pixels)
    assert proba.dtype == np.float32 and proba.shape == expected.shape == (50, 5)
    assert np.array_equal(proba.argmax(1), expected.argmax(1))
    assert np.abs(proba - expected).max() < 1e-4  # 2e-6 seen


@needs_converter
@pytest.mark.slow
def test_int8_tflite_is_a_third_the_size_and_agrees_on_real_photos(
    flowers_model: headstart.Model, flowers_onnx: Path, test_pixels: NDArray[np.uint8], tmp_path: Path
) -> None:
    calibration = flower_pixels(200, 20, flowers_model)  # 100 photos, apart from the test ones
    out = convert(flowers_onnx, tmp_path / "flowers.int8.tflite", calibration)
    assert out.stat().st_size < 0.35 * flowers_onnx.stat().st_size
    expected = onnx_probabilities(flowers_onnx, test_pixels)
    proba = run_tflite(out, test_pixels)
    difference = np.abs(proba - expected).max(axis=1)
    assert np.mean(proba.argmax(1) == expected.argmax(1)) >= 0.9  # 98% seen; ONNX Runtime's int8 export: 94%
    assert difference.mean() < 0.1 and difference.max() < 0.5  # 0.04 and 0.19 seen


@needs_converter
@pytest.mark.slow
def test_a_failed_conversion_shows_the_log_raises_one_line_and_writes_nothing(
    flowers_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import onnx2tf

    def failing(**kwargs: object) -> None:
        print("converter chatter")
        print("ERROR: the last words")
        sys.exit(1)

    monkeypatch.setattr(onnx2tf, "convert", failing)
    out = tmp_path / "flowers.tflite"
    with pytest.raises(
        TFLiteConversionError, match=r"^TFLite conversion of flowers\.onnx failed: ERROR: the last words \(the converter's log is above\)$"
    ) as caught:
        convert(flowers_onnx, out)
    assert "\n" not in str(caught.value) and isinstance(caught.value, headstart.HeadstartError)
    assert "converter chatter" in capfd.readouterr().err
    assert list(tmp_path.iterdir()) == []


@needs_converter
def test_a_model_without_headstarts_pixel_input_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    with pytest.raises(ConfigError, match=r"one uint8 input of shape \(n, H, W, 3\)"):
        convert(tmp_path / "other.onnx", tmp_path / "other.tflite")
    assert not (tmp_path / "other.tflite").exists()


def test_calibration_must_be_uint8_pixels(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"calibration must be uint8 RGB pixels of shape \(n, H, W, 3\); got float32"):
        convert(tmp_path / "m.onnx", tmp_path / "m.tflite", np.zeros((2, 224, 224, 3), np.float32))  # type: ignore[arg-type]


def test_a_missing_converter_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx2tf" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"needs onnx2tf, which is not installed: pip install 'headstart\[tflite\]'"):
        convert(tmp_path / "m.onnx", tmp_path / "m.tflite")
