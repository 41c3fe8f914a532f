"""Classification metrics as pure functions of labels and probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Evaluation:
    """Accuracy, log loss and per-class scores derived from a confusion matrix.

    Attributes:
        classes: class names, the row and column order of `confusion`.
        confusion: int64 array of shape (n_classes, n_classes); rows are true classes, columns predictions.
        log_loss: mean negative log-probability of the true class.
    """

    classes: list[str]
    confusion: NDArray[np.int64]
    log_loss: float

    @property
    def n_images(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(self.n_images, 1))

    @property
    def support(self) -> NDArray[np.int64]:
        return self.confusion.sum(1)  # type: ignore[no-any-return]

    @property
    def recall(self) -> NDArray[np.float64]:
        """Per class: correct / true count (the per-class accuracy)."""
        return _safe_divide(np.diag(self.confusion), self.confusion.sum(1))

    @property
    def precision(self) -> NDArray[np.float64]:
        return _safe_divide(np.diag(self.confusion), self.confusion.sum(0))

    @property
    def f1(self) -> NDArray[np.float64]:
        p, r = self.precision, self.recall
        return _safe_divide(2 * p * r, p + r)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_images": self.n_images,
            "accuracy": self.accuracy,
            "log_loss": self.log_loss,
            "classes": self.classes,
            "per_class": {
                name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for name, p, r, f, s in zip(self.classes, self.precision, self.recall, self.f1, self.support)
            },
            "confusion": self.confusion.tolist(),
        }


def evaluate_probabilities(y_true: NDArray[np.int64], proba: NDArray[np.float32], classes: list[str]) -> Evaluation:
    """Score predicted probabilities (n_images, n_classes) against true class indices (n_images,)."""
    n = len(classes)
    y_pred = proba.argmax(1) if len(proba) else np.zeros(0, np.int64)
    confusion = np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n).astype(np.int64)
    p_true = proba[np.arange(len(y_true)), y_true] if len(y_true) else np.ones(1)
    return Evaluation(list(classes), confusion, float(-np.log(np.clip(p_true, 1e-12, 1.0)).mean()))


def _safe_divide(a: NDArray[Any], b: NDArray[Any]) -> NDArray[np.float64]:
    out = np.zeros(len(a), dtype=np.float64)
    np.divide(a, b, out=out, where=b > 0)
    return out
