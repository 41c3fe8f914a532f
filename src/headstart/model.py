"""Model: a backbone and a fitted head, ready to predict, evaluate and save."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from headstart import __version__
from headstart.backbones import Backbone, create_backbone
from headstart.bundle import HISTORY_CSV_NAME, HISTORY_NAME, read_bundle, save_bundle
from headstart.classifier import HeadClassifier
from headstart.config import DataConfig, Progress
from headstart.data import ImageRecord, Skipped, load_dataset
from headstart.engine import Engine, create_engine
from headstart.errors import BundleError, ConfigError, DataError, UnreadableImageError
from headstart.features import Extraction, extract_features
from headstart.files import csv_bytes, json_bytes
from headstart.heads import standardizer
from headstart.metrics import Evaluation, evaluate_probabilities

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Prediction:
    """The top classes for one image, most probable first."""

    path: Path
    top_k: list[tuple[str, float]]

    @classmethod
    def from_probabilities(cls, path: Path, proba: NDArray[np.float32], names: Sequence[str], top_k: int) -> Prediction:
        """The `top_k` most probable of `names` given one row of class probabilities."""
        return cls(path, [(names[j], float(proba[j])) for j in np.argsort(-proba, kind="stable")[:top_k]])

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
    """A trained image classifier: a pretrained backbone and a fitted head.

    Attributes:
        backbone: the feature extractor.
        head: the fitted `HeadClassifier`.
        classes: the class names, in the order of `predict_proba`'s columns.
        summary: what training did (data counts, skipped files, validation metrics, history).
    """

    def __init__(self, backbone: Backbone, head: HeadClassifier, summary: dict[str, Any] | None = None) -> None:
        self.backbone = backbone
        self.head = head
        self.classes: list[str] = [str(c) for c in head.classes_]
        self.summary: dict[str, Any] = summary or {}

    @cached_property
    def engine(self) -> Engine:
        """What runs the backbone for predictions: ONNX Runtime when the backbone exports, else PyTorch."""
        return create_engine(self.backbone)

    def predict_proba(self, images: Sequence[PathLike], progress: Progress | None = None) -> NDArray[np.float32]:
        """Class probabilities, shape (len(images), n_classes).

        Raises:
            UnreadableImageError: an image could not be decoded.
        """
        return self.head.predict_proba(self._extract([Path(p) for p in images], False, progress).features)

    def predict(self, images: Sequence[PathLike], top_k: int = 3, progress: Progress | None = None) -> list[Prediction]:
        """The `top_k` classes of each image, most probable first.

        Raises:
            UnreadableImageError: an image could not be decoded.
        """
        return self._predict([Path(p) for p in images], top_k, False, progress).predictions

    def predict_files(self, paths: Sequence[Path], top_k: int = 3, progress: Progress | None = None) -> Predictions:
        """Like `predict`, but unreadable files are skipped and listed instead of raising."""
        return self._predict(paths, top_k, True, progress)

    def _predict(self, paths: Sequence[Path], top_k: int, skip_unreadable: bool, progress: Progress | None) -> Predictions:
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}.")
        extraction = self._extract(paths, skip_unreadable, progress)
        proba = self.head.predict_proba(extraction.features)
        predictions = [Prediction.from_probabilities(paths[i], row, self.classes, top_k) for i, row in zip(extraction.kept, proba)]
        return Predictions(predictions, extraction.skipped)

    def _extract(self, paths: Sequence[Path], skip_unreadable: bool, progress: Progress | None) -> Extraction:
        extraction = extract_features(self.engine, paths, progress=progress)
        if extraction.skipped and not skip_unreadable:
            raise UnreadableImageError(extraction.skipped[0].path, extraction.skipped[0].reason)
        return extraction

    def evaluate(self, data: PathLike, progress: Progress | None = None) -> EvaluationResult:
        """Score the model on labelled images: all of `data`, or its val/ folder if it has train/ and val/."""
        dataset = load_dataset(data, val_split=0.0)
        records = dataset.val or dataset.train
        unknown = sorted({r.label for r in records} - set(self.classes))
        if unknown:
            raise DataError(
                f"{data}: class '{unknown[0]}' is not one this model knows ({', '.join(self.classes)}). Rename or remove that folder."
            )
        scores = self.score(records, progress)
        return EvaluationResult(scores.evaluation, dataset.skipped + scores.skipped)

    def score(
        self, records: Sequence[ImageRecord], progress: Progress | None = None, features: NDArray[np.float32] | None = None
    ) -> Scores:
        """Class probabilities and an evaluation for labelled images; labels must be among `classes`.

        `features`, the backbone's features of `records` when already at hand, spares running the backbone again.
        """
        kept, skipped = list(records), []
        if features is None:
            extraction = extract_features(self.engine, [r.path for r in records], progress=progress)
            kept, features, skipped = [records[i] for i in extraction.kept], extraction.features, extraction.skipped
        y_true = np.asarray([self.classes.index(r.label) for r in kept], dtype=np.int64)
        proba = self.head.predict_proba(features)
        return Scores(kept, y_true, proba, evaluate_probabilities(y_true, proba, self.classes), skipped)

    def save(self, directory: PathLike, force: bool = False) -> Path:
        """Write the model as a bundle folder (safetensors + JSON), switched in one step. Returns the folder.

        Fine-tuned backbone weights are saved in full; pretrained ones only by name and hash.
        `directory` must be new, empty or a headstart model; `force` also allows a
        folder of other files, which are kept (the model's own files are replaced).

        Raises:
            BundleError: `directory` holds other files and `force` is off.
        """
        tensors = {f"head.{k}": v for k, v in self.head.head_.state_dict().items()}
        if self.backbone.finetuned_from is not None:
            tensors.update({f"backbone.{k}": v for k, v in self.backbone.module.state_dict().items()})
        config = {
            "headstart_version": __version__,
            "backbone": {
                "name": self.backbone.name,
                "weights_sha256": self.backbone.weights_sha256,
                "weights_file": self.summary.get("weights_file"),
                "n_features": self.backbone.n_features,
                "layer": self.backbone.layer,
                "finetuned_from": self.backbone.finetuned_from,
            },
            "data_config": self.backbone.data_config.to_dict(),
            "head": self.head.get_params(),
            "classes": self.classes,
            "summary": {k: v for k, v in self.summary.items() if k != "history"},
        }
        history = self.summary.get("history", [])
        columns = list(dict.fromkeys(key for row in history for key in row))
        extras = {
            HISTORY_NAME: json_bytes(history),
            HISTORY_CSV_NAME: csv_bytes(columns, [[row.get(c, "") for c in columns] for row in history]),
        }
        return save_bundle(Path(directory), config, tensors, self.summary.get("validation", {}), extras, force)

    def __repr__(self) -> str:
        return f"Model(backbone={self.backbone.name!r}, head={self.head.head!r}, classes={self.classes})"


def load(directory: PathLike, weights: PathLike | None = None) -> Model:
    """Load a saved model folder. Nothing in it is unpickled or executed.

    Args:
        directory: the folder written by `Model.save` or `headstart train --out`.
        weights: backbone weights file, for timm backbones trained from a file.

    Raises:
        BundleError: the folder is not a valid model, or the backbone weights differ from the recorded ones.
    """
    directory = Path(directory)
    contents = read_bundle(directory)
    config, tensors = contents.config, contents.tensors
    recorded = config["backbone"]
    if recorded.get("finetuned_from"):
        state = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
        backbone = create_backbone(recorded["name"], state=state, layer=recorded.get("layer"))
        backbone = dataclasses.replace(backbone, finetuned_from=recorded["finetuned_from"])
    else:
        weights_file = weights if weights is not None else recorded.get("weights_file")
        backbone = create_backbone(recorded["name"], weights_file, layer=recorded.get("layer"))
    if backbone.weights_sha256 != recorded["weights_sha256"]:
        raise BundleError(
            f"{directory}: backbone '{recorded['name']}' weights differ from those the model was trained with "
            f"(sha256 {backbone.weights_sha256[:12]}… vs recorded {recorded['weights_sha256'][:12]}…). "
            "Pass the original weights with --weights, or retrain."
        )
    if backbone.data_config != DataConfig.from_dict(config["data_config"]):
        raise BundleError(f"{directory}: preprocessing in bundle.json differs from backbone '{recorded['name']}'s. Retrain the model.")
    head_state = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    try:
        head = HeadClassifier.from_state(config["head"], config["classes"], head_state)
    except (ConfigError, TypeError) as e:
        raise BundleError(f"{directory}: {e}") from None
    n_features = standardizer(head.head_).n_features
    if n_features != backbone.n_features:
        raise BundleError(f"{directory}: head expects {n_features} features, backbone gives {backbone.n_features}.")
    return Model(backbone, head, {**config.get("summary", {}), "history": contents.history})
