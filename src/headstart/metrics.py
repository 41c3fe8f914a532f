"""Classification metrics: a confusion matrix and what follows from it, in plain Python (no NumPy needed to read one)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray


@dataclass(frozen=True)
class Evaluation:
    """Accuracy, log loss and per-class scores derived from a confusion matrix.

    Attributes:
        classes: class names, the row and column order of `confusion`.
        confusion: counts, one row per true class, one column per predicted class.
        log_loss: mean negative log-probability of the true class.
    """

    classes: list[str]
    confusion: tuple[tuple[int, ...], ...]
    log_loss: float

    @property
    def n_images(self) -> int:
        return sum(self.support)

    @property
    def accuracy(self) -> float:
        return sum(self.confusion[i][i] for i in range(len(self.classes))) / max(self.n_images, 1)

    @property
    def support(self) -> list[int]:
        """Images per true class."""
        return [sum(row) for row in self.confusion]

    @property
    def recall(self) -> list[float]:
        """Per class: correct / true count (the per-class accuracy)."""
        return [_ratio(self.confusion[i][i], n) for i, n in enumerate(self.support)]

    @property
    def precision(self) -> list[float]:
        predicted = [sum(column) for column in zip(*self.confusion)] or [0] * len(self.classes)
        return [_ratio(self.confusion[i][i], n) for i, n in enumerate(predicted)]

    @property
    def f1(self) -> list[float]:
        return [_ratio(2 * p * r, p + r) for p, r in zip(self.precision, self.recall)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_images": self.n_images,
            "accuracy": self.accuracy,
            "log_loss": self.log_loss,
            "classes": self.classes,
            "per_class": {
                name: {"precision": p, "recall": r, "f1": f, "support": s}
                for name, p, r, f, s in zip(self.classes, self.precision, self.recall, self.f1, self.support)
            },
            "confusion": [list(row) for row in self.confusion],
        }


def evaluate_probabilities(y_true: NDArray[np.int64], proba: NDArray[np.float32], classes: list[str]) -> Evaluation:
    """Score predicted probabilities (n_images, n_classes) against true class indices (n_images,)."""
    import numpy as np

    n = len(classes)
    y_pred = proba.argmax(1) if len(proba) else np.zeros(0, np.int64)
    confusion = np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)
    p_true = proba[np.arange(len(y_true)), y_true] if len(y_true) else np.ones(1)
    log_loss = float(-np.log(np.clip(p_true, 1e-12, 1.0)).mean())
    return Evaluation(list(classes), tuple(tuple(int(c) for c in row) for row in confusion), log_loss)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(a / b) else 0.0
