"""Training: data in, features extracted or read from the cache, a head fitted, optionally fine-tuned, saved with its report."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import NDArray
from sklearn.base import clone

from headstart.augment import AugmentConfig
from headstart.backbone import Backbone, at_layer, create_backbones, ensemble_name, parse_backbones
from headstart.bundle import CHECKPOINT_DIR, REPORT_NAME, check_output_folder
from headstart.cache import CachedExtraction, FeatureCache, extract_members_with_cache
from headstart.checkpoints import remove_checkpoint
from headstart.classifier import HeadClassifier
from headstart.config import Progress, check_head_params, default_cache_dir
from headstart.data import (
    Dataset,
    ImageRecord,
    check_class_counts,
    check_layout,
    check_val_split,
    read_source,
    split_dataset,
    split_records,
)
from headstart.engine import create_engine
from headstart.errors import ConfigError
from headstart.files import display
from headstart.heads import Head
from headstart.metrics import Evaluation, evaluate_probabilities
from headstart.model import Model, PathLike, Scores
from headstart.selection import N_FOLDS, CrossValidation, cross_validate
from headstart.selection import refit as refit_head
from headstart.strategy import EARLIER_LAYER, ProbeData, choose, imagenet_confidence, probe_loss
from headstart.summary import AutoChoice, CalibrationRecord, FinetuneRecord, TrainingSummary
from headstart.triage import dataset_warnings

if TYPE_CHECKING:
    from headstart.finetune import FinetuneConfig, FinetuneResult
    from headstart.unknown import UnknownDetector

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
    refit: bool = True,
    folds: int = N_FOLDS,
    test_split: float = 0.0,
    tta: bool = False,
    progress: Progress | None = None,
) -> Model:
    """Train a classifier on a folder of labelled photos (or a `path,label` CSV).

    Every strategy starts the same way: the frozen backbone's pooled features are
    computed once per image and cached, and a head is fitted on them. With `refit`
    (frozen heads), the head's settings (the linear head's regularisation, the MLP's
    epochs) are chosen by `folds`-fold cross-validation over all labelled images, the
    reported validation scores are the out-of-fold predictions', and the head is then
    refitted on all of them. Otherwise the head is fitted on the training split and
    scored on the validation split. `finetune` then trains the backbone's top blocks
    together with that head on augmented images, stopping early on the validation split.

    Args:
        data: a folder with one sub-folder per class, a folder with train/ and val/
            splits of such folders, or a CSV of path,label.
        backbone: a name from `headstart.backbones()` or "timm:<model>"; several joined by "+" (e.g.
            "efficientnet_lite0+efficientnet_lite1") for an ensemble: the head is fitted on their
            features concatenated, each backbone's computed with its own preprocessing and cached
            under its own key (frozen strategies only; `layer` applies to every member; `weights` goes to
            its one timm: member).
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
        refit: frozen heads: choose settings by cross-validation and refit on all labelled images
            (scores from the out-of-fold predictions); False: fit on the training split, score on validation.
        folds: the number of cross-validation folds.
        test_split: fraction of each class held out first as a test split that nothing is chosen
            or stopped on; the model is scored on it at the end (`summary.test`).
        tta: also score the test split with test-time augmentation (`summary.test_tta`).
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
    members = parse_backbones(backbone)
    if len(members) > 1 and strategy in ("finetune", "auto"):
        raise ConfigError(
            f"Strategy '{strategy}' takes one backbone, and '{backbone}' is an ensemble. Use --strategy linear or mlp, or train one backbone."
        )
    if out is not None:
        check_output_folder(Path(out), force)
        source = Path(data).expanduser().resolve()
        if source.is_dir() and Path(out).resolve().is_relative_to(source):
            raise ConfigError(
                f"{display(str(out))}: inside the data folder; its files would be read as photos next time. Give --out outside it."
            )
    clf = HeadClassifier(
        head="mlp" if strategy == "mlp" else head or "linear", class_weight="balanced" if balanced else None, random_state=seed
    )
    check_head_params(clf.get_params())
    augment_config = augment if isinstance(augment, AugmentConfig) else AugmentConfig.preset(augment)
    tune = None
    if strategy in ("finetune", "auto"):  # PyTorch is imported only for strategies that may fine-tune
        from headstart.finetune import FinetuneConfig

        tune = FinetuneConfig(unfreeze=unfreeze, epochs=epochs, augment=augment_config, seed=seed, batch_size=batch_size)
    check_val_split(val_split)
    if not 0.0 <= test_split < 1.0 or not 2 <= folds <= 100:
        raise ConfigError(f"test_split must be in [0, 1) and folds from 2 to 100, got {test_split} and {folds}.")
    refit = refit and strategy in ("linear", "mlp", "auto")
    root = Path(data).expanduser()
    records, presplit_val, skipped = read_source(root)
    check_layout(root, records)  # fails fast only where no file being skipped could matter, so never where `check` says it can train
    if strategy in ("finetune", "auto") and presplit_val is None and val_split == 0:
        raise ConfigError(f"Strategy '{strategy}' needs validation images; use a val_split above 0.")
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    nets = create_backbones(backbone, weights, layer, cache_root=cache_root)
    net = nets[0]  # the strategies that change the backbone (auto, finetune) take one
    features_of = partial(_cached_features, cache_root=cache_root, use_cache=cache)
    found = records + (presplit_val or [])
    extraction = features_of(nets, found, batch_size, progress)
    # Unreadable files leave before the split, as in `check`, so both count the same usable images per class.
    unusable = {s.path for s in extraction.skipped}
    records, test = split_records([r for r in records if r.path not in unusable], test_split, seed)
    dataset = split_dataset(root, records, presplit_val, skipped, val_split, seed, unusable=extraction.skipped)
    warnings = dataset_warnings(data, dataset)
    if strategy in ("finetune", "auto") and not dataset.val:
        raise ConfigError(f"Strategy '{strategy}' needs validation images; use a val_split above 0.")
    fit_head = partial(_fit_frozen, n_folds=folds, seed=seed, progress=progress)
    frozen = fit_head(dataset, clf, found, extraction, refit=refit and strategy != "auto")

    choice = None
    if strategy == "auto":
        final = frozen.features
        used = frozen.dataset.train + frozen.dataset.val
        early = _split(frozen.dataset, used, features_of((at_layer(net, EARLIER_LAYER),), used, batch_size, progress))
        confidence = imagenet_confidence(net, final.X_train) if net.has_imagenet_head and net.layer is None else None
        n_train, n_classes = len(frozen.dataset.train), len(frozen.dataset.classes)
        choice = choose(n_train, n_classes, confidence, probe_loss(final, seed), probe_loss(early, seed))
        if choice.layer is not None:
            net = at_layer(net, choice.layer)
            nets = (net,)
            frozen = fit_head(frozen.dataset, clf, used, features_of(nets, used, batch_size, progress), refit=refit)
        elif refit and choice.strategy == "linear":
            frozen = fit_head(frozen.dataset, clf, found, extraction, refit=True)
        tune = dataclasses.replace(tune, unfreeze=choice.unfreeze) if tune is not None else None

    dataset, clf, fitted = frozen.dataset, frozen.clf, frozen.clf.head_
    summary = TrainingSummary(
        data=str(data),
        backbone=ensemble_name(nets),
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
        scored_on=f"{frozen.cv.n_folds}-fold cross-validation" if frozen.cv is not None else "validation split",
        refit=frozen.cv is not None,
        test_split=test_split,
        n_test={c: sum(r.label == c for r in test) for c in dataset.classes},
        test_images=tuple(ImageRecord(r.path.resolve(), r.label) for r in test),
        auto=AutoChoice(choice.strategy, choice.reason, choice.measurements) if choice is not None else None,
    )
    detector = None
    if frozen.cv is not None or len(frozen.features.y_val):  # calibration and unknown detection of the frozen head
        record, detector = _calibration(frozen, seed)
        summary = summary.replace(calibration=record)
    if test:
        frozen_model = Model(nets, fitted, summary, cache_root, detector)
        scored = frozen_model.score(test, features=_features_of(test, found, extraction))
        summary = summary.replace(test=scored.evaluation, test_tta=frozen_model.score(test, tta=True).evaluation if tta else None)
    if tune is not None and (strategy == "finetune" or (choice is not None and choice.strategy == "finetune")):
        # the frozen head's calibration and detector hold only if no tuned epoch replaces it (nor in the best-so-far saves)
        calibration, summary = summary.calibration, summary.replace(calibration=None)
        net, fitted, summary = _finetune(
            net, fitted, dataset, tune, summary, Path(out) if out is not None else None, resume, force, progress
        )
        if net.finetuned_from is None:
            summary = summary.replace(calibration=calibration)
        else:
            nets, detector = (net,), None
        if test:
            tuned = Model(nets, fitted, summary, cache_root, detector)
            tuned_tta = tuned.score(test, progress, tta=True).evaluation if tta else None
            summary = summary.replace(test=tuned.score(test, progress).evaluation, test_tta=tuned_tta)
    model = Model(nets, fitted, summary.replace(seconds=round(time.perf_counter() - started, 2)), cache_root, detector)
    if out is not None:
        model.save(out, force=force)
        remove_checkpoint(Path(out) / CHECKPOINT_DIR)
        if report and (dataset.val or frozen.cv is not None):
            from headstart.html_report import build_report

            scored_on = (
                f"out-of-fold predictions of {summary.scored_on}: each image scored by a head fitted without it (C chosen on the same folds)"
                if frozen.cv is not None
                else "the validation split (early stopping and fine-tuning chose on it)"
            )
            suspects = None
            if frozen.cv is not None:  # the out-of-fold predictions say which labels look wrong
                from headstart.suspects import find_suspects

                suspects = find_suspects(frozen.dataset.train + frozen.dataset.val, dataset.classes, frozen.cv.y, frozen.cv.proba)
            build_report(model, _report_scores(model, frozen, progress), Path(out) / REPORT_NAME, scored_on, suspects=suspects)
    return model


def _calibration(frozen: _Frozen, seed: int) -> tuple[CalibrationRecord, UnknownDetector | None]:
    """Temperature and unknown detector for a frozen head, each fitted on predictions of images the head held out.

    After a refit those are the out-of-fold predictions, with each fold's images scored by a
    detector fitted on the other folds; else the validation split's, scored by one fitted on training.
    """
    from headstart.unknown import calibrate, fit_detector

    head, probe = frozen.clf.head_, frozen.features
    standardization = (head.weights["0.mean"], head.weights["0.scale"])

    def detector_on(X: NDArray[np.float32], y: NDArray[np.int64]) -> UnknownDetector:
        return fit_detector(X, y, len(head.classes), standardization=standardization, seed=seed)

    if frozen.cv is None:
        y_train, y_val = np.searchsorted(head.classes, probe.y_train), np.searchsorted(head.classes, probe.y_val)
        detector, logits = detector_on(probe.X_train, y_train), head.logits(probe.X_val)
        return calibrate(detector, logits, y_val, detector.score(probe.X_val, logits))
    cv = frozen.cv
    X = np.concatenate([probe.X_train, probe.X_val])
    scores = np.zeros(len(X), dtype=np.float32)
    for k in range(cv.n_folds):
        held_out = cv.folds == k
        scores[held_out] = detector_on(X[~held_out], cv.y[~held_out]).score(X[held_out], cv.logits[held_out])
    return calibrate(detector_on(X, cv.y), cv.logits, cv.y, scores)


def _report_scores(model: Model, frozen: _Frozen, progress: Progress | None) -> Scores:
    """What the report shows: out-of-fold predictions after a refit, else the model's on the validation split."""
    if frozen.cv is not None:
        from headstart.calibration import softmax

        records = frozen.dataset.train + frozen.dataset.val
        proba = softmax(frozen.cv.logits, model.temperature)  # calibrated, as the model's own probabilities are
        return Scores(records, frozen.cv.y, proba, evaluate_probabilities(frozen.cv.y, proba, frozen.dataset.classes), [])
    finetuned = any(b.finetuned_from is not None for b in model.backbones)
    return model.score(frozen.dataset.val, progress, features=None if finetuned else frozen.features.X_val)


def _features_of(records: list[ImageRecord], found: list[ImageRecord], extraction: CachedExtraction) -> NDArray[np.float32]:
    """The rows of `extraction` (over `found`) for `records`, all of which it kept."""
    row = {found[i].path: k for k, i in enumerate(extraction.kept.tolist())}
    return extraction.features[[row[r.path] for r in records]]


@dataclass(frozen=True)
class _Frozen:
    """The data as it stands after extraction, its frozen features split into train/val, and the head fitted on them.

    `cv` holds the out-of-fold predictions over train + val when the head was refitted on all of them.
    """

    dataset: Dataset
    features: ProbeData
    clf: HeadClassifier
    validation: Evaluation | None
    n_extracted: int
    n_cached: int
    cv: CrossValidation | None = None


def _cached_features(
    nets: tuple[Backbone, ...], records: list[ImageRecord], batch_size: int, progress: Progress | None, cache_root: Path, use_cache: bool
) -> CachedExtraction:
    """The backbones' features of `records` (concatenated for an ensemble), each backbone's read from and stored in its own cache."""
    stores = [FeatureCache(cache_root, net) if use_cache else None for net in nets]
    make_engine = partial(create_engine, cache_root=cache_root)
    return extract_members_with_cache(nets, [r.path for r in records], stores, batch_size, progress, make_engine)


def _split(dataset: Dataset, records: list[ImageRecord], extraction: CachedExtraction) -> ProbeData:
    """The features and labels of `dataset`'s train and val images, looked up by path in an extraction over `records`."""

    def part(split: list[ImageRecord]) -> tuple[NDArray[np.float32], NDArray[np.str_]]:
        return _features_of(split, records, extraction), np.asarray([r.label for r in split], dtype=str)

    return ProbeData(*part(dataset.train), *part(dataset.val))


def _fit_frozen(
    dataset: Dataset,
    clf: HeadClassifier,
    records: list[ImageRecord],
    extraction: CachedExtraction,
    refit: bool,
    n_folds: int,
    seed: int,
    progress: Progress | None,
) -> _Frozen:
    """Fit a copy of `clf` on the frozen features of `dataset` (from an extraction over `records`); files it could not read leave the dataset.

    With `refit`, settings are chosen by cross-validation over train + val, which score the head
    by their out-of-fold predictions, and the head is fitted on all of them. Otherwise a linear
    head's `C` is chosen by cross-validation on the training split, and it is scored on val.
    """
    dataset = dataset.drop(extraction.skipped)
    check_class_counts(dataset.train, dataset.val, dataset.classes, min_val=1 if dataset.val else 0)
    data = _split(dataset, records, extraction)
    if refit:
        X, y = np.concatenate([data.X_train, data.X_val]), np.concatenate([data.y_train, data.y_val])
        cv = cross_validate(clf, X, y, n_folds, seed, progress)
        scores = evaluate_probabilities(cv.y, cv.proba, dataset.classes)
        return _Frozen(dataset, data, refit_head(clf, cv, X, y), scores, extraction.n_extracted, extraction.n_cached, cv)
    chosen = clone(clf)
    if clf.uses_lbfgs() and min(Counter(data.y_train.tolist()).values()) >= 2:
        chosen.set_params(**cross_validate(clf, data.X_train, data.y_train, n_folds, seed, progress).params)
    fitted = chosen.fit(data.X_train, data.y_train, data.X_val, data.y_val)
    validation: Evaluation | None = None
    if len(data.y_val):
        y_val = np.searchsorted(fitted.classes_, data.y_val)
        validation = evaluate_probabilities(y_val, fitted.predict_proba(data.X_val), dataset.classes)
    return _Frozen(dataset, data, fitted, validation, extraction.n_extracted, extraction.n_cached)


def _finetune(
    net: Backbone,
    head: Head,
    dataset: Dataset,
    config: FinetuneConfig,
    summary: TrainingSummary,
    out: Path | None,
    resume: bool,
    force: bool,
    progress: Progress | None,
) -> tuple[Backbone, Head, TrainingSummary]:
    """Phase two; the tuned backbone and head, and `summary` with its history and the tuned model's validation scores."""
    from headstart.finetune import finetune

    y_val = np.asarray([dataset.classes.index(r.label) for r in dataset.val])

    def record(result: FinetuneResult) -> TrainingSummary:
        return summary.replace(
            history=summary.history + tuple({"phase": "finetune", **row} for row in result.history),
            finetune=FinetuneRecord(config.to_dict(), result.best_epoch, summary.validation, summary.test, summary.test_tta),
            validation=evaluate_probabilities(y_val, result.val_proba, dataset.classes),
        )

    def save_best(result: FinetuneResult) -> None:
        if out is not None:
            Model(result.backbone, result.head, record(result)).save(out, force=force)

    checkpoint = out / CHECKPOINT_DIR if out is not None else None
    result = finetune(net, head, dataset.train, dataset.val, config, checkpoint, resume, progress, on_best=save_best)
    return result.backbone, result.head, record(result)
