"""Honest numbers: out-of-fold scores after a refit, the validation split without one, and a test split used for nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import headstart
from conftest import CATS_DOGS_TINY, FLOWERS_TINY, copy_flowers
from headstart.classifier import HeadClassifier
from headstart.data import load_dataset
from headstart.selection import cross_validate


def test_a_refitted_head_reports_the_out_of_fold_accuracy_of_its_cross_validation(cache_dir: Path) -> None:
    model = headstart.train(FLOWERS_TINY, cache_dir=cache_dir, report=False, seed=3)
    s = model.summary
    assert s.refit and sum(s.n_train.values()) + sum(s.n_val.values()) == s.validation.n_images == 40
    # the same cross-validation, run by hand on the same features, gives the same out-of-fold accuracy and C
    dataset = load_dataset(FLOWERS_TINY, val_split=0.2, seed=3)
    records = dataset.train + dataset.val
    from headstart.features import extract_features

    extraction = extract_features(model.engine, [r.path for r in records])
    cv = cross_validate(HeadClassifier(), extraction.features, [r.label for r in records], seed=3)
    assert cv.params["C"] == model.head.params["C"]
    assert np.mean(cv.logits.argmax(1) == cv.y) == pytest.approx(s.validation.accuracy)
    # and the head itself was fitted on all 40 images with that C
    refitted = HeadClassifier(C=model.head.params["C"]).fit(extraction.features, [r.label for r in records])
    np.testing.assert_allclose(refitted.predict_proba(extraction.features), model.head.predict_proba(extraction.features), atol=1e-5)


def test_without_refit_the_head_is_scored_on_the_validation_split(cache_dir: Path) -> None:
    model = headstart.train(CATS_DOGS_TINY, cache_dir=cache_dir, report=False, refit=False)
    val = sorted((CATS_DOGS_TINY / "val").rglob("*.jpg"))
    predictions = model.predict(val)
    accuracy = np.mean([p.label == path.parent.name for p, path in zip(predictions, val)])
    s = model.summary
    assert not s.refit and s.scored_on == "validation split"
    assert s.validation.n_images == 20 and s.validation.accuracy == pytest.approx(accuracy)


def test_the_test_split_is_held_out_of_everything_and_scored_at_the_end(cache_dir: Path, tmp_path: Path) -> None:
    model = headstart.train(FLOWERS_TINY, cache_dir=cache_dir, out=tmp_path / "m", test_split=0.25, report=False)
    s = model.summary
    test = {r.path for r in s.test_images}
    assert s.n_test == {c: 2 for c in model.classes} and len(test) == 10
    assert s.validation.n_images == 30  # cross-validated on the other 30 only
    assert not test & {r.path.resolve() for r in s.val_images}
    truth = [r.label for r in s.test_images]
    predicted = [p.label for p in model.predict([r.path for r in s.test_images])]
    assert s.test.accuracy == pytest.approx(np.mean([a == b for a, b in zip(predicted, truth)]))
    loaded = headstart.load(tmp_path / "m").summary
    assert loaded.test == s.test and loaded.test_images == s.test_images and loaded.refit


@pytest.mark.parametrize("options", [{"test_split": 1.0}, {"test_split": -0.1}, {"folds": 1}])
def test_out_of_range_splits_and_folds_are_refused(cache_dir: Path, options: dict[str, float]) -> None:
    with pytest.raises(headstart.HeadstartError, match="test_split must be in"):
        headstart.train(FLOWERS_TINY, cache_dir=cache_dir, report=False, **options)  # type: ignore[arg-type]


def test_test_time_augmentation_averages_each_image_with_its_mirror_image(cache_dir: Path, tmp_path: Path) -> None:
    from PIL import Image, ImageOps

    model = headstart.train(FLOWERS_TINY, cache_dir=cache_dir, report=False)
    path = sorted((FLOWERS_TINY / "roses").iterdir())[0]
    with Image.open(path) as image:
        image = image.convert("RGB")
        mirror = ImageOps.mirror(image)
    plain, mirrored = model.predict_proba([image]), model.predict_proba([mirror])
    np.testing.assert_allclose(model.predict_proba([image], tta=True), (plain + mirrored) / 2, atol=1e-6)
    np.testing.assert_allclose(model.predict_proba([path], tta=True), (model.predict_proba([path]) + mirrored) / 2, atol=1e-4)
    assert not np.allclose(plain, mirrored)  # the mirror image is another input
    # evaluate and the test split of train report it too
    unseen = copy_flowers(tmp_path / "unseen", 2, last=True)  # evaluate leaves out the photos the head was fitted on
    assert headstart.evaluate(model, unseen, tta=True).evaluation.n_images == 10
    tested = headstart.train(FLOWERS_TINY, cache_dir=cache_dir, report=False, test_split=0.25, tta=True).summary
    assert tested.test is not None and tested.test_tta is not None and tested.test_tta.n_images == tested.test.n_images == 10


@pytest.mark.slow
def test_an_export_is_checked_on_the_test_split_when_there_is_one(cache_dir: Path, tmp_path: Path) -> None:
    headstart.train(FLOWERS_TINY, cache_dir=cache_dir, out=tmp_path / "m", test_split=0.25, report=False)
    result = headstart.export(tmp_path / "m", out=tmp_path / "m.onnx")
    assert result.checked_on == "test" and result.check is not None and result.check.n_images == 10
    refitted_only = headstart.train(FLOWERS_TINY, cache_dir=cache_dir, out=tmp_path / "r", report=False)
    assert refitted_only.summary.refit
    assert headstart.export(tmp_path / "r", out=tmp_path / "r.onnx").checked_on == "training"  # said so: its accuracy is optimistic
