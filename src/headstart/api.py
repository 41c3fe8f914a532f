"""The public operations, one per CLI command."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import ImageOps

from headstart.augment import AugmentConfig
from headstart.augment import augment as augment_image
from headstart.backbones import Backbone, BackboneInfo, at_layer, create_backbone, imagenet_class_names, list_backbones
from headstart.bundle import CHECKPOINT_DIR, REPORT_NAME, check_output_folder, describe_bundle
from headstart.cache import CachedExtraction, FeatureCache, extract_with_cache
from headstart.classifier import HeadClassifier
from headstart.config import Progress, default_cache_dir
from headstart.data import (
    Dataset,
    ImageRecord,
    Skipped,
    check_class_counts,
    check_layout,
    check_val_split,
    list_images,
    load_dataset,
    load_image,
    read_source,
    split_dataset,
)
from headstart.datasets import fetch_flowers
from headstart.engine import TorchEngine, create_engine
from headstart.errors import ConfigError, DataError, FileRefusedError, UnreadableImageError
from headstart.explain import Explanations, existing_names, grad_cam, output_name, overlay, stage_activations
from headstart.features import extract_features
from headstart.files import atomic_write_bytes, csv_bytes, display, output_file
from headstart.finetune import FinetuneConfig, FinetuneResult, finetune, remove_checkpoint
from headstart.metrics import Evaluation, evaluate_probabilities
from headstart.model import EvaluationResult, Model, PathLike, Prediction, Predictions, load
from headstart.report import build_report, feature_map_grid, image_grid, save_figure
from headstart.strategy import EARLIER_LAYER, ProbeData, choose, imagenet_confidence, probe_loss
from headstart.transforms import preprocess, resize_and_crop
from headstart.triage import Triage, dataset_warnings, triage

__all__ = [
    "activations",
    "check",
    "augment_preview",
    "backbones",
    "demo",
    "evaluate",
    "explain",
    "imagenet",
    "imagenet_grid",
    "predict",
    "report",
    "save_predictions_csv",
    "train",
]


Strategy = Literal["linear", "mlp", "finetune", "auto"]
STRATEGIES = ("linear", "mlp", "finetune", "auto")


def train(
    data: PathLike,
    *,
    backbone: str = "efficientnet_lite0",
    strategy: Strategy | None = None,
    head: Literal["linear", "mlp"] | None = None,
    layer: int | None = None,
    weights: PathLike | None = None,
    val_split: float = 0.2,
    seed: int = 0,
    class_weight: Literal["balanced"] | None = None,
    unfreeze: int | None = 2,
    epochs: int = 8,
    augment: str | AugmentConfig = "strong",
    out: PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    write_report: bool = True,
    cache_dir: PathLike | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> Model:
    """Train a classifier on a folder of labelled photos (or a `path,label` CSV).

    Every strategy starts the same way: the frozen backbone's pooled features are
    computed once per image and cached, and a head is fitted on them with early
    stopping on the validation split. `finetune` then trains the backbone's top
    blocks together with that head on augmented images.

    Args:
        data: a folder with one sub-folder per class, a folder with train/ and val/
            splits of such folders, or a CSV of path,label.
        backbone: a name from `headstart.backbones()` or "timm:<model>".
        strategy: "linear" or "mlp" (that head on frozen features), "finetune"
            (two phases), or "auto" (chosen from dataset size and similarity to ImageNet).
            None (the default) means frozen features with `head`.
        head: "linear" (default) or "mlp"; the strategies "linear" and "mlp" name their own.
        layer: pool an earlier stage's output instead of the final features (e.g. -2).
        weights: backbone weights file instead of the default pretrained ones.
        val_split: fraction of each class held out for validation (default 0.2).
        seed: seed of the split, of training and of augmentation.
        class_weight: "balanced" to weight classes inversely to their frequency.
        unfreeze: for "finetune", how many top blocks to train; None for all.
        epochs: for "finetune", the most epochs of the second phase.
        augment: for "finetune", "none", "light", "strong" (default) or an `AugmentConfig`.
        out: save the model in this folder (and, for "finetune", the best-so-far
            model after each improving epoch and a checkpoint to resume from).
        resume: continue an interrupted "finetune" run from its checkpoint in `out`.
        force: let `out` be a folder of other files (they are kept); by default it
            must be new, empty or a headstart model.
        write_report: with `out`, also write `out/report.html` (curves, confusion matrix,
            prediction grids, top losses, Grad-CAM on validation images).
        cache_dir: where features are cached (default: `default_cache_dir()`).
        use_cache: False to neither read nor write the feature cache.
        batch_size: images per backbone forward pass and per fine-tuning step.
        progress: called as progress(description, done, total, status).

    Returns:
        The trained `Model`; `model.summary` says what was done and how it scored.

    Raises:
        DataError: unusable data (message names the folder or class).
        UnknownBackboneError, BackboneWeightsError: the backbone cannot be created.
        ConfigError: an option out of range, or `resume` without a matching checkpoint.
    """
    started = time.perf_counter()
    strategy = strategy or head or "linear"
    if strategy not in STRATEGIES:
        raise ConfigError(f"Unknown strategy '{strategy}'. Choose one of: {', '.join(STRATEGIES)}.")
    if strategy in ("linear", "mlp") and head not in (None, strategy):
        raise ConfigError(f"Strategy '{strategy}' trains a {strategy} head; drop --head {head} or use --strategy finetune.")
    if resume and out is None:
        raise ConfigError("resume needs the output folder of the interrupted run (--out).")
    if out is not None:
        check_output_folder(Path(out), force)
    clf = HeadClassifier(head="mlp" if strategy == "mlp" else head or "linear", class_weight=class_weight, seed=seed).check_params()
    augment_config = augment if isinstance(augment, AugmentConfig) else AugmentConfig.preset(augment)
    tune = FinetuneConfig(unfreeze=unfreeze, epochs=epochs, augment=augment_config, seed=seed, batch_size=batch_size)
    check_val_split(val_split)
    root = Path(data).expanduser()
    records, presplit_val, skipped = read_source(root)
    check_layout(root, records)  # fails fast only where no file being skipped could matter, so never where `check` says it can train
    if strategy in ("finetune", "auto") and presplit_val is None and val_split == 0:
        raise ConfigError(f"Strategy '{strategy}' needs validation images; use a val_split above 0.")
    net = create_backbone(backbone, weights, layer)
    cache = partial(_cached_features, cache_root=Path(cache_dir) if cache_dir else default_cache_dir(), use_cache=use_cache)
    found = records + (presplit_val or [])
    extraction = cache(net, found, batch_size, progress)
    # Unreadable files leave before the split, as in `check`, so both count the same usable images per class.
    dataset = split_dataset(root, records, presplit_val, skipped, val_split, seed, unusable=extraction.skipped)
    warnings = dataset_warnings(data, dataset)
    if strategy in ("finetune", "auto") and not dataset.val:
        raise ConfigError(f"Strategy '{strategy}' needs validation images; use a val_split above 0.")
    frozen = _fit_frozen(net, dataset, clf, found, extraction)

    choice = None
    if strategy == "auto":
        final = frozen.features
        used = frozen.dataset.train + frozen.dataset.val
        early = _split(frozen.dataset, used, cache(at_layer(net, EARLIER_LAYER), used, batch_size, progress))
        confidence = imagenet_confidence(net, final.X_train) if net.has_imagenet_head and net.layer is None else None
        n_train, n_classes = len(frozen.dataset.train), len(frozen.dataset.classes)
        choice = choose(n_train, n_classes, confidence, probe_loss(final, seed), probe_loss(early, seed))
        if choice.layer is not None:
            net = at_layer(net, choice.layer)
            frozen = _fit_frozen(net, frozen.dataset, clf, used, cache(net, used, batch_size, progress))
        tune = dataclasses.replace(tune, unfreeze=choice.unfreeze)

    dataset, clf = frozen.dataset, frozen.clf
    summary: dict[str, Any] = {
        "data": str(data),
        "backbone": net.name,
        "layer": net.layer,
        "strategy": strategy,
        "head": clf.head,
        "weights_file": str(weights) if weights is not None else None,
        "val_split": val_split,
        "seed": seed,
        "classes": dataset.classes,
        "n_train": {c: sum(r.label == c for r in dataset.train) for c in dataset.classes},
        "n_val": {c: sum(r.label == c for r in dataset.val) for c in dataset.classes},
        "skipped": [{"path": str(s.path), "reason": s.reason} for s in dataset.skipped],
        "warnings": [{"path": str(f.path), "problem": f.problem, "detail": f.detail, "fix": f.fix} for f in warnings],
        "val_images": [[str(r.path.resolve()), r.label] for r in dataset.val],
        "n_extracted": frozen.n_extracted,
        "n_cached": frozen.n_cached,
        "history": [{"phase": "head", **row} for row in clf.history_],
        "best_epoch": clf.best_epoch_,
    }
    if choice is not None:
        summary["auto"] = {"chose": choice.strategy, "reason": choice.reason, **choice.measurements}
    if frozen.validation is not None:
        summary["validation"] = frozen.validation.to_dict()

    if strategy == "finetune" or (choice is not None and choice.strategy == "finetune"):
        net, clf = _finetune(net, clf, dataset, tune, summary, Path(out) if out is not None else None, resume, force, progress)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    model = Model(net, clf, summary)
    if out is not None:
        model.save(out, force=force)
        remove_checkpoint(Path(out) / CHECKPOINT_DIR)
        if write_report and dataset.val:
            finetuned = net.finetuned_from is not None
            scores = model.score(dataset.val, progress, features=None if finetuned else frozen.features.X_val)
            build_report(model, scores, Path(out) / REPORT_NAME)
    return model


@dataclass(frozen=True)
class _Frozen:
    """The data as it stands after extraction, its frozen features split into train/val, and the head fitted on them."""

    dataset: Dataset
    features: ProbeData
    clf: HeadClassifier
    validation: Evaluation | None
    n_extracted: int
    n_cached: int


def _cached_features(
    net: Backbone, records: list[ImageRecord], batch_size: int, progress: Progress | None, cache_root: Path, use_cache: bool
) -> CachedExtraction:
    cache = FeatureCache(cache_root, net) if use_cache else None
    make_engine = partial(create_engine, cache_root=cache_root)
    return extract_with_cache(net, [r.path for r in records], cache, batch_size, progress, make_engine)


def _split(dataset: Dataset, records: list[ImageRecord], extraction: CachedExtraction) -> ProbeData:
    """The features and labels of `dataset`'s train and val images, looked up by path in an extraction over `records`."""
    row = {records[i].path: k for k, i in enumerate(extraction.kept.tolist())}

    def part(split: list[ImageRecord]) -> tuple[NDArray[np.float32], NDArray[np.str_]]:
        kept = [r for r in split if r.path in row]
        return extraction.features[[row[r.path] for r in kept]], np.asarray([r.label for r in kept], dtype=str)

    return ProbeData(*part(dataset.train), *part(dataset.val))


def _fit_frozen(net: Backbone, dataset: Dataset, clf: HeadClassifier, records: list[ImageRecord], extraction: CachedExtraction) -> _Frozen:
    """Fit a copy of `clf` on the frozen features of `dataset` (from an extraction over `records`); files it could not read leave the dataset."""
    dataset = dataset.drop(extraction.skipped)
    check_class_counts(dataset.train, dataset.val, dataset.classes, min_val=1 if dataset.val else 0)
    data = _split(dataset, records, extraction)
    fitted = HeadClassifier(**clf.get_params()).fit(data.X_train, data.y_train, data.X_val, data.y_val)
    validation = None
    if len(data.y_val):
        y_val = np.searchsorted(fitted.classes_, data.y_val)
        validation = evaluate_probabilities(y_val, fitted.predict_proba(data.X_val), dataset.classes)
    return _Frozen(dataset, data, fitted, validation, extraction.n_extracted, extraction.n_cached)


def _finetune(
    net: Backbone,
    clf: HeadClassifier,
    dataset: Dataset,
    config: FinetuneConfig,
    summary: dict[str, Any],
    out: Path | None,
    resume: bool,
    force: bool,
    progress: Progress | None,
) -> tuple[Backbone, HeadClassifier]:
    """Phase two; updates `summary` with its history and the tuned model's validation scores."""
    frozen_validation = summary.get("validation")

    def record(result: FinetuneResult) -> dict[str, Any]:
        y_val = np.asarray([dataset.classes.index(r.label) for r in dataset.val])
        return {
            **summary,
            "history": summary["history"] + [{"phase": "finetune", **row} for row in result.history],
            "finetune": {"config": config.to_dict(), "best_epoch": result.best_epoch, "frozen_validation": frozen_validation},
            "validation": evaluate_probabilities(y_val, result.val_proba, dataset.classes).to_dict(),
        }

    def save_best(result: FinetuneResult) -> None:
        if out is not None:
            Model(result.backbone, result.head, record(result)).save(out, force=force)

    checkpoint = out / CHECKPOINT_DIR if out is not None else None
    result = finetune(net, clf, dataset.train, dataset.val, config, checkpoint, resume, progress, on_best=save_best)
    summary.update(record(result))
    return result.backbone, result.head


def check(data: PathLike, val_split: float = 0.2, seed: int = 0, progress: Progress | None = None) -> Triage:
    """Every problem in a dataset with its fix: what `train` would skip, convert, or warn about, and whether it can train."""
    return triage(data, val_split, seed, progress=progress)


def info(model: PathLike) -> dict[str, Any]:
    """What a model folder holds, read from its JSON and the safetensors header; no weights are loaded."""
    return describe_bundle(Path(model))


def predict(model: PathLike | Model, images: Sequence[PathLike], top_k: int = 3, progress: Progress | None = None) -> Predictions:
    """Top-k predictions for image files and folders (searched recursively); unreadable files are skipped.

    Raises:
        DataError: none of the images could be read (the message gives the first reason).
    """
    model = model if isinstance(model, Model) else load(model)
    paths, missing = list_images(list(images))
    if not paths:
        raise _no_readable_images(images, missing)
    result = model.predict_files(paths, top_k, progress)
    if not result.predictions:
        raise _no_readable_images(images, missing + result.skipped)
    return Predictions(result.predictions, missing + result.skipped)


def evaluate(model: PathLike | Model, data: PathLike, progress: Progress | None = None) -> EvaluationResult:
    """Accuracy, per-class precision/recall/F1 and confusion matrix on labelled images.

    Raises:
        DataError: none of the images could be read (the message names `data` and gives the first reason).
    """
    model = model if isinstance(model, Model) else load(model)
    result = model.evaluate(data, progress)
    if result.evaluation.n_images == 0:
        raise _no_readable_images([data], result.skipped, f"`headstart check {data}` lists each problem with its fix.")
    return result


def imagenet(
    images: Sequence[PathLike],
    backbone: str = "efficientnet_lite0",
    weights: PathLike | None = None,
    top_k: int = 5,
    progress: Progress | None = None,
) -> Predictions:
    """The backbone's own ImageNet-1k top-k classes for each image (its pretrained classifier kept on).

    Raises:
        ConfigError: `top_k` is below 1.
        DataError: none of the images could be read (the message gives the first reason).
    """
    if top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}.")
    net = create_backbone(backbone, weights)
    paths, missing = list_images(list(images))
    # Full-resolution decoding: reduced JPEG decoding flips the ImageNet top-1 of a few large photos (bench/decode.py).
    extraction = extract_features(TorchEngine(net, net.imagenet_logits), paths, progress=progress, reduced_decode=False)
    names = imagenet_class_names()
    proba = _softmax(extraction.features)
    predictions = [Prediction.from_probabilities(paths[i], row, names, top_k) for i, row in zip(extraction.kept, proba)]
    if not predictions:
        raise _no_readable_images(images, missing + extraction.skipped)
    return Predictions(predictions, missing + extraction.skipped)


def save_predictions_csv(predictions: Sequence[Prediction], path: PathLike) -> Path:
    """Write one row per image: path, label, probability, then label_2, probability_2, ... (atomically).

    Paths are written as their bytes on disk, so non-UTF-8 file names read back as the same files.
    """
    k = max((len(p.top_k) for p in predictions), default=1)
    header = ["path", "label", "probability"] + [f"{c}_{i}" for i in range(2, k + 1) for c in ("label", "probability")]
    rows = [[str(p.path), *(f"{v:.6f}" if isinstance(v, float) else v for pair in p.top_k for v in pair)] for p in predictions]
    return atomic_write_bytes(output_file(Path(path), ".csv"), csv_bytes(header, rows))


def augment_preview(
    data: PathLike,
    out: PathLike,
    augment: str | AugmentConfig = "light",
    backbone: str = "efficientnet_lite0",
    n_images: int = 4,
    n_variants: int = 5,
    seed: int = 0,
) -> Path:
    """Save a PNG grid: a few training images as the model sees them in evaluation, then augmented.

    Returns the path written.

    Raises:
        ConfigError: `n_images` or `n_variants` is below 1.
    """
    if n_images < 1 or n_variants < 1:
        raise ConfigError(f"n_images and n_variants must be at least 1, got {n_images} and {n_variants}.")
    config = augment if isinstance(augment, AugmentConfig) else AugmentConfig.preset(augment)
    dataset = load_dataset(data, val_split=0.0)
    data_config = create_backbone(backbone).data_config
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(dataset.train), size=min(n_images, len(dataset.train)), replace=False)
    rows, titles = [], []
    for index in sorted(picks.tolist()):
        record = dataset.train[index]
        image = load_image(record.path)
        rows.append([resize_and_crop(image, data_config)] + [augment_image(image, config, data_config, rng) for _ in range(n_variants)])
        titles.append([f"{display(record.label)}: original"] + [f"augmented {k + 1}" for k in range(n_variants)])
    return save_figure(image_grid(rows, titles), output_file(Path(out), ".png"))


def report(model: PathLike, data: PathLike | None = None, out: PathLike | None = None) -> Path:
    """(Re)build a model's HTML report, scored on its validation images or on labelled `data`.

    Writes `out` (default: `report.html` in the model folder) and returns its path.
    """
    loaded = load(model)
    if data is not None:
        dataset = load_dataset(data, val_split=0.0)
        records = dataset.val or dataset.train
    else:
        records = [ImageRecord(Path(p), label) for p, label in loaded.summary.get("val_images", [])]
        if not records:
            raise ConfigError(f"{model}: no validation images are recorded; give labelled images: headstart report {model} DATA.")
    scores = loaded.score([r for r in records if r.label in loaded.classes])
    if not scores.records:
        raise _no_readable_images([model], scores.skipped, f"Give labelled images: headstart report {model} DATA.")
    return build_report(loaded, scores, output_file(Path(out), ".html") if out is not None else Path(model) / REPORT_NAME)


def explain(
    model: PathLike | Model, images: Sequence[PathLike], out: PathLike, class_name: str | None = None, progress: Progress | None = None
) -> Explanations:
    """Grad-CAM overlays for the predicted class (or `class_name`) of each image, one PNG each in `out`.

    Each PNG is named `{stem}_gradcam.png` (`{stem}_2_gradcam.png`, ... when stems repeat; long stems shortened).
    Unreadable images are skipped and listed.

    Raises:
        ConfigError: `class_name` is not one of the model's classes.
        DataError: none of the images could be read (the message gives the first reason).
    """
    model = model if isinstance(model, Model) else load(model)
    if class_name is not None and class_name not in model.classes:
        raise ConfigError(f"Unknown class '{class_name}'. This model's classes: {', '.join(model.classes)}.")
    paths, skipped = list_images(list(images))
    written: list[Path] = []
    taken = existing_names(Path(out))
    cfg = model.backbone.data_config
    for done, path in enumerate(paths, start=1):
        try:
            image = load_image(path)
        except (UnreadableImageError, FileRefusedError) as e:
            skipped.append(Skipped(path, e.reason))
        else:
            batch = torch.from_numpy(preprocess(image, cfg))[None]
            proba = model.head.predict_proba(model.backbone.features(batch).numpy())[0]
            index = model.classes.index(class_name) if class_name else int(proba.argmax())
            view = resize_and_crop(image, cfg)
            title = f"{display(path.name)}: Grad-CAM for '{display(model.classes[index])}' (p={proba[index]:.2f})"
            cam = overlay(view, grad_cam(model.backbone, batch, index, model.head.head_))
            figure = image_grid([[view, cam]], [[display(path.name), title]], cell_inches=3)
            written.append(save_figure(figure, Path(out) / output_name(path.stem, "_gradcam.png", taken)))
        if progress:
            progress("Explaining", done, len(paths))
    if not written:
        raise _no_readable_images(images, skipped)
    return Explanations(written, skipped)


def activations(model_or_backbone: str | PathLike, image: PathLike, out: PathLike, n_channels: int = 8) -> Path:
    """A PNG grid of the first feature maps of each backbone stage for one image (shallow to deep)."""
    source = Path(model_or_backbone)
    net = load(source).backbone if (source / "bundle.json").is_file() else create_backbone(str(model_or_backbone))
    path = Path(image)
    batch = torch.from_numpy(preprocess(load_image(path), net.data_config))[None]
    names = [f"{name} ({channels} ch)" for name, channels in net.stages()]
    figure = feature_map_grid(stage_activations(net, batch, n_channels), names)
    return save_figure(figure, Path(out) / output_name(path.stem, "_activations.png", existing_names(Path(out))))


def imagenet_grid(result: Predictions, out: PathLike, n_cols: int = 4) -> Path:
    """A PNG grid of the images, each titled with its top-1 ImageNet class and probability."""
    if not result.predictions:
        raise ConfigError("No readable images to draw.")
    views = [ImageOps.fit(load_image(p.path), (256, 256)) for p in result.predictions]
    titles = [f"{display(p.label.split(',')[0])} ({p.probability:.2f})" for p in result.predictions]
    rows = [views[k : k + n_cols] for k in range(0, len(views), n_cols)]
    return save_figure(image_grid(rows, [titles[k : k + n_cols] for k in range(0, len(titles), n_cols)]), output_file(Path(out), ".png"))


def _no_readable_images(
    inputs: Sequence[PathLike], skipped: list[Skipped], fix: str = "Give image files (JPEG, PNG, ...) or folders holding them."
) -> DataError:
    """The error for inputs among which no image could be read: what was skipped, and why the first one was."""
    where = ", ".join(map(str, inputs[:3])) + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")
    if not skipped:
        return DataError(f"{where}: no images found. {fix}")
    first = skipped[0]
    return DataError(f"{where}: no readable images; {len(skipped)} skipped (first: {first.path}: {first.reason}). {fix}")


def backbones() -> list[BackboneInfo]:
    """The backbones headstart knows, and whether each works offline."""
    return list_backbones()


def demo(out: PathLike = "headstart-demo", cache_dir: PathLike | None = None, progress: Progress | None = None) -> Model:
    """Fetch the flower photos, train the default model on them and save it to `out`."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    flowers = fetch_flowers(root, progress=progress)
    return train(flowers, cache_dir=root, out=out, progress=progress)


def _softmax(logits: NDArray[np.float32]) -> NDArray[np.float32]:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return np.asarray(shifted / shifted.sum(1, keepdims=True), dtype=np.float32)
