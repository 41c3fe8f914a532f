"""Training on real photos: accuracy above chance, caching, save/load round trips."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import headstart
import headstart.cache
from conftest import CATS_DOGS_TINY, FLOWERS_TINY, unseen_cats_dogs
from headstart.data import IMAGE_EXTENSIONS
from headstart.engine import OnnxEngine, TorchEngine


def val_images() -> tuple[list[Path], list[str]]:
    paths = sorted(p for p in (CATS_DOGS_TINY / "val").rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return paths, [p.parent.name for p in paths]


@pytest.fixture
def forward_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts images passed through any engine (ONNX Runtime or PyTorch) for features."""
    seen = [0]
    for engine in (OnnxEngine, TorchEngine):

        def counting(self, batch, original=engine.__call__):  # type: ignore[no-untyped-def]
            seen[0] += len(batch)
            return original(self, batch)

        monkeypatch.setattr(engine, "__call__", counting)
    return seen


def test_trained_model_predicts_unseen_images_above_chance(tiny_model: headstart.Model) -> None:
    paths, truth = val_images()
    predictions = tiny_model.predict(paths, top_k=2)
    accuracy = np.mean([p.label == t for p, t in zip(predictions, truth)])
    assert len(predictions) == 20
    assert accuracy >= 0.8  # chance is 0.5
    s = tiny_model.summary  # refitted on train/ and val/ together, scored by the out-of-fold predictions
    assert s.refit and s.scored_on == "5-fold cross-validation" and s.validation.n_images == 60
    assert all(len(p.top_k) == 2 and p.top_k[0][1] >= p.top_k[1][1] for p in predictions)
    assert tiny_model.classes == ["cats", "dogs"]


def test_save_then_load_gives_identical_probabilities(tiny_model: headstart.Model, tiny_model_dir: Path) -> None:
    paths, _ = val_images()
    loaded = headstart.load(tiny_model_dir)
    assert np.array_equal(loaded.predict_proba(paths), tiny_model.predict_proba(paths))
    assert loaded.classes == tiny_model.classes
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == [
        "bundle.json",
        "history.csv",
        "history.json",
        "metrics.json",
        "model.safetensors",
    ]


def test_second_run_on_same_data_does_no_backbone_forward_pass(tmp_path: Path, forward_counter: list[int]) -> None:
    first = headstart.train(FLOWERS_TINY, cache_dir=tmp_path, head="mlp")
    assert forward_counter[0] == 40 == first.summary.n_extracted
    forward_counter[0] = 0
    second = headstart.train(FLOWERS_TINY, cache_dir=tmp_path, head="linear")
    assert forward_counter[0] == 0
    assert second.summary.n_extracted == 0 and second.summary.n_cached == 40


@pytest.mark.slow
def test_the_report_reuses_the_validation_features(tmp_path: Path, forward_counter: list[int]) -> None:
    model = headstart.train(FLOWERS_TINY, cache_dir=tmp_path / "cache", out=tmp_path / "model")
    assert (tmp_path / "model" / "report.html").is_file()
    assert forward_counter[0] == 40 == model.summary.n_extracted  # each image once, none again for the report


def test_only_new_files_are_extracted(tmp_path: Path, forward_counter: list[int]) -> None:
    data = tmp_path / "data"
    shutil.copytree(FLOWERS_TINY, data)
    headstart.train(data, cache_dir=tmp_path / "cache")
    forward_counter[0] = 0
    for name in ("daisy", "tulips"):
        shutil.copy(FLOWERS_TINY / "roses" / sorted(p.name for p in (FLOWERS_TINY / "roses").iterdir())[0], data / name / "new.jpg")
    shutil.copy(CATS_DOGS_TINY / "train" / "cats" / "cat.1.jpg", data / "roses" / "extra.jpg")
    model = headstart.train(data, cache_dir=tmp_path / "cache")
    assert forward_counter[0] == 1  # the two copies of one rose share a content hash; the cat is new
    assert model.summary.n_cached == 42


@pytest.mark.slow
def test_a_damaged_cache_shard_is_discarded_and_only_its_images_re_extracted(
    tmp_path: Path, forward_counter: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(headstart.cache, "SHARD_SIZE", 8)
    first = headstart.train(FLOWERS_TINY, cache_dir=tmp_path)
    shards = sorted((tmp_path / "features").rglob("*.safetensors"))
    assert len(shards) == 5
    shards[2].write_bytes(shards[2].read_bytes()[:100])  # as if cut off mid-write by something other than headstart
    forward_counter[0] = 0
    second = headstart.train(FLOWERS_TINY, cache_dir=tmp_path)
    assert forward_counter[0] == 8 == second.summary.n_extracted
    assert not shards[2].exists()
    paths, _ = val_images()
    np.testing.assert_allclose(second.predict_proba(paths), first.predict_proba(paths), atol=1e-5)


@pytest.mark.slow
def test_training_is_reproducible(tmp_path: Path) -> None:
    a = headstart.train(FLOWERS_TINY, cache_dir=tmp_path, head="mlp", seed=3)
    b = headstart.train(FLOWERS_TINY, cache_dir=tmp_path, head="mlp", seed=3)
    assert a.summary.history == b.summary.history
    assert np.array_equal(a.head.weights["1.weight"], b.head.weights["1.weight"]) and a.head.params["random_state"] == 3


def test_evaluate_reports_per_class_scores(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = headstart.evaluate(tiny_model_dir, unseen_cats_dogs(tmp_path / "unseen", 10))
    ev = result.evaluation
    assert ev.n_images == 20 and ev.classes == ["cats", "dogs"]
    assert ev.support == [10, 10]
    assert ev.accuracy >= 0.8
    assert min(ev.f1) >= 0.0 and max(ev.precision) <= 1.0


def test_predict_skips_unreadable_files_and_lists_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    good = CATS_DOGS_TINY / "val" / "dogs"
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    result = headstart.predict(tiny_model_dir, [good, tmp_path / "broken.jpg", tmp_path / "missing.png"])
    assert len(result.predictions) == 10
    assert {s.path.name for s in result.skipped} == {"broken.jpg", "missing.png"}
    with pytest.raises(headstart.HeadstartError, match="broken.jpg"):
        headstart.predict(tiny_model_dir, [tmp_path / "broken.jpg"])
    with pytest.raises(headstart.HeadstartError, match="broken.jpg"):
        headstart.load(tiny_model_dir).predict_proba([tmp_path / "broken.jpg"])


def test_model_predict_takes_files_pil_images_and_arrays_alike_and_lists_unreadable_files(
    tiny_model: headstart.Model, tmp_path: Path
) -> None:
    photo = sorted((CATS_DOGS_TINY / "val" / "dogs").glob("*.jpg"))[0]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    image = Image.open(photo).convert("RGB")
    result = tiny_model.predict([photo, image, np.asarray(image), tmp_path / "broken.jpg"], top_k=2)
    assert isinstance(result, headstart.Predictions)
    assert [p.path for p in result.predictions] == [photo, None, None]
    by_file, by_image, by_array = (p.top_k for p in result.predictions)
    assert by_image == by_array and by_file[0][0] == by_image[0][0] == "dogs"
    assert [s.path.name for s in result.skipped] == ["broken.jpg"]
    with pytest.raises(headstart.HeadstartError, match="uint8"):
        tiny_model.predict([np.zeros((8, 8), np.float32)])
    for bad in (np.zeros((1, 100_000, 3), np.uint8), Image.new("RGB", (0, 0)), 5):  # held to the limits files are: no hang
        with pytest.raises(headstart.HeadstartError, match="100:1|PIL image"):
            tiny_model.predict([bad])
