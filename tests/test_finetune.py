"""Fine-tuning: BatchNorm and frozen layers untouched, augmentation on training images only, resume, auto."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import headstart
from conftest import CATS_DOGS_TINY, FLOWERS_TINY
from headstart import finetune as finetune_module
from headstart.augment import AugmentConfig
from headstart.backbone import create_backbone
from headstart.classifier import HeadClassifier
from headstart.cli.main import app
from headstart.data import load_dataset
from headstart.engine import TorchEngine
from headstart.errors import ConfigError
from headstart.features import extract_features
from headstart.finetune import FinetuneConfig, finetune, parameter_groups


@pytest.mark.slow
def test_frozen_layers_and_batchnorm_statistics_stay_bit_identical() -> None:
    backbone = create_backbone("efficientnet_lite0")
    before = {k: v.clone() for k, v in backbone.module.state_dict().items()}
    records = load_dataset(CATS_DOGS_TINY).train
    features = extract_features(TorchEngine(backbone), [r.path for r in records]).features
    head = HeadClassifier(solver="adamw", max_epochs=2).fit(features, [r.label for r in records]).head_  # under-fitted: room to improve
    config = FinetuneConfig(unfreeze=1, epochs=2, augment=AugmentConfig(), label_smoothing=0.0, lr=1e-2, backbone_lr=1e-3)
    result = finetune(backbone, head, records, records, config)  # validating on the training images makes epoch 1 win

    assert result.best_epoch >= 1
    tuned = result.backbone.module.state_dict()
    top_block = set(parameter_groups(backbone)[-1])
    buffers = {name for name, _ in backbone.module.named_buffers()}
    assert any("running_mean" in name for name in top_block | buffers)
    for name, value in before.items():
        if name in top_block:
            continue
        assert torch.equal(tuned[name], value), f"{name} changed"  # frozen weights and every BN buffer
    assert any(not torch.equal(tuned[name], before[name]) for name in top_block)  # the top block did learn
    assert all(torch.equal(v, before[k]) for k, v in backbone.module.state_dict().items())  # the input was not modified
    assert result.backbone.finetuned_from == backbone.weights_sha256 != result.backbone.weights_sha256


@pytest.mark.slow
def test_augmentation_touches_training_images_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    augmented: list[Path] = []
    original = finetune_module.augmented_input

    def spy(path: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        augmented.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "augmented_input", spy)
    headstart.train(CATS_DOGS_TINY, strategy="finetune", epochs=1, augment="strong", cache_dir=tmp_path)
    assert len(augmented) == 40
    assert {p.parent.parent.name for p in augmented} == {"train"}


@pytest.mark.slow
def test_finetuned_model_saves_backbone_and_predicts_identically_after_load(tmp_path: Path) -> None:
    model = headstart.train(
        CATS_DOGS_TINY, strategy="finetune", epochs=2, unfreeze=None, augment="none", cache_dir=tmp_path / "c", out=tmp_path / "m"
    )
    assert model.summary.finetune.config["unfreeze"] is None
    assert [r["phase"] for r in model.summary.history].count("finetune") == 2
    assert (tmp_path / "m" / "history.csv").read_text().startswith("phase,epoch,loss")
    assert not (tmp_path / "m" / ".checkpoint").exists()  # removed once the run completed
    images = sorted((CATS_DOGS_TINY / "val" / "dogs").iterdir())[:4]
    loaded = headstart.load(tmp_path / "m")
    assert loaded.backbone.weights_sha256 == model.backbone.weights_sha256
    assert np.array_equal(loaded.predict_proba(images), model.predict_proba(images))


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    options = dict(strategy="finetune", epochs=3, augment="light", cache_dir=tmp_path / "c")
    reference = headstart.train(FLOWERS_TINY, out=tmp_path / "reference", **options)

    def interrupt_in_epoch_2(description: str, done: int, total: int, status: str = "") -> None:
        if description.startswith("Fine-tuning epoch 2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        headstart.train(FLOWERS_TINY, out=tmp_path / "m", progress=interrupt_in_epoch_2, **options)
    assert (tmp_path / "m" / ".checkpoint" / "checkpoint.json").is_file()
    best_so_far = headstart.load(tmp_path / "m")  # Ctrl-C leaves a usable model
    assert best_so_far.classes == reference.classes

    resumed = headstart.train(FLOWERS_TINY, out=tmp_path / "m", resume=True, **options)
    phases = [r["phase"] for r in resumed.summary.history]
    assert phases == [r["phase"] for r in reference.summary.history]
    assert [r["val_loss"] for r in resumed.summary.history] == pytest.approx([r["val_loss"] for r in reference.summary.history], rel=1e-4)
    images = sorted(FLOWERS_TINY.glob("*/*"))[:5]
    assert np.allclose(headstart.load(tmp_path / "m").predict_proba(images), reference.predict_proba(images), atol=1e-4)


@pytest.mark.slow
def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Nothing to resume"):
        headstart.train(FLOWERS_TINY, strategy="finetune", out=tmp_path / "m", resume=True, cache_dir=tmp_path)


def shapes_dataset(root: Path, n_per_class: int = 12) -> Path:
    """Line drawings of circles, squares and crosses: nothing like ImageNet photos."""
    from PIL import ImageDraw

    rng = np.random.default_rng(0)
    for label in ("circles", "squares", "crosses"):
        for i in range(n_per_class):
            image = Image.new("RGB", (96, 96), "white")
            draw = ImageDraw.Draw(image)
            for _ in range(int(rng.integers(2, 5))):
                x, y = (int(v) for v in rng.integers(10, 66, 2))
                r = int(rng.integers(6, 20))
                if label == "circles":
                    draw.ellipse([x, y, x + r, y + r], outline="black", width=2)
                elif label == "squares":
                    draw.rectangle([x, y, x + r, y + r], outline="black", width=2)
                else:
                    draw.line([x, y, x + r, y + r], fill="black", width=2)
                    draw.line([x + r, y, x, y + r], fill="black", width=2)
            (root / label).mkdir(parents=True, exist_ok=True)
            image.save(root / label / f"{i}.png")
    return root


@pytest.mark.slow
def test_auto_chooses_by_similarity_to_imagenet(tmp_path: Path) -> None:
    photos = headstart.train(CATS_DOGS_TINY, strategy="auto", cache_dir=tmp_path)
    drawings = headstart.train(shapes_dataset(tmp_path / "shapes"), strategy="auto", cache_dir=tmp_path)
    assert photos.backbone.layer is None and "similar to ImageNet" in photos.summary.auto.reason
    assert drawings.backbone.layer is not None and "unlike ImageNet" in drawings.summary.auto.reason
    assert drawings.summary.auto.measurements["imagenet_confidence"] < photos.summary.auto.measurements["imagenet_confidence"]


@pytest.mark.slow
def test_earlier_layer_features_are_cached_and_saved(tmp_path: Path) -> None:
    model = headstart.train(FLOWERS_TINY, layer=-2, cache_dir=tmp_path, out=tmp_path / "m")
    assert model.backbone.n_features == 112 and model.backbone.layer == 3
    again = headstart.train(FLOWERS_TINY, layer=-2, cache_dir=tmp_path)
    assert again.summary.n_extracted == 0
    images = sorted(FLOWERS_TINY.glob("roses/*"))[:3]
    assert np.array_equal(headstart.load(tmp_path / "m").predict_proba(images), model.predict_proba(images))
    with pytest.raises(ConfigError, match="layer must be in"):
        headstart.train(FLOWERS_TINY, layer=9, cache_dir=tmp_path)


@pytest.mark.slow
def test_cli_finetune_and_augment_preview(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["train", str(FLOWERS_TINY), "--strategy", "finetune", "--epochs", "1", "--unfreeze", "all", "--augment", "strong",
         "--rotation", "5", "--out", str(tmp_path / "m"), "--cache-dir", str(tmp_path / "c")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Fine-tuned all blocks for 1 epoch(s)" in result.output
    preview = tmp_path / "grid.png"
    result = runner.invoke(app, ["augment-preview", str(FLOWERS_TINY), "--out", str(preview), "--n-images", "2", "--n-variants", "3"])
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(preview).convert("L"), dtype=np.float32)
    assert grid.shape[1] > grid.shape[0] > 200 and grid.std() > 20  # two rows of four pictures, not blank
    bad = runner.invoke(app, ["train", str(FLOWERS_TINY), "--strategy", "finetune", "--unfreeze", "none"])
    assert bad.exit_code == 2 and "positive number of blocks" in bad.output


def test_strategy_and_head_conflict_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="drop --head"):
        headstart.train(FLOWERS_TINY, strategy="linear", head="mlp", cache_dir=tmp_path)
