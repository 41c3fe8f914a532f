"""The ONNX Runtime engine: same features as PyTorch, exported once, verified, with a PyTorch fallback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import FLOWERS, PHOTOS
from headstart.backbone import at_layer, create_backbone
from headstart.cache import FeatureCache
from headstart.classifier import HeadClassifier
from headstart.data import ImageRecord, load_dataset
from headstart.engine import ExportError, OnnxEngine, TorchEngine, create_engine, exported_model
from headstart.features import extract_features
from headstart.files import file_digest
from headstart.onnx_export import Exported, with_static_padding


@pytest.fixture(scope="module")
def lite0():  # type: ignore[no-untyped-def]
    return create_backbone("efficientnet_lite0")


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float((np.abs(actual - expected).max(1) / np.abs(expected).max(1)).max())


@pytest.mark.slow
def test_onnx_features_match_pytorch_on_real_photos(lite0, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    photos = sorted(PHOTOS.iterdir())
    fast = extract_features(create_engine(lite0, "onnx", tmp_path), photos)
    reference = extract_features(TorchEngine(lite0), photos)
    assert len(fast.kept) == len(photos) == len(reference.kept)
    assert _relative_error(fast.features, reference.features) <= 1e-3
    classifier = lite0.module.get_classifier()
    with torch.inference_mode():
        top1_fast = classifier(torch.from_numpy(fast.features)).argmax(1)
        top1_reference = classifier(torch.from_numpy(reference.features)).argmax(1)
    assert top1_fast.tolist() == top1_reference.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 5, 32])
def test_a_batch_cut_into_slices_gives_each_image_its_own_features(lite0, tmp_path: Path, n: int) -> None:  # type: ignore[no-untyped-def]
    engine = OnnxEngine(lite0, exported_model(lite0, tmp_path), threads=2)
    batch = np.random.default_rng(n).standard_normal((n, 3, 224, 224), dtype=np.float32)
    alone = np.concatenate([engine.sessions[0].run(["features"], {"pixels": image[None]})[0] for image in batch])
    np.testing.assert_allclose(engine(batch), alone, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("layer", [-2, 1])
def test_earlier_layer_features_match_pytorch(lite0, tmp_path: Path, layer: int) -> None:  # type: ignore[no-untyped-def]
    net = at_layer(lite0, layer)
    photos = sorted(PHOTOS.glob("*.png"))
    fast = extract_features(create_engine(net, "onnx", tmp_path), photos).features
    assert fast.shape == (len(photos), net.n_features)
    assert _relative_error(fast, extract_features(TorchEngine(net), photos).features) <= 1e-3


@pytest.mark.slow
def test_export_is_recorded_and_reused(lite0, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    path = exported_model(lite0, tmp_path)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["verified"] is True and record["max_relative_error"] <= 1e-4 and record["mean_pooled"] is True
    monkeypatch.setattr("headstart.onnx_export.export_features", lambda backbone, threads: pytest.fail("exported twice"))
    assert exported_model(lite0, tmp_path) == path


@pytest.mark.slow
def test_a_damaged_export_is_exported_again(lite0, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = exported_model(lite0, tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    assert exported_model(lite0, tmp_path) == path
    assert path.read_bytes() == good
    assert isinstance(create_engine(lite0, "auto", tmp_path), OnnxEngine)


def test_an_export_that_disagrees_falls_back_to_pytorch_and_is_not_retried(
    lite0,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("headstart.onnx_export.export_features", lambda backbone, threads: Exported(b"onnx", 0.2, True))
    with pytest.warns(UserWarning, match="max relative error 2.00e-01.*PyTorch instead"):
        engine = create_engine(lite0, "auto", tmp_path)
    assert isinstance(engine, TorchEngine)
    monkeypatch.setattr("headstart.onnx_export.export_features", lambda backbone, threads: pytest.fail("export retried"))
    with pytest.raises(ExportError, match="did not export to ONNX"):
        create_engine(lite0, "onnx", tmp_path)
    assert not list(tmp_path.rglob("*.onnx"))  # a model that disagrees is never kept


def test_an_export_that_fails_falls_back_to_pytorch(lite0, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    def failing(backbone, threads):  # type: ignore[no-untyped-def]
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr("headstart.onnx_export.export_features", failing)
    with pytest.warns(UserWarning, match="operator foo"):
        assert isinstance(create_engine(lite0, "auto", tmp_path), TorchEngine)


@pytest.mark.slow
def test_a_head_fitted_on_onnx_features_scores_flowers_the_same_on_pytorch_features(lite0, flowers_cache) -> None:  # type: ignore[no-untyped-def]
    """Trained with one engine, served by the other: the same validation accuracy on flowers, within one photo of 300."""
    dataset = load_dataset(FLOWERS, val_split=0.2, seed=0)
    cache = FeatureCache(flowers_cache[0], lite0)  # the ONNX engine's features of every flower photo

    def onnx_features(records: list[ImageRecord]) -> np.ndarray:
        digests = [file_digest(r.path) for r in records]
        rows = cache.load(digests)
        return np.stack([rows[d] for d in digests])

    head = HeadClassifier(random_state=0).fit(onnx_features(dataset.train), [r.label for r in dataset.train])
    val_labels = [r.label for r in dataset.val]
    onnx_val = onnx_features(dataset.val)
    torch_val = extract_features(TorchEngine(lite0), [r.path for r in dataset.val]).features
    assert _relative_error(onnx_val, torch_val) <= 1e-3
    accuracies = [head.score(onnx_val, val_labels), head.score(torch_val, val_labels)]
    assert accuracies[0] > 0.9
    assert abs(accuracies[0] - accuracies[1]) <= 0.005, accuracies
    assert np.mean(head.predict(onnx_val) == head.predict(torch_val)) >= 0.99


@pytest.mark.slow
def test_static_padding_computes_the_same_features_and_exports_without_pad_nodes(lite0, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    static = with_static_padding(lite0)
    same = [name for name, m in lite0.module.named_modules() if type(m).__name__ == "Conv2dSame"]
    assert len(same) == 5  # the stem and the four stride-2 depthwise convolutions; the original stays as it was
    assert all(type(static.module.get_submodule(name)).__name__ == "_PaddedConv" for name in same)
    batch = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(static.features(batch), lite0.features(batch), rtol=1e-5, atol=1e-5)
    graph = onnx.load(exported_model(lite0, tmp_path)).graph
    assert not [n for n in graph.node if n.op_type == "Pad" and len(n.input) > 2]  # ONNX Runtime can fold every Pad into its Conv


def _counting_export(monkeypatch: pytest.MonkeyPatch, data: bytes) -> list[int]:
    """Stand in for the ONNX exporter: `data`, in agreement with PyTorch; the list grows by one per export."""
    calls: list[int] = []

    def export(backbone, threads):  # type: ignore[no-untyped-def]
        calls.append(1)
        return Exported(data, 0.0, True)

    monkeypatch.setattr("headstart.onnx_export.export_features", export)
    return calls


def test_a_tampered_engine_with_its_hash_record_updated_is_exported_again(lite0, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    calls = _counting_export(monkeypatch, b"the verified export")
    path = exported_model(lite0, tmp_path)
    assert exported_model(lite0, tmp_path) == path and len(calls) == 1  # its seal holds: reused
    path.write_bytes(b"another network")
    record = json.loads(path.with_suffix(".json").read_text())
    record["sha256"] = hashlib.sha256(b"another network").hexdigest()
    path.with_suffix(".json").write_text(json.dumps(record))
    assert exported_model(lite0, tmp_path) == path and len(calls) == 2
    assert path.read_bytes() == b"the verified export"


def test_an_engine_from_another_cache_is_exported_again(lite0, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Files dropped into a cache from another one fail their seals; a whole cache folder, its key included, moves as it is."""
    import shutil

    calls = _counting_export(monkeypatch, b"the verified export")
    exported_model(lite0, tmp_path / "theirs")
    shutil.copytree(tmp_path / "theirs" / "onnx", tmp_path / "mine" / "onnx")
    exported_model(lite0, tmp_path / "mine")
    assert len(calls) == 2
    shutil.copytree(tmp_path / "theirs", tmp_path / "moved")
    exported_model(lite0, tmp_path / "moved")
    assert len(calls) == 2
