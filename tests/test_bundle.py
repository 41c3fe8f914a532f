"""Model folders load without executing anything, and refuse what is wrong with them."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest

import headstart
from headstart.errors import BundleError


class _MarkerPayload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


@pytest.fixture
def bundle(tiny_model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def rewrite(bundle: Path, name: str, data: bytes) -> None:
    """Replace a model file and record its new size and hash in bundle.json, as a careful tamperer would."""
    (bundle / name).write_bytes(data)
    config = json.loads((bundle / "bundle.json").read_text())
    config["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (bundle / "bundle.json").write_text(json.dumps(config))


def pickled_payload(marker: Path) -> bytes:
    data = pickle.dumps(_MarkerPayload(marker), protocol=4)
    pickle.loads(data)  # the payload really does create the marker when unpickled...
    assert marker.exists()
    marker.unlink()  # ...so its absence below proves headstart never unpickled it
    return data


def test_files_the_model_does_not_list_are_never_read(bundle: Path, tmp_path: Path) -> None:
    """Only the files bundle.json lists are read: a pickle (or a .zip, .npy, .bin) beside them is ignored, never run."""
    marker = tmp_path / "code-ran"
    for name in ("extra_head.pkl", "notes.dat", "archive.zip", "array.npy", "weights.bin"):
        (bundle / name).write_bytes(pickled_payload(marker))
    assert headstart.load(bundle).classes == ["cats", "dogs"]
    assert not marker.exists()


def test_pickle_in_place_of_the_weights_is_refused(bundle: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    (bundle / "model.safetensors").write_bytes(pickled_payload(marker))
    with pytest.raises(BundleError, match="model.safetensors: a pickle; refused"):
        headstart.load(bundle)
    assert not marker.exists()


def test_bad_json_is_refused(bundle: Path) -> None:
    (bundle / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="bundle.json: not valid JSON"):
        headstart.load(bundle)


def test_wrong_class_count_is_refused(bundle: Path) -> None:
    config = json.loads((bundle / "bundle.json").read_text())
    config["classes"] = ["cats", "dogs", "birds"]
    (bundle / "bundle.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="do not match a linear head for 3 classes"):
        headstart.load(bundle)


def test_missing_field_is_named(bundle: Path) -> None:
    config = json.loads((bundle / "bundle.json").read_text())
    del config["backbones"][0]["weights_sha256"]
    (bundle / "bundle.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=r"field 'backbones\[0\].weights_sha256' must be 64 hex digits"):
        headstart.load(bundle)


def test_missing_weights_and_missing_folder(bundle: Path, tmp_path: Path) -> None:
    (bundle / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors: missing"):
        headstart.load(bundle)
    with pytest.raises(BundleError, match="not a headstart model"):
        headstart.load(tmp_path / "nothing-here")


def test_bundle_json_is_plain_data(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "bundle.json").read_text())
    assert config["format_version"] == 7
    assert set(config["files"]) == {"model.safetensors", "metrics.json", "history.json", "history.csv"}
    (backbone,) = config["backbones"]
    assert backbone["name"] == "efficientnet_lite0" and backbone["n_features"] == 1280
    assert len(backbone["weights_sha256"]) == 64
    assert config["classes"] == ["cats", "dogs"]
    assert backbone["data_config"]["input_size"] == 224
    metrics = json.loads((tiny_model_dir / "metrics.json").read_text())
    assert metrics["accuracy"] == config["summary"]["validation"]["accuracy"]


def test_wrong_tensor_shapes_are_refused(bundle: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(bundle / "model.safetensors")
    name = next(k for k, v in tensors.items() if v.ndim == 2)  # the linear layer's weight
    tensors[name] = tensors[name][:, :100].contiguous()
    save_file(tensors, bundle / "model.safetensors")
    with pytest.raises(BundleError, match="differs from the file bundle.json records"):
        headstart.load(bundle)  # caught by the manifest first...
    rewrite(bundle, "model.safetensors", (bundle / "model.safetensors").read_bytes())
    with pytest.raises(BundleError, match=r"1.weight: \(2, 100\) instead of \(2, 1280\)"):
        headstart.load(bundle)  # ...and by the shape check when the manifest was edited to match


def test_unknown_backbone_is_named(bundle: Path) -> None:
    config = json.loads((bundle / "bundle.json").read_text())
    config["backbones"][0]["name"] = "efficientnet_lite9"
    (bundle / "bundle.json").write_text(json.dumps(config))
    with pytest.raises(headstart.HeadstartError, match="efficientnet_lite9"):
        headstart.load(bundle)


def test_truncated_weights_are_refused(bundle: Path) -> None:
    data = (bundle / "model.safetensors").read_bytes()
    (bundle / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="differs from the file bundle.json records"):
        headstart.load(bundle)
    rewrite(bundle, "model.safetensors", data[: len(data) // 2])
    with pytest.raises(BundleError, match="not a safetensors file; refused"):
        headstart.load(bundle)


def test_info_reads_a_bundle_without_loading_weights(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from headstart.cli.main import app

    def forbidden(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("headstart.bundle.load_safetensors", forbidden)
    monkeypatch.setattr("headstart.model.create_backbone", forbidden)
    contents = headstart.info(bundle)
    assert contents.config.classes == ("cats", "dogs") and contents.config.summary.validation is not None
    assert contents.shapes and all(isinstance(shape, list) for shape in contents.shapes.values())  # from the header
    result = CliRunner().invoke(app, ["info", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "efficientnet_lite0" in result.output and "cats, dogs" in result.output and "validation accuracy" in result.output


def test_info_refuses_a_pickle_without_running_it(bundle: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from headstart.cli.main import app

    marker = tmp_path / "code-ran"
    (bundle / "model.safetensors").write_bytes(pickled_payload(marker))
    result = CliRunner().invoke(app, ["info", str(bundle)])
    assert result.exit_code == 1 and "a pickle; refused" in result.output
    assert not marker.exists()
