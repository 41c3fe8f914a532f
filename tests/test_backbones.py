"""Backbones by name: the registry, timm models from a weights file, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import headstart
from conftest import FLOWERS_TINY, PHOTOS
from headstart.backbone import create_backbone, list_backbones
from headstart.errors import BackboneWeightsError, BundleError, UnknownBackboneError


def random_weights(path: Path, seed: int, drop_classifier: bool = False) -> Path:
    torch.manual_seed(seed)
    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    if drop_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def test_registry_lists_offline_backbones() -> None:
    infos = {b.name: b for b in list_backbones()}
    assert all(infos[f"efficientnet_lite{n}"].offline for n in range(3))
    assert not infos["timm:<model>"].offline


def test_lite_backbone_matches_timm_config() -> None:
    backbone = create_backbone("efficientnet_lite1")
    assert backbone.n_features == 1280 and backbone.has_imagenet_head
    assert (backbone.data_config.input_size, backbone.data_config.resize_size) == (240, 272)
    assert backbone.data_config.mean == backbone.data_config.std == (0.5, 0.5, 0.5)
    features = backbone.features(torch.zeros(2, 3, 240, 240))
    assert features.shape == (2, 1280)


def test_unknown_backbone_suggests_a_name() -> None:
    with pytest.raises(UnknownBackboneError, match="Did you mean 'timm:resnet50'"):
        create_backbone("resnet50")
    with pytest.raises(UnknownBackboneError, match="Did you mean 'efficientnet_lite0'"):
        create_backbone("efficientnet_lit0")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_backbone_from_weights_file_trains_saves_and_loads(tmp_path: Path, suffix: str) -> None:
    weights = random_weights(tmp_path / f"w{suffix}", seed=0)
    model = headstart.train(FLOWERS_TINY, backbone="timm:test_resnet", weights=weights, cache_dir=tmp_path / "c")
    assert model.backbone.n_features == timm.create_model("test_resnet").num_features
    model.save(tmp_path / "m")
    images = sorted(FLOWERS_TINY.glob("daisy/*"))[:3]
    assert (headstart.load(tmp_path / "m").predict_proba(images) == model.predict_proba(images)).all()


def test_bundle_refuses_different_backbone_weights(tmp_path: Path) -> None:
    weights = random_weights(tmp_path / "a.safetensors", seed=0)
    headstart.train(FLOWERS_TINY, backbone="timm:test_resnet", weights=weights, cache_dir=tmp_path / "c").save(tmp_path / "m")
    other = random_weights(tmp_path / "b.safetensors", seed=1)
    with pytest.raises(BundleError, match="weights differ from those the model was trained with"):
        headstart.load(tmp_path / "m", weights=other)


def test_headless_weights_give_features_but_no_imagenet_labels(tmp_path: Path) -> None:
    weights = random_weights(tmp_path / "headless.safetensors", seed=0, drop_classifier=True)
    backbone = create_backbone("timm:test_resnet", weights)
    assert not backbone.has_imagenet_head
    with pytest.raises(BackboneWeightsError, match="without its ImageNet classifier"):
        headstart.imagenet([PHOTOS / "sk_coffee.png"], backbone="timm:test_resnet", weights=weights)


def test_weights_for_another_architecture_are_refused(tmp_path: Path) -> None:
    weights = random_weights(tmp_path / "w.safetensors", seed=0)
    with pytest.raises(BackboneWeightsError, match="do not fit resnet18"):
        create_backbone("timm:resnet18", weights)
    with pytest.raises(BackboneWeightsError, match="not found"):
        create_backbone("timm:resnet18", tmp_path / "nope.safetensors")


@pytest.mark.subprocess
def test_failed_download_names_the_weights_option() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # fail at once, as without internet
    result = subprocess.run(
        [sys.executable, "-m", "headstart.cli.main", "imagenet", str(PHOTOS / "sk_coffee.png"), "--backbone", "timm:resnet18"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Could not download ImageNet weights for 'timm:resnet18'" in lines[0] and "--weights FILE" in lines[0]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: {**r, "n_features": -7},
        lambda r: {**r, "weights_sha256": "zz"},
        lambda r: {**r, "has_imagenet_head": "no"},
        lambda r: {**r, "stages": [["a", -3]]},
        lambda r: "[" * 100_000 + "]" * 100_000,
    ],
    ids=["n_features", "weights_sha256", "bool", "stages", "nested"],
)
def test_a_tampered_identity_record_is_worked_out_again(tmp_path: Path, tamper) -> None:  # type: ignore[no-untyped-def]
    first = create_backbone("efficientnet_lite0", cache_root=tmp_path)
    (record,) = (tmp_path / "backbones").glob("*.json")
    tampered = tamper(json.loads(record.read_text()))
    record.write_text(tampered if isinstance(tampered, str) else json.dumps(tampered))
    again = create_backbone("efficientnet_lite0", cache_root=tmp_path)
    assert (again.n_features, again.weights_sha256, again.stages) == (first.n_features, first.weights_sha256, first.stages)
    assert json.loads(record.read_text())["n_features"] == 1280  # and remembered correctly again
