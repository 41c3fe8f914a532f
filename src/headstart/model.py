"""Model: a backbone (or an ensemble of backbones) and a fitted head, ready to predict, evaluate and save."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from headstart import __version__
from headstart.backbone import Backbone, create_backbone, ensemble_name, member_weights, weights_file_bytes
from headstart.bundle import (
    BACKBONE_WEIGHTS_NAME,
    HISTORY_CSV_NAME,
    HISTORY_NAME,
    BackboneRecord,
    BundleConfig,
    backbone_weights_files,
    read_bundle,
    save_bundle,
)
from headstart.config import DataConfig, Progress, default_cache_dir
from headstart.data import MAX_ASPECT_RATIO, MAX_PIXELS, MIN_SIDE, ImageRecord, Skipped, list_images, load_dataset, size_problem
from headstart.engine import Engine, create_engine
from headstart.errors import BundleError, ConfigError, DataError, UnreadableImageError
from headstart.features import Extraction, extract_features, mirrored, run_engines
from headstart.files import csv_bytes, json_bytes
from headstart.heads import Head
from headstart.metrics import Evaluation, evaluate_probabilities
from headstart.summary import TrainingSummary
from headstart.transforms import preprocess
from headstart.unknown import UnknownDetector

UnknownOption = Literal["auto", "off"] | float
"""When an image is called unknown: "auto" past the model's own threshold, "off" never, a number past that score."""

PathLike = str | os.PathLike[str]
ImageLike = PathLike | Image.Image | NDArray[np.uint8]
"""An image file or folder, a PIL image, or RGB pixels of shape (height, width, 3)."""


@dataclass(frozen=True)
class Prediction:
    """The top classes for one image, most probable first; `path` is None for an image given in memory.

    `unknown` says the image looks like none of the model's classes (its `unknown_score`, when the
    model has a detector, is past the threshold); the classes are still ranked.
    """

    path: Path | None
    top_k: list[tuple[str, float]]
    unknown: bool = False
    unknown_score: float | None = None

    @classmethod
    def from_probabilities(
        cls,
        path: Path | None,
        proba: NDArray[np.float32],
        names: Sequence[str],
        top_k: int,
        unknown_score: float | None = None,
        threshold: float | None = None,
    ) -> Prediction:
        """The `top_k` most probable of `names` given one row of class probabilities; unknown when the score is past `threshold`."""
        unknown = unknown_score is not None and threshold is not None and unknown_score > threshold
        return cls(path, [(names[j], float(proba[j])) for j in np.argsort(-proba, kind="stable")[:top_k]], unknown, unknown_score)

    @property
    def label(self) -> str:
        return self.top_k[0][0]

    @property
    def probability(self) -> float:
        return self.top_k[0][1]


@dataclass(frozen=True)
class Predictions:
    """Predictions for the readable images, and the files skipped."""

    predictions: list[Prediction]
    skipped: list[Skipped] = field(default_factory=list)

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.predictions)

    def __len__(self) -> int:
        return len(self.predictions)


FITTED_REASON = "the head was fitted on this image (left out: its score would flatter the model)"


@dataclass(frozen=True)
class EvaluationResult:
    """An evaluation and the files it could not read."""

    evaluation: Evaluation
    skipped: list[Skipped] = field(default_factory=list)


@dataclass(frozen=True)
class Scores:
    """A model's output on labelled images.

    Attributes:
        records: the readable images, in input order.
        y_true: int64 class indices, shape (len(records),).
        proba: float32 class probabilities, shape (len(records), n_classes).
        evaluation: the metrics of `proba` against `y_true`.
        skipped: the unreadable images.
    """

    records: list[ImageRecord]
    y_true: NDArray[np.int64]
    proba: NDArray[np.float32]
    evaluation: Evaluation
    skipped: list[Skipped]


class Model:
    """A trained image classifier: a pretrained backbone, or an ensemble of them, and a fitted head.

    An ensemble's features are its backbones' features concatenated in member order,
    each backbone seeing the image through its own preprocessing.

    Attributes:
        backbones: the feature extractors, in the order their features are concatenated (one for most models).
        head: the fitted `Head` (`HeadClassifier(...).fit(...).head_`).
        classes: the class names, in the order of `predict_proba`'s columns.
        summary: what training did (data counts, skipped files, validation metrics, history).
        cache_root: where the backbones' exported ONNX engines are kept (default: `default_cache_dir()`).
        detector: scores how unlike the training images an image is, with its threshold (None: no unknown detection).
    """

    def __init__(
        self,
        backbone: Backbone | Sequence[Backbone],
        head: Head,
        summary: TrainingSummary | None = None,
        cache_root: Path | None = None,
        detector: UnknownDetector | None = None,
    ) -> None:
        self.cache_root = cache_root or default_cache_dir()
        self.backbones: tuple[Backbone, ...] = (backbone,) if isinstance(backbone, Backbone) else tuple(backbone)
        if not self.backbones:
            raise ValueError("a model needs at least one backbone")
        if not isinstance(head, Head):
            raise ConfigError(f"A Model takes a fitted Head, got {type(head).__name__}; pass a fitted HeadClassifier's head_.")
        self.head = head
        self.detector = detector
        self.classes: list[str] = [str(c) for c in head.classes]
        layer = self.backbones[0].layer if len(self.backbones) == 1 else None
        self.summary = summary or TrainingSummary("", self.backbone_name, head.kind, head.kind, tuple(self.classes), layer=layer)

    @property
    def backbone_name(self) -> str:
        """The backbone's name, or an ensemble's member names joined by '+'."""
        return ensemble_name(self.backbones)

    @property
    def backbone(self) -> Backbone:
        """The backbone of a single-backbone model.

        Raises:
            ConfigError: the model is an ensemble (see `backbones`).
        """
        if len(self.backbones) > 1:
            raise ConfigError(
                f"This model is an ensemble of {len(self.backbones)} backbones ({self.backbone_name}) and this takes one; "
                f"use a single-backbone model, or name a backbone, e.g. {self.backbones[0].name}."
            )
        return self.backbones[0]

    @property
    def data_configs(self) -> tuple[DataConfig, ...]:
        """Each backbone's preprocessing, in member order."""
        return tuple(b.data_config for b in self.backbones)

    @property
    def temperature(self) -> float:
        """The probabilities are softmax(logits / temperature): fitted on held-out images in training, 1 for older models."""
        return self.summary.calibration.temperature if self.summary.calibration else 1.0

    def outputs(self, features: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]:
        """Calibrated class probabilities (n_images, n_classes) and unknown scores (n_images,) (None without a detector)
        of backbone features (n_images, n_features)."""
        if self.summary.calibration is None and self.detector is None:
            return self.head.predict_proba(features), None
        from headstart.calibration import softmax

        logits = self.head.logits(features)
        scores = self.detector.score(features, logits) if self.detector is not None else None
        return softmax(logits, self.temperature), scores

    def unknown_threshold(self, unknown: UnknownOption = "auto") -> float | None:
        """The score past which an image is called unknown under the option `unknown`; None: none is.

        Raises:
            ConfigError: not "auto", "off" or a finite number.
        """
        if unknown == "off":
            return None
        if unknown == "auto":
            return self.detector.threshold if self.detector is not None else None
        if isinstance(unknown, bool) or not isinstance(unknown, int | float) or not np.isfinite(unknown):
            raise ConfigError(f"unknown must be 'auto', 'off' or a finite number, got {unknown!r}.")
        return float(unknown)

    @cached_property
    def engines(self) -> tuple[Engine, ...]:
        """What runs each backbone for predictions: ONNX Runtime when it exports, else PyTorch."""
        return tuple(create_engine(b, cache_root=self.cache_root) for b in self.backbones)

    @property
    def engine(self) -> Engine:
        """The engine of a single-backbone model (see `engines`).

        Raises:
            ConfigError: the model is an ensemble.
        """
        _ = self.backbone  # ConfigError for an ensemble
        return self.engines[0]

    def extract(self, paths: Sequence[Path], progress: Progress | None = None, flip: bool = False) -> Extraction:
        """The features of image files (mirrored with `flip`), shape (n_kept, head's n_features): each decoded once, run through every backbone."""
        return extract_features(self.engines, paths, progress=progress, flip=flip)

    def inputs(self, image: Image.Image) -> tuple[NDArray[np.float32], ...]:
        """An RGB image as each backbone's input: float32 arrays of shape (3, S_m, S_m), one per backbone."""
        done = {cfg: preprocess(image, cfg) for cfg in dict.fromkeys(self.data_configs)}
        return tuple(done[cfg] for cfg in self.data_configs)

    def features(self, inputs: Sequence[NDArray[np.float32]]) -> NDArray[np.float32]:
        """Features of a batch of preprocessed images, `inputs[m]` of shape (n, 3, S_m, S_m) for backbone m; shape (n, n_features)."""
        return run_engines(self.engines, inputs)

    def predict_proba(self, images: Sequence[ImageLike], progress: Progress | None = None, tta: bool = False) -> NDArray[np.float32]:
        """Class probabilities, one row per image (folders expanded), columns in `classes` order.

        `tta` averages them with those of the image mirrored left to right (test-time augmentation).

        Raises:
            UnreadableImageError: an image could not be decoded.
        """
        proba, _, _, skipped = self._probabilities(images, progress, tta)
        if skipped:
            raise UnreadableImageError(skipped[0].path, skipped[0].reason)
        return proba

    def predict(
        self,
        images: Sequence[ImageLike],
        top_k: int = 3,
        progress: Progress | None = None,
        unknown: UnknownOption = "auto",
        tta: bool = False,
    ) -> Predictions:
        """The `top_k` classes of each image (files, folders searched recursively, PIL images or RGB arrays).

        Unreadable files are skipped and listed in `Predictions.skipped`, never fatal. `unknown`: "auto"
        marks images past the model's threshold as unknown, a number past that score, "off" none.
        `tta` averages the probabilities with those of the image mirrored left to right (the unknown
        score stays the image's own).
        """
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}.")
        threshold = self.unknown_threshold(unknown)
        proba, scores, sources, skipped = self._probabilities(images, progress, tta)
        score_of = [None] * len(proba) if scores is None else [float(v) for v in scores]
        return Predictions(
            [
                Prediction.from_probabilities(p, row, self.classes, top_k, score, threshold)
                for p, row, score in zip(sources, proba, score_of)
            ],
            skipped,
        )

    def _probabilities(
        self, images: Sequence[ImageLike], progress: Progress | None, tta: bool = False
    ) -> tuple[NDArray[np.float32], NDArray[np.float32] | None, list[Path | None], list[Skipped]]:
        """Probabilities and unknown scores of the readable images in input order, each one's path (None in memory), and the skipped files."""
        if isinstance(images, str | os.PathLike | Image.Image | np.ndarray):
            raise ConfigError("Give a list of images, e.g. model.predict([image]).")
        items: list[Path | tuple[NDArray[np.float32], ...]] = []
        skipped: list[Skipped] = []
        for image in images:
            if isinstance(image, str | os.PathLike):
                found, missing = list_images([image])
                items += found
                skipped += missing
            else:
                items.append(self.inputs(_checked_image(image)))
        paths = [item for item in items if isinstance(item, Path)]
        arrays = [item for item in items if not isinstance(item, Path)]

        def features_in_order(flip: bool) -> tuple[NDArray[np.float32], list[Path | None], list[Skipped]]:
            """The features of the readable items in input order (mirrored with `flip`), their paths, the files skipped."""
            extraction = self.extract(paths, progress=progress, flip=flip)
            file_rows = dict(zip(extraction.kept.tolist(), extraction.features))
            batches = (_stacked(arrays[k : k + 32]) for k in range(0, len(arrays), 32))
            array_rows = iter([row for batch in batches for row in self.features([mirrored(x) for x in batch] if flip else batch)])
            rows: list[NDArray[np.float32]] = []
            sources: list[Path | None] = []
            n_files = 0
            for item in items:
                if not isinstance(item, Path):
                    rows.append(next(array_rows))
                    sources.append(None)
                    continue
                if n_files in file_rows:
                    rows.append(file_rows[n_files])
                    sources.append(item)
                n_files += 1
            features = np.stack(rows) if rows else np.zeros((0, sum(b.n_features for b in self.backbones)), np.float32)
            return features, sources, extraction.skipped

        features, sources, unreadable = features_in_order(flip=False)
        proba, scores = self.outputs(features)
        if tta and len(features):
            mirrored_features, mirrored_sources, _ = features_in_order(flip=True)
            if mirrored_sources != sources:  # a file changed between the two passes
                raise DataError("An image could not be read a second time for test-time augmentation; run again without --tta.")
            proba = (proba + self.outputs(mirrored_features)[0]) * np.float32(0.5)
        return proba, scores, sources, skipped + unreadable

    def evaluate(self, data: PathLike, progress: Progress | None = None, tta: bool = False) -> EvaluationResult:
        """Score the model on labelled images: all of `data`, or its val/ folder if it has train/ and val/ (`tta`: see `score`)."""
        dataset = load_dataset(data, val_split=0.0)
        records = dataset.val or dataset.train
        unknown = sorted({r.label for r in records} - set(self.classes))
        if unknown:
            raise DataError(
                f"{data}: class '{unknown[0]}' is not one this model knows ({', '.join(self.classes)}). Rename or remove that folder."
            )
        scores = self.score(records, progress, tta=tta, held_out_only=True)
        return EvaluationResult(scores.evaluation, dataset.skipped + scores.skipped)

    def score(
        self,
        records: Sequence[ImageRecord],
        progress: Progress | None = None,
        features: NDArray[np.float32] | None = None,
        tta: bool = False,
        held_out_only: bool = False,
    ) -> Scores:
        """Class probabilities and an evaluation for labelled images; labels must be among `classes`.

        `features`, the backbones' features of `records` when already at hand, spares running the backbones again.
        `tta` averages the probabilities with those of the images mirrored left to right. `held_out_only` leaves out,
        as skipped, the images the head was fitted on (known to its unknown detector), whose scores would flatter it.
        """
        kept, skipped = list(records), []
        if features is None:
            extraction = self.extract([r.path for r in records], progress=progress)
            kept, features, skipped = [records[i] for i in extraction.kept], extraction.features, extraction.skipped
        if held_out_only and self.detector is not None:
            seen = self.detector.seen(features)
            skipped += [Skipped(r.path, FITTED_REASON) for r, s in zip(kept, seen) if s]
            kept, features = [r for r, s in zip(kept, seen) if not s], features[~seen]
        y_true = np.asarray([self.classes.index(r.label) for r in kept], dtype=np.int64)
        proba, _ = self.outputs(features)
        if tta and kept:
            mirrored_run = self.extract([r.path for r in kept], progress=progress, flip=True)
            if len(mirrored_run.kept) != len(kept):
                raise DataError("An image could not be read a second time for test-time augmentation; run again without --tta.")
            proba = (proba + self.outputs(mirrored_run.features)[0]) * np.float32(0.5)
        return Scores(kept, y_true, proba, evaluate_probabilities(y_true, proba, self.classes), skipped)

    def save(self, directory: PathLike, force: bool = False) -> Path:
        """Write the model as a bundle folder (safetensors + JSON), switched in one step. Returns the folder.

        Fine-tuned backbone weights are saved in full, and a backbone made from a weights file keeps a copy of it; pretrained
        ones are saved only by name and hash.
        `directory` must be new, empty or a headstart model; `force` also allows a
        folder of other files, which are kept (the model's own files are replaced).

        Raises:
            BundleError: `directory` holds other files and `force` is off.
        """
        tensors = {f"head.{k}": v for k, v in self.head.weights.items()}
        if self.detector is not None:
            tensors.update({f"unknown.{k}": np.asarray(v) for k, v in self.detector.tensors.items()})
        tuned = [b for b in self.backbones if b.finetuned_from is not None]
        if tuned and len(self.backbones) > 1:
            raise ConfigError("An ensemble's backbones cannot be fine-tuned; train a single backbone to fine-tune it.")
        if tuned:
            tensors.update({f"backbone.{k}": v.detach().numpy() for k, v in tuned[0].module.state_dict().items()})
        from_file = [b for b in self.backbones if b.weights_file is not None and b.finetuned_from is None]
        if len(from_file) > 1:
            raise ConfigError("A model keeps one backbone weights file; make the other backbones from their names.")
        config = BundleConfig(
            backbones=tuple(
                BackboneRecord(
                    name=b.name,
                    weights_sha256=b.weights_sha256,
                    data_config=b.data_config,
                    n_features=b.n_features,
                    layer=b.layer,
                    weights_file=BACKBONE_WEIGHTS_NAME if b in from_file else None,
                    finetuned_from=b.finetuned_from,
                )
                for b in self.backbones
            ),
            head=self.head.params,
            classes=tuple(self.classes),
            summary=self.summary,
            headstart_version=__version__,
        )
        history = list(self.summary.history)
        columns = list(dict.fromkeys(key for row in history for key in row))
        extras = {
            HISTORY_NAME: json_bytes(history),
            HISTORY_CSV_NAME: csv_bytes(columns, [[row.get(c, "") for c in columns] for row in history]),
        }
        if from_file:
            extras[BACKBONE_WEIGHTS_NAME] = weights_file_bytes(Path(str(from_file[0].weights_file)))
        metrics = self.summary.validation.to_dict() if self.summary.validation else {}
        return save_bundle(Path(directory), config, tensors, metrics, extras, force)

    def __repr__(self) -> str:
        return f"Model(backbone={self.backbone_name!r}, head={self.head.kind!r}, classes={self.classes})"


def load(directory: PathLike, weights: PathLike | None = None, cache_root: PathLike | None = None) -> Model:
    """Load a saved model folder. Nothing in it is unpickled or executed.

    Args:
        directory: the folder written by `Model.save` or `headstart train --out`.
        weights: backbone weights file, for timm backbones trained from a file: needed only for models saved before
            format 7, which kept the file's path rather than a copy of it (a path outside the folder is never read).
        cache_root: the cache of backbone identities and ONNX engines (default: `default_cache_dir()`).

    Raises:
        BundleError: the folder is not a valid model, or the backbone weights differ from the recorded ones.
    """
    directory = Path(directory)
    root = Path(cache_root) if cache_root is not None else default_cache_dir()
    contents = read_bundle(directory)
    config, tensors = contents.config, contents.tensors
    records = config.backbones
    files = member_weights([r.name for r in records], weights) if weights is not None else backbone_weights_files(directory, config)
    backbones = []
    for recorded, file in zip(records, files, strict=True):
        if recorded.finetuned_from:  # one backbone only (`bundle.validate_config`)
            import torch

            state = {k.removeprefix("backbone."): torch.from_numpy(v) for k, v in tensors.items() if k.startswith("backbone.")}
            backbone = create_backbone(recorded.name, state=state, layer=recorded.layer)
            backbone = dataclasses.replace(backbone, finetuned_from=recorded.finetuned_from)
        else:
            backbone = create_backbone(recorded.name, file, recorded.layer, cache_root=root)
        if backbone.weights_sha256 != recorded.weights_sha256:
            raise BundleError(
                f"{directory}: backbone '{recorded.name}' weights differ from those the model was trained with "
                f"(sha256 {backbone.weights_sha256[:12]}… vs recorded {recorded.weights_sha256[:12]}…). "
                "Pass the original weights with --weights, or retrain."
            )
        if backbone.data_config != recorded.data_config:
            raise BundleError(f"{directory}: preprocessing in bundle.json differs from backbone '{recorded.name}'s. Retrain the model.")
        if recorded.n_features is not None and backbone.n_features != recorded.n_features:
            raise BundleError(
                f"{directory}: backbone '{recorded.name}' gives {backbone.n_features} features, bundle.json records {recorded.n_features}. "
                "The file is damaged or was edited; re-save or retrain the model."
            )
        backbones.append(backbone)
    head_state = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    try:
        head = Head.from_state(config.head, list(config.classes), head_state)
    except (ConfigError, TypeError) as e:
        raise BundleError(f"{directory}: {e}") from None
    n_features = sum(b.n_features for b in backbones)
    if head.n_features != n_features:
        raise BundleError(f"{directory}: head expects {head.n_features} features, the backbones give {n_features}.")
    return Model(tuple(backbones), head, config.summary, root, _detector(directory, config.summary, tensors, head))


def _detector(directory: Path, summary: TrainingSummary, tensors: dict[str, NDArray[np.float32]], head: Head) -> UnknownDetector | None:
    """The unknown detector a bundle records (None for older bundles), its tensors checked against the head's features and classes."""
    state = {k.removeprefix("unknown."): v for k, v in tensors.items() if k.startswith("unknown.")}
    record = summary.calibration
    if record is None or record.score is None:
        if state:
            raise BundleError(
                f"{directory}: model.safetensors holds unknown-detector tensors that bundle.json does not describe. Re-save or retrain the model."
            )
        return None
    try:
        return UnknownDetector.from_tensors(record.score, record.threshold, state, head.n_features, len(head.classes), record.k)
    except ConfigError as e:
        raise BundleError(f"{directory}: {e} The model folder is damaged or was edited; re-save or retrain it.") from None


def _stacked(inputs: Sequence[tuple[NDArray[np.float32], ...]]) -> list[NDArray[np.float32]]:
    """Per-image inputs (one array per backbone) as one batch per backbone."""
    return [np.stack([per_image[m] for per_image in inputs]) for m in range(len(inputs[0]))]


def _checked_image(image: Any) -> Image.Image:
    """A PIL image or uint8 RGB pixels (height, width, 3) as an RGB image, held to the limits image files are.

    Raises:
        ConfigError: neither, or too small, too large or too elongated.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ConfigError(f"Expected RGB pixels as uint8 of shape (height, width, 3), got {image.dtype} of shape {image.shape}.")
        size = (image.shape[1], image.shape[0])
    elif isinstance(image, Image.Image):
        size = image.size
    else:
        raise ConfigError(f"Expected an image file or folder, a PIL image or RGB pixels, got {type(image).__name__}.")
    width, height = size
    if size_problem(width, height):
        raise ConfigError(
            f"An image of {width}x{height} pixels: images must be at least {MIN_SIDE} pixels on a side, "
            f"at most {MAX_PIXELS:,} pixels and at most {MAX_ASPECT_RATIO}:1."
        )
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    return pil.convert("RGB")
