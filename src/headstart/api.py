"""The public operations, one per CLI command."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from headstart.backbones import BackboneInfo, create_backbone, imagenet_class_names, list_backbones
from headstart.cache import FeatureCache, default_cache_dir, extract_with_cache
from headstart.classifier import HeadClassifier
from headstart.config import Progress
from headstart.data import check_class_counts, list_images, load_dataset
from headstart.datasets import fetch_flowers
from headstart.features import extract_features
from headstart.files import atomic_write_bytes
from headstart.metrics import evaluate_probabilities
from headstart.model import EvaluationResult, Model, PathLike, Prediction, Predictions, load

__all__ = ["backbones", "demo", "evaluate", "imagenet", "predict", "save_predictions_csv", "train"]


def train(
    data: PathLike,
    *,
    backbone: str = "efficientnet_lite0",
    head: Literal["linear", "mlp"] = "linear",
    weights: PathLike | None = None,
    val_split: float = 0.2,
    seed: int = 0,
    class_weight: Literal["balanced"] | None = None,
    cache_dir: PathLike | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> Model:
    """Train a classifier on a folder of labelled photos (or a `path,label` CSV).

    The frozen backbone's pooled features are computed once per image and cached;
    the head is then fitted on them with early stopping on the validation split.

    Args:
        data: a folder with one sub-folder per class, a folder with train/ and val/
            splits of such folders, or a CSV of path,label.
        backbone: a name from `headstart.backbones()` or "timm:<model>".
        head: "linear" or "mlp".
        weights: backbone weights file instead of the default pretrained ones.
        val_split: fraction of each class held out for validation (default 0.2).
        seed: seed of the split and of the head's training.
        class_weight: "balanced" to weight classes inversely to their frequency.
        cache_dir: where features are cached (default: `default_cache_dir()`).
        use_cache: False to neither read nor write the feature cache.
        batch_size: images per backbone forward pass.
        progress: called as progress(description, done, total).

    Returns:
        The trained `Model`; `model.summary` says what was done and how it scored.

    Raises:
        DataError: unusable data (message names the folder or class).
        UnknownBackboneError, BackboneWeightsError: the backbone cannot be created.
    """
    started = time.perf_counter()
    clf = HeadClassifier(head=head, class_weight=class_weight, seed=seed).check_params()
    dataset = load_dataset(data, val_split=val_split, seed=seed)
    net = create_backbone(backbone, weights)
    cache = FeatureCache(Path(cache_dir) if cache_dir else default_cache_dir(), net) if use_cache else None
    records = dataset.train + dataset.val
    n_train = len(dataset.train)
    extraction = extract_with_cache(net, [r.path for r in records], cache, batch_size, progress)
    dataset = dataset.drop(extraction.skipped)
    check_class_counts(dataset.train, dataset.val, dataset.classes, min_val=1 if dataset.val else 0)

    features = extraction.features
    labels = np.asarray([records[i].label for i in extraction.kept])
    is_train = extraction.kept < n_train
    clf.fit(features[is_train], labels[is_train], features[~is_train], labels[~is_train])

    summary = {
        "data": str(data),
        "backbone": net.name,
        "head": head,
        "weights_file": str(weights) if weights is not None else None,
        "val_split": val_split,
        "seed": seed,
        "classes": dataset.classes,
        "n_train": {c: sum(r.label == c for r in dataset.train) for c in dataset.classes},
        "n_val": {c: sum(r.label == c for r in dataset.val) for c in dataset.classes},
        "skipped": [{"path": str(s.path), "reason": s.reason} for s in dataset.skipped],
        "n_extracted": extraction.n_extracted,
        "n_cached": extraction.n_cached,
        "history": clf.history_,
        "best_epoch": clf.best_epoch_,
    }
    if (~is_train).any():
        y_val = np.searchsorted(clf.classes_, labels[~is_train])
        proba = clf.predict_proba(features[~is_train])
        summary["validation"] = evaluate_probabilities(y_val, proba, dataset.classes).to_dict()
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return Model(net, clf, summary)


def predict(model: PathLike | Model, images: Sequence[PathLike], top_k: int = 3, progress: Progress | None = None) -> Predictions:
    """Top-k predictions for image files and folders (searched recursively); unreadable files are skipped."""
    model = model if isinstance(model, Model) else load(model)
    paths, missing = list_images(list(images))
    result = model.predict_files(paths, top_k, progress)
    return Predictions(result.predictions, missing + result.skipped)


def evaluate(model: PathLike | Model, data: PathLike, progress: Progress | None = None) -> EvaluationResult:
    """Accuracy, per-class precision/recall/F1 and confusion matrix on labelled images."""
    model = model if isinstance(model, Model) else load(model)
    return model.evaluate(data, progress)


def imagenet(
    images: Sequence[PathLike],
    backbone: str = "efficientnet_lite0",
    weights: PathLike | None = None,
    top_k: int = 5,
    progress: Progress | None = None,
) -> Predictions:
    """The backbone's own ImageNet-1k top-k classes for each image (its pretrained classifier kept on)."""
    net = create_backbone(backbone, weights)
    paths, missing = list_images(list(images))
    extraction = extract_features(net, paths, progress=progress, forward=net.imagenet_logits)
    names = imagenet_class_names()
    proba = _softmax(extraction.features)
    predictions = [
        Prediction(paths[i], [(names[j], float(row[j])) for j in np.argsort(-row, kind="stable")[:top_k]])
        for i, row in zip(extraction.kept, proba)
    ]
    return Predictions(predictions, missing + extraction.skipped)


def save_predictions_csv(predictions: Sequence[Prediction], path: PathLike) -> Path:
    """Write one row per image: path, label, probability, then label_2, probability_2, ... (atomically)."""
    k = max((len(p.top_k) for p in predictions), default=1)
    header = ["path", "label", "probability"] + [f"{c}_{i}" for i in range(2, k + 1) for c in ("label", "probability")]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for p in predictions:
        writer.writerow([str(p.path), *(f"{v:.6f}" if isinstance(v, float) else v for pair in p.top_k for v in pair)])
    return atomic_write_bytes(Path(path), buffer.getvalue().encode())


def backbones() -> list[BackboneInfo]:
    """The backbones headstart knows, and whether each works offline."""
    return list_backbones()


def demo(out: PathLike = "headstart-demo", cache_dir: PathLike | None = None, progress: Progress | None = None) -> Model:
    """Fetch the flower photos, train the default model on them and save it to `out`."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    flowers = fetch_flowers(root, progress=progress)
    model = train(flowers, cache_dir=root, progress=progress)
    model.save(out)
    return model


def _softmax(logits: NDArray[np.float32]) -> NDArray[np.float32]:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return np.asarray(shifted / shifted.sum(1, keepdims=True), dtype=np.float32)
