"""What training did, as one frozen record: kept in `bundle.json`, shown by the CLI, `info` and the report.

`from_dict` is the one place a summary read from disk is validated: every field's
type and range, so what renders it never meets a surprise. The photos it records
(`val_images`, `test_images`), which `report` and `export` read again, must name
image files (`data.IMAGE_EXTENSIONS`), outside /proc, /sys and /dev: a tampered
`bundle.json` cannot make headstart open a special file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headstart.config import is_finite_number, is_int
from headstart.data import IMAGE_EXTENSIONS, ImageRecord, Skipped
from headstart.metrics import Evaluation
from headstart.triage import PROBLEMS, Finding


@dataclass(frozen=True)
class AutoChoice:
    """What `--strategy auto` chose, why, and the measurements behind it."""

    chose: str
    reason: str
    measurements: dict[str, float]


@dataclass(frozen=True)
class FinetuneRecord:
    """The fine-tuning phase: its settings (`FinetuneConfig.to_dict()`), the epoch kept (0: none beat the frozen backbone),
    and the validation and test scores of the frozen-backbone head it started from."""

    config: dict[str, Any]
    best_epoch: int
    frozen_validation: Evaluation | None
    frozen_test: Evaluation | None = None
    frozen_test_tta: Evaluation | None = None


@dataclass(frozen=True)
class CalibrationRecord:
    """Temperature scaling and the unknown detector, as training fitted and measured them on held-out images.

    Attributes:
        temperature: the model's probabilities are softmax(logits / temperature).
        ece_before, ece_after: the held-out expected calibration error (15 bins) at temperature 1 and at `temperature`.
        n_heldout: the held-out images they were measured on.
        score: the unknown score's kind (see `headstart.unknown`), or None without a detector.
        threshold: scores above it are called unknown.
        heldout_unknown_rate: the share of held-out images past `threshold`.
        k: for the "knn" score, the neighbour whose similarity counts.
    """

    temperature: float
    ece_before: float
    ece_after: float
    n_heldout: int
    score: str | None = None
    threshold: float | None = None
    heldout_unknown_rate: float | None = None
    k: int = 10

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> CalibrationRecord:
        """The inverse of `to_dict`, every field checked.

        Raises:
            ValueError: names the field of the wrong type or out of range.
        """
        need(isinstance(d, dict), "calibration", "an object")
        temperature = _number(d.get("temperature"), "calibration.temperature")
        need(0.01 <= temperature <= 100, "calibration.temperature", "a number from 0.01 to 100")
        ece = [_number(d.get(name, 0.0), f"calibration.{name}") for name in ("ece_before", "ece_after")]
        need(all(0 <= e <= 1 for e in ece), "calibration.ece_before", "numbers from 0 to 1")
        score, threshold, rate = d.get("score"), d.get("threshold"), d.get("heldout_unknown_rate")
        need(score is None or isinstance(score, str), "calibration.score", "a string or null")
        need(threshold is None or is_finite_number(threshold), "calibration.threshold", "a finite number or null")
        need(score is None or threshold is not None, "calibration.threshold", "a finite number with a score")
        need(rate is None or (is_finite_number(rate) and 0 <= rate <= 1), "calibration.heldout_unknown_rate", "a number from 0 to 1")
        k = d.get("k", 10)
        need(is_int(k, 1, 100_000), "calibration.k", "an integer from 1 to 100000")
        return cls(
            temperature,
            ece[0],
            ece[1],
            _count(d.get("n_heldout", 0), "calibration.n_heldout"),
            score,
            None if threshold is None else float(threshold),
            None if rate is None else float(rate),
            int(k),
        )


@dataclass(frozen=True)
class TrainingSummary:
    """What `train` did and how the model scored.

    Attributes:
        data: the data source given.
        backbone, layer, weights_file: the backbone by name, the stage pooled (None: final features), its weights file.
        strategy, head: the strategy asked for and the head trained.
        val_split, seed: the split and seed used.
        classes: class names, in the model's output order.
        n_train, n_val: images per class in each split.
        skipped: files left out, with the reason.
        warnings: dataset problems that did not stop training (duplicates, leakage, imbalance, ...).
        val_images: the validation images, so the report can be rebuilt.
        n_extracted, n_cached: images run through the backbone, and read from the feature cache.
        history: one row per epoch of every phase ("phase", "epoch", "loss", "accuracy", "val_loss", ...).
        best_epoch: the head's epoch kept.
        validation: held-out scores: out-of-fold predictions of the cross-validation after a refit,
            else the validation split's (which early stopping and fine-tuning chose on); None without either.
        scored_on: where `validation` comes from: "5-fold cross-validation" or "validation split".
        refit: whether the head was refitted on all labelled images after cross-validation.
        test_split, n_test, test_images: the test split held out first and used for nothing but `test`.
        test: the final model's scores on the test split (None without one).
        test_tta: the same with test-time augmentation (`train(tta=True)`: each image and its mirror image).
        auto: what `--strategy auto` chose.
        finetune: the fine-tuning phase, when there was one.
        calibration: the temperature and unknown detector fitted on held-out images (None: neither, as in older models).
        seconds: wall time of training.
    """

    data: str
    backbone: str
    strategy: str
    head: str
    classes: tuple[str, ...]
    layer: int | None = None
    weights_file: str | None = None
    val_split: float = 0.2
    seed: int = 0
    n_train: dict[str, int] = field(default_factory=dict)
    n_val: dict[str, int] = field(default_factory=dict)
    skipped: tuple[Skipped, ...] = ()
    warnings: tuple[Finding, ...] = ()
    val_images: tuple[ImageRecord, ...] = ()
    n_extracted: int = 0
    n_cached: int = 0
    history: tuple[dict[str, Any], ...] = ()
    best_epoch: int = 0
    validation: Evaluation | None = None
    scored_on: str = "validation split"
    refit: bool = False
    test_split: float = 0.0
    n_test: dict[str, int] = field(default_factory=dict)
    test_images: tuple[ImageRecord, ...] = ()
    test: Evaluation | None = None
    test_tta: Evaluation | None = None
    auto: AutoChoice | None = None
    finetune: FinetuneRecord | None = None
    seconds: float = 0.0
    calibration: CalibrationRecord | None = None

    def replace(self, **changes: Any) -> TrainingSummary:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without `history` (saved in its own file)."""
        return {
            "data": self.data,
            "backbone": self.backbone,
            "layer": self.layer,
            "strategy": self.strategy,
            "head": self.head,
            "weights_file": self.weights_file,
            "val_split": self.val_split,
            "seed": self.seed,
            "classes": list(self.classes),
            "n_train": self.n_train,
            "n_val": self.n_val,
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
            "warnings": [{"path": str(f.path), "problem": f.problem, "detail": f.detail, "fix": f.fix} for f in self.warnings],
            "val_images": [[str(r.path), r.label] for r in self.val_images],
            "n_extracted": self.n_extracted,
            "n_cached": self.n_cached,
            "best_epoch": self.best_epoch,
            "validation": self.validation.to_dict() if self.validation else None,
            "scored_on": self.scored_on,
            "refit": self.refit,
            "test_split": self.test_split,
            "n_test": self.n_test,
            "test_images": [[str(r.path), r.label] for r in self.test_images],
            "test": self.test.to_dict() if self.test else None,
            "test_tta": self.test_tta.to_dict() if self.test_tta else None,
            "auto": {"chose": self.auto.chose, "reason": self.auto.reason, **self.auto.measurements} if self.auto else None,
            "finetune": (
                {
                    "config": self.finetune.config,
                    "best_epoch": self.finetune.best_epoch,
                    "frozen_validation": self.finetune.frozen_validation.to_dict() if self.finetune.frozen_validation else None,
                    "frozen_test": self.finetune.frozen_test.to_dict() if self.finetune.frozen_test else None,
                    "frozen_test_tta": self.finetune.frozen_test_tta.to_dict() if self.finetune.frozen_test_tta else None,
                }
                if self.finetune
                else None
            ),
            "seconds": self.seconds,
            "calibration": self.calibration.to_dict() if self.calibration else None,
        }

    def with_history(self, rows: Any) -> TrainingSummary:
        """This summary with `history` from rows read from disk.

        Raises:
            ValueError: not a list of objects holding numbers (and a phase name).
        """
        return self.replace(history=tuple(_history_row(row) for row in _list(rows, "history")))

    @classmethod
    def from_dict(cls, d: Any) -> TrainingSummary:
        """The inverse of `to_dict`; fields missing (as in older model folders) take their defaults.

        Raises:
            ValueError: a field of the wrong type or out of range; the message names it.
        """
        need(isinstance(d, dict), "(summary)", "an object")
        get = d.get
        auto, tune = get("auto"), get("finetune")
        need(
            auto is None or (isinstance(auto, dict) and isinstance(auto.get("chose"), str) and isinstance(auto.get("reason"), str)),
            "auto",
            "an object with chose and reason",
        )
        need(tune is None or (isinstance(tune, dict) and isinstance(tune.get("config"), dict)), "finetune", "an object with a config")
        return cls(
            data=_string(get("data", ""), "data"),
            backbone=_string(get("backbone", ""), "backbone"),
            strategy=_string(get("strategy", "linear"), "strategy"),
            head=_string(get("head", "linear"), "head"),
            classes=tuple(_strings(get("classes", []), "classes")),
            layer=_optional(get("layer"), is_int(get("layer"), -64, 64), "layer", "an integer from -64 to 64"),
            weights_file=_optional(get("weights_file"), isinstance(get("weights_file"), str), "weights_file", "a string"),
            val_split=_number(get("val_split", 0.2), "val_split"),
            seed=_count(get("seed", 0), "seed"),
            n_train=_counts(get("n_train", {}), "n_train"),
            n_val=_counts(get("n_val", {}), "n_val"),
            skipped=tuple(Skipped(Path(p), r) for p, r in _pairs(get("skipped", []), ("path", "reason"), "skipped")),
            warnings=tuple(_finding(w) for w in _list(get("warnings", []), "warnings")),
            val_images=_photos(get("val_images", []), "val_images"),
            n_extracted=_count(get("n_extracted", 0), "n_extracted"),
            n_cached=_count(get("n_cached", 0), "n_cached"),
            best_epoch=_count(get("best_epoch", 0), "best_epoch"),
            validation=_evaluation(get("validation"), "validation"),
            scored_on=_string(get("scored_on", "validation split"), "scored_on"),
            refit=_flag(get("refit", False), "refit"),
            test_split=_number(get("test_split", 0.0), "test_split"),
            n_test=_counts(get("n_test", {}), "n_test"),
            test_images=_photos(get("test_images", []), "test_images"),
            test=_evaluation(get("test"), "test"),
            test_tta=_evaluation(get("test_tta"), "test_tta"),
            auto=AutoChoice(
                auto["chose"], auto["reason"], {k: _number(v, f"auto.{k}") for k, v in auto.items() if k not in ("chose", "reason")}
            )
            if auto
            else None,
            finetune=FinetuneRecord(
                tune["config"],
                _count(tune.get("best_epoch", 0), "finetune.best_epoch"),
                _evaluation(tune.get("frozen_validation"), "finetune"),
                _evaluation(tune.get("frozen_test"), "finetune.frozen_test"),
                _evaluation(tune.get("frozen_test_tta"), "finetune.frozen_test_tta"),
            )
            if tune
            else None,
            seconds=_number(get("seconds", 0.0), "seconds"),
            calibration=CalibrationRecord.from_dict(get("calibration")) if get("calibration") is not None else None,
        )


def need(ok: bool, name: str, expected: str) -> None:
    """Raise ValueError naming the field unless `ok`."""
    if not ok:
        raise ValueError(f"field '{name}' must be {expected}")


def _string(value: Any, name: str) -> str:
    need(isinstance(value, str), name, "a string")
    return str(value)


def _strings(value: Any, name: str) -> list[str]:
    need(isinstance(value, list) and all(isinstance(v, str) for v in value), name, "a list of strings")
    return list(value)


def _list(value: Any, name: str) -> list[Any]:
    need(isinstance(value, list), name, "a list")
    return list(value)


def _optional(value: Any, ok: bool, name: str, expected: str) -> Any:
    need(value is None or ok, name, f"{expected}, or null")
    return value


def _flag(value: Any, name: str) -> bool:
    need(isinstance(value, bool), name, "true or false")
    return bool(value)


def _number(value: Any, name: str) -> float:
    need(is_finite_number(value), name, "a number")
    return float(value)


def _count(value: Any, name: str) -> int:
    need(is_int(value), name, "a non-negative integer")
    return int(value)


def _counts(value: Any, name: str) -> dict[str, int]:
    need(isinstance(value, dict) and all(is_int(n) for n in value.values()), name, "an object of counts")
    return {str(k): int(v) for k, v in value.items()}


def _pairs(value: Any, keys: tuple[str, str] | None, name: str) -> list[tuple[str, str]]:
    """[[a, b], ...] (keys None) or [{keys[0]: a, keys[1]: b}, ...], all strings."""
    rows = _list(value, name)
    pairs = [
        (row.get(keys[0]), row.get(keys[1])) if keys and isinstance(row, dict) else tuple(row) if isinstance(row, list) else ()
        for row in rows
    ]
    need(all(len(p) == 2 and all(isinstance(v, str) for v in p) for p in pairs), name, "a list of string pairs")
    return [(str(a), str(b)) for a, b in pairs]


def _photos(value: Any, name: str) -> tuple[ImageRecord, ...]:
    """[[path, label], ...], each path an image file's (by its extension) outside /proc, /sys and /dev."""
    pairs = _pairs(value, None, name)
    need(all(_is_photo_path(p) for p, _ in pairs), name, "a list of [photo path, label] pairs (image files, outside /proc, /sys and /dev)")
    return tuple(ImageRecord(Path(p), label) for p, label in pairs)


def _is_photo_path(path: str) -> bool:
    normal = os.path.abspath(path)  # ".." resolved; a leading "//" is stripped below
    top = normal.lstrip(os.sep).split(os.sep, 1)[0]
    return "\0" not in path and Path(normal).suffix.lower() in IMAGE_EXTENSIONS and top not in ("proc", "sys", "dev")


def _history_row(row: Any) -> dict[str, Any]:
    """One epoch: numbers, and the phase's name."""
    ok = isinstance(row, dict) and all(isinstance(v, str) if k == "phase" else is_finite_number(v) for k, v in row.items())
    need(ok, "history", "a list of objects of numbers (and a phase name)")
    return dict(row)


def _finding(value: Any) -> Finding:
    ok = isinstance(value, dict) and all(isinstance(value.get(k), str) for k in ("path", "problem", "detail"))
    need(ok and value["problem"] in PROBLEMS, "warnings", "a list of {path, problem, detail} with known problems")
    return Finding(Path(value["path"]), value["problem"], value["detail"])


def _evaluation(value: Any, name: str) -> Evaluation | None:
    if value is None:
        return None
    need(isinstance(value, dict), name, "an object")
    classes, confusion = value.get("classes"), value.get("confusion")
    n = len(classes) if isinstance(classes, list) else -1
    square = (
        isinstance(confusion, list)
        and len(confusion) == n
        and all(isinstance(r, list) and len(r) == n and all(is_int(c) for c in r) for r in confusion)
    )
    need(
        n >= 0 and all(isinstance(c, str) for c in classes) and square, f"{name}.confusion", "a square matrix of counts, one row per class"
    )
    return Evaluation(
        list(classes), tuple(tuple(int(c) for c in row) for row in confusion), _number(value.get("log_loss", 0.0), f"{name}.log_loss")
    )
