"""A backbone made from a weights file: the model folder keeps its own copy, checked before it is read, and nothing a
model names outside its folder is read; a weights file that could unpack to more than its size, or run code, is refused."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import headstart
from conftest import FLOWERS_TINY
from headstart import api
from headstart.cli.main import app
from headstart.errors import BackboneWeightsError, BundleError
from headstart.weights import read_state_dict
from test_backbones import random_weights

IMAGES = sorted(FLOWERS_TINY.glob("daisy/*"))[:3]


@pytest.fixture(scope="module")
def from_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """A model on timm:test_resnet from a .pth file, saved: (its folder, the weights file, its probabilities on IMAGES)."""
    root = tmp_path_factory.mktemp("from-file")
    weights = random_weights(root / "w.pth", seed=0)
    model = headstart.train(FLOWERS_TINY, backbone="timm:test_resnet", weights=weights, cache_dir=root / "cache", report=False)
    return model.save(root / "model"), weights, model.predict_proba(IMAGES)


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def _never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path) -> None:
        pytest.fail(f"{path} was read")

    monkeypatch.setattr("headstart.weights.read_state_dict", refuse)


def test_the_folder_keeps_the_weights_and_loads_without_the_original(
    from_file: tuple[Path, Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _, proba = from_file
    moved = _copy(folder, tmp_path)
    record = json.loads((moved / "bundle.json").read_text())
    assert record["backbones"][0]["weights_file"] == "backbone.safetensors" and "backbone.safetensors" in record["files"]
    monkeypatch.chdir(tmp_path)  # the copy is found in the folder, never from the current folder
    monkeypatch.setattr("headstart.model.default_cache_dir", lambda: tmp_path / "empty-cache")  # its network is built from the copy
    np.testing.assert_allclose(headstart.load(moved).predict_proba(IMAGES), proba, atol=1e-6)


def _as_format_6(folder: Path, weights_file: str) -> None:
    """Rewrite `folder` as headstart saved it before format 7: the weights file's path recorded, no copy."""
    config = json.loads((folder / "bundle.json").read_text())
    config["format_version"] = 6
    config["backbones"][0]["weights_file"] = weights_file
    del config["files"]["backbone.safetensors"]
    (folder / "backbone.safetensors").unlink()
    (folder / "bundle.json").write_text(json.dumps(config))


def test_a_weights_path_outside_the_folder_is_never_read(
    from_file: tuple[Path, Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, weights, proba = from_file
    moved = _copy(folder, tmp_path)
    _as_format_6(moved, str(weights))
    with monkeypatch.context() as patch:
        _never_read(patch)
        with pytest.raises(BundleError, match=r"names the weights file '.*w\.pth', outside the model folder.*weights=FILE"):
            headstart.load(moved)
        result = CliRunner().invoke(app, ["predict", str(moved), str(IMAGES[0])])
        assert result.exit_code == 1 and "outside the model folder" in result.output and "Traceback" not in result.output
        with pytest.raises(BundleError, match="outside the model folder"):
            api.check_labels(FLOWERS_TINY, model=moved)  # the sibling: --model's backbone, for suspect labels
    np.testing.assert_allclose(headstart.load(moved, weights=weights).predict_proba(IMAGES), proba, atol=1e-6)  # given by the user
    resaved = headstart.load(headstart.load(moved, weights=weights).save(tmp_path / "resaved"))  # now with its own copy
    np.testing.assert_allclose(resaved.predict_proba(IMAGES), proba, atol=1e-6)


def test_a_relative_weights_path_is_the_model_folders_never_the_current_folders(
    from_file: tuple[Path, Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, weights, proba = from_file
    moved = _copy(folder, tmp_path)
    _as_format_6(moved, "w.pth")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    random_weights(elsewhere / "w.pth", seed=1)  # other weights, where a path relative to the current folder would lead
    monkeypatch.chdir(elsewhere)
    with pytest.raises(BackboneWeightsError, match=f"{moved / 'w.pth'}: weights file not found"):
        headstart.load(moved)
    shutil.copy(weights, moved / "w.pth")
    np.testing.assert_allclose(headstart.load(moved).predict_proba(IMAGES), proba, atol=1e-6)


@pytest.mark.parametrize("link", [False, True], ids=["swapped", "linked-outside"])
def test_a_weights_file_that_is_not_the_recorded_one_is_refused_before_it_is_read(
    from_file: tuple[Path, Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, link: bool
) -> None:
    folder, _, _ = from_file
    moved = _copy(folder, tmp_path)
    if link:  # the recorded file itself, reached through a link out of the folder
        shutil.move(moved / "backbone.safetensors", tmp_path / "outside.safetensors")
        (moved / "backbone.safetensors").symlink_to(tmp_path / "outside.safetensors")
    else:
        random_weights(moved / "backbone.safetensors", seed=1)
    _never_read(monkeypatch)
    message = "outside the model folder" if link else "backbone.safetensors: differs from the file bundle.json records"
    with pytest.raises(BundleError, match=message):
        headstart.load(moved)


@pytest.mark.parametrize("named", ["/etc/passwd", "../w.pth", "model.safetensors"])
def test_a_model_of_this_format_names_no_weights_file_but_its_own_copy(
    from_file: tuple[Path, Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, named: str
) -> None:
    folder, _, _ = from_file
    moved = _copy(folder, tmp_path)
    config = json.loads((moved / "bundle.json").read_text())
    config["backbones"][0]["weights_file"] = named
    (moved / "bundle.json").write_text(json.dumps(config))
    _never_read(monkeypatch)
    with pytest.raises(BundleError, match=r"field 'backbones\[0\].weights_file' must be null, or 'backbone.safetensors'"):
        headstart.load(moved)


def _compressed(path: Path, n_bytes: int) -> Path:
    """A state dict of `n_bytes` zeros saved by torch.save, its zip members then deflated: a few KB unpacking to `n_bytes`."""
    plain = path.with_suffix(".plain")
    torch.save({"weight": torch.zeros(n_bytes, dtype=torch.uint8)}, plain)
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for member in source.infolist():
            target.writestr(member.filename, source.read(member.filename))
    plain.unlink()
    return path


def test_a_compressed_torch_file_is_refused_before_it_unpacks(tmp_path: Path) -> None:
    bomb = _compressed(tmp_path / "bomb.pth", 64 << 20)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(BackboneWeightsError, match="compressed members, which torch.save never writes"):
        read_state_dict(bomb)
    result = CliRunner().invoke(app, ["imagenet", str(IMAGES[0]), "--backbone", "timm:test_resnet", "--weights", str(bomb)])
    assert result.exit_code == 1 and "compressed members" in result.output and "Traceback" not in result.output


class _Code:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("ran",))


def test_a_pickle_with_code_is_refused_without_advice_to_unpickle_it(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(2), "payload": _Code()}, tmp_path / "code.pth")
    with pytest.raises(BackboneWeightsError) as caught:
        read_state_dict(tmp_path / "code.pth")
    message = str(caught.value)
    assert "refused, as unpickling those can run code" in message
    assert "weights_only" not in message and "\n" not in message and "\x1b" not in message


def test_a_legacy_pickle_is_refused_without_pytorchs_raw_warning(tmp_path: Path) -> None:
    """torch.load printed "Detected pickle protocol 4" before headstart's own one line (warnings fail tests here)."""
    import pickle

    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(BackboneWeightsError, match="refused"):
        read_state_dict(path)
