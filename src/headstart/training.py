"""Training: data in, features extracted or read from the cache, a head fitted, optionally fine-tuned, saved with its report."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import NDArray

from headstart.augment import AugmentConfig
from headstart.backbone import Backbone, at_layer, create_backbone
from headstart.bundle import CHECKPOINT_DIR, REPORT_NAME, check_output_folder
from headstart.cache import CachedExtraction, FeatureCache, extract_with_cache
from headstart.checkpoints import remove_checkpoint
from headstart.classifier import HeadClassifier
from headstart.config import Progress, default_cache_dir
from headstart.data import Dataset, ImageRecord, check_class_counts, check_layout, check_val_split, read_source, split_dataset
from headstart.engine import create_engine
from headstart.errors import ConfigError
from headstart.metrics import Evaluation, evaluate_probabilities
from headstart.model import Model, PathLike
from headstart.strategy import EARLIER_LAYER, ProbeData, choose, imagenet_confidence, probe_loss
from headstart.summary import AutoChoice, FinetuneRecord, TrainingSummary
from headstart.triage import dataset_warnings

if TYPE_CHECKING:
    from headstart.finetune import FinetuneConfig, FinetuneResult

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
    balanced: bool = False,
    unfreeze: int | None = 2,
    epochs: int = 8,
    augment: str | AugmentConfig = "strong",
    out: PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    report: bool = True,
    cache_dir: PathLike | None = None,
    cache: bool = True,
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
        balanced: weight classes inversely to their frequency.
        unfreeze: for "finetune", how many top blocks to train; None for all.
        epochs: for "finetune", the most epochs of the second phase.
        augment: for "finetune", "none", "light", "strong" (default) or an `AugmentConfig`.
        out: save the model in this folder (and, for "finetune", the best-so-far
            model after each improving epoch and a checkpoint to resume from).
        resume: continue an interrupted "finetune" run from its checkpoint in `out`.
        force: let `out` be a folder of other files (they are kept); by default it
            must be new, empty or a headstart model.
        report: with `out`, also write `out/report.html` (curves, confusion matrix,
            prediction grids, top losses, Grad-CAM on validation images).
        cache_dir: where features are cached (default: `default_cache_dir()`).
        cache: False to neither read nor write the feature cache.
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
    clf = HeadClassifier(head="mlp" if strategy == "mlp" else head or "linear", class_weight="balanced" if balanced else None, seed=seed)
    clf.check_params()
    augment_config = augment if isinstance(augment, AugmentConfig) else AugmentConfig.preset(augment)
    tune = None
    if strategy in ("finetune", "auto"):  # PyTorch is imported only for strategies that may fine-tune
        from headstart.finetune import FinetuneConfig

        tune = FinetuneConfig(unfreeze=unfreeze, epochs=epochs, augment=augment_config, seed=seed, batch_size=batch_size)
    check_val_split(val_split)
    root = Path(data).expanduser()
    records, presplit_val, skipped = read_source(root)
    check_layout(root, records)  # fails fast only where no file being skipped could matter, so never where `check` says it can train
    if strategy in ("finetune", "auto") and presplit_val is None and val_split == 0:
        raise ConfigError(f"Strategy '{strategy}' needs validation images; use a val_split above 0.")
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    net = create_backbone(backbone, weights, layer, cache_root=cache_root)
    features_of = partial(_cached_features, cache_root=cache_root, use_cache=cache)
    found = records + (presplit_val or [])
    extraction = features_of(net, found, batch_size, progress)
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
        early = _split(frozen.dataset, used, features_of(at_layer(net, EARLIER_LAYER), used, batch_size, progress))
        confidence = imagenet_confidence(net, final.X_train) if net.has_imagenet_head and net.layer is None else None
        n_train, n_classes = len(frozen.dataset.train), len(frozen.dataset.classes)
        choice = choose(n_train, n_classes, confidence, probe_loss(final, seed), probe_loss(early, seed))
        if choice.layer is not None:
            net = at_layer(net, choice.layer)
            frozen = _fit_frozen(net, frozen.dataset, clf, used, features_of(net, used, batch_size, progress))
        tune = dataclasses.replace(tune, unfreeze=choice.unfreeze) if tune is not None else None

    dataset, clf = frozen.dataset, frozen.clf
    summary = TrainingSummary(
        data=str(data),
        backbone=net.name,
        layer=net.layer,
        strategy=strategy,
        head=clf.head,
        weights_file=str(weights) if weights is not None else None,
        val_split=val_split,
        seed=seed,
        classes=tuple(dataset.classes),
        n_train={c: sum(r.label == c for r in dataset.train) for c in dataset.classes},
        n_val={c: sum(r.label == c for r in dataset.val) for c in dataset.classes},
        skipped=tuple(dataset.skipped),
        warnings=tuple(warnings),
        val_images=tuple(ImageRecord(r.path.resolve(), r.label) for r in dataset.val),
        n_extracted=frozen.n_extracted,
        n_cached=frozen.n_cached,
        history=tuple({"phase": "head", **row} for row in clf.history_),
        best_epoch=clf.best_epoch_,
        validation=frozen.validation,
        auto=AutoChoice(choice.strategy, choice.reason, choice.measurements) if choice is not None else None,
    )
    if tune is not None and (strategy == "finetune" or (choice is not None and choice.strategy == "finetune")):
        net, clf, summary = _finetune(net, clf, dataset, tune, summary, Path(out) if out is not None else None, resume, force, progress)
    detector = None
    if net.finetuned_from is None and len(frozen.features.y_val):  # calibration and unknown detection on the frozen features
        from headstart.unknown import calibrate, fit_detector

        probe, classes = frozen.features, clf.classes_
        y_train, y_val = np.searchsorted(classes, probe.y_train), np.searchsorted(classes, probe.y_val)
        standardization = (clf.weights_["0.mean"], clf.weights_["0.scale"])
        detector = fit_detector(probe.X_train, y_train, len(classes), standardization=standardization, seed=seed)
        logits = clf.decision_function(probe.X_val)
        record, detector = calibrate(detector, logits, y_val, detector.score(probe.X_val, logits))
        summary = summary.replace(calibration=record)
    model = Model(net, clf, summary.replace(seconds=round(time.perf_counter() - started, 2)), cache_root, detector)
    if out is not None:
        model.save(out, force=force)
        remove_checkpoint(Path(out) / CHECKPOINT_DIR)
        if report and dataset.val:
            from headstart.html_report import build_report

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
    store = FeatureCache(cache_root, net) if use_cache else None
    make_engine = partial(create_engine, cache_root=cache_root)
    return extract_with_cache(net, [r.path for r in records], store, batch_size, progress, make_engine)


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
    summary: TrainingSummary,
    out: Path | None,
    resume: bool,
    force: bool,
    progress: Progress | None,
) -> tuple[Backbone, HeadClassifier, TrainingSummary]:
    """Phase two; the tuned backbone and head, and `summary` with its history and the tuned model's validation scores."""
    from headstart.finetune import finetune

    y_val = np.asarray([dataset.classes.index(r.label) for r in dataset.val])

    def record(result: FinetuneResult) -> TrainingSummary:
        return summary.replace(
            history=summary.history + tuple({"phase": "finetune", **row} for row in result.history),
            finetune=FinetuneRecord(config.to_dict(), result.best_epoch, summary.validation),
            validation=evaluate_probabilities(y_val, result.val_proba, dataset.classes),
        )

    def save_best(result: FinetuneResult) -> None:
        if out is not None:
            Model(result.backbone, result.head, record(result)).save(out, force=force)

    checkpoint = out / CHECKPOINT_DIR if out is not None else None
    result = finetune(net, clf, dataset.train, dataset.val, config, checkpoint, resume, progress, on_best=save_best)
    return result.backbone, result.head, record(result)
