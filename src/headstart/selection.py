"""Choosing a frozen head's settings by stratified k-fold cross-validation on cached features.

The folds also give every image an out-of-fold prediction, from a head that never saw
it: the score reported for a head refitted on all images, and the held-out predictions
that calibration, the unknown threshold and suspect labels are worked out from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import clone

from headstart.calibration import negative_log_likelihood, softmax
from headstart.classifier import HeadClassifier
from headstart.config import Progress
from headstart.errors import ConfigError

N_FOLDS = 5
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
"""The linear head's inverse regularisation strengths tried, as scikit-learn's `C`, on standardised features."""


@dataclass(frozen=True)
class CrossValidation:
    """Out-of-fold predictions of a head at the settings chosen by cross-validation.

    Attributes:
        params: the chosen `HeadClassifier` settings (`C` for the L-BFGS linear head;
            for an early-stopped head, `max_epochs` as the folds' median best epoch).
        classes: the class labels, sorted; column order of `logits`.
        y: each row's class index, int64 of shape (n_samples,).
        logits: out-of-fold logits at `params`, float32 of shape (n_samples, n_classes).
        folds: the fold each row was held out in, int64 of shape (n_samples,).
        grid: each `C` tried and its mean out-of-fold log loss (empty for an early-stopped head).
    """

    params: dict[str, Any]
    classes: NDArray[Any]
    y: NDArray[np.int64]
    logits: NDArray[np.float32]
    folds: NDArray[np.int64]
    grid: dict[float, float] = field(default_factory=dict)

    @property
    def n_folds(self) -> int:
        return int(self.folds.max()) + 1

    @property
    def proba(self) -> NDArray[np.float32]:
        """Out-of-fold class probabilities, shape (n_samples, n_classes)."""
        return softmax(self.logits)

    @property
    def log_loss(self) -> float:
        """Mean out-of-fold negative log-likelihood of the true class."""
        return negative_log_likelihood(self.logits, self.y)

    @property
    def fold_accuracy(self) -> list[float]:
        """Accuracy on each fold's held-out rows."""
        hits = self.logits.argmax(1) == self.y
        return [float(hits[self.folds == k].mean()) for k in range(self.n_folds)]


def cross_validate(
    template: HeadClassifier,
    X: ArrayLike,
    y: ArrayLike,
    n_folds: int = N_FOLDS,
    seed: int = 0,
    progress: Progress | None = None,
    grid: tuple[float, ...] = C_GRID,
) -> CrossValidation:
    """Cross-validate `template` on features X (n_samples, n_features) and labels y (n_samples,).

    An L-BFGS linear head has its `C` chosen from `grid` (default `C_GRID`) by the lowest mean
    out-of-fold log loss. Any other head is early-stopped within each fold (on its
    `validation_fraction` of the fold's training rows), and the median best epoch
    becomes the `max_epochs` of a refit on all rows. The folds are stratified and
    seeded; a class with fewer rows than `n_folds` lowers the number of folds.

    Raises:
        ConfigError: fewer than two classes, a class with a single row, or n_folds below 2.
    """
    from sklearn.model_selection import StratifiedKFold

    features = np.asarray(X, dtype=np.float32)
    classes, targets = np.unique(np.asarray(y), return_inverse=True)
    counts = np.bincount(targets)
    if n_folds < 2 or len(classes) < 2 or counts.min() < 2:
        raise ConfigError(
            f"Cross-validation needs at least 2 folds, 2 classes and 2 images per class; got {n_folds} folds and "
            f"{dict(zip(classes.tolist(), counts.tolist()))}. Add images, or pass --no-refit to score on the validation split."
        )
    splitter = StratifiedKFold(min(n_folds, int(counts.min())), shuffle=True, random_state=seed)
    folds = np.zeros(len(targets), dtype=np.int64)
    for k, (_, held_out) in enumerate(splitter.split(features, targets)):
        folds[held_out] = k
    tried: tuple[float | None, ...] = grid if template.uses_lbfgs() else (None,)
    logits = np.zeros((len(tried), len(targets), len(classes)), dtype=np.float32)
    best_epochs: list[int] = []
    n_fits = len(tried) * (int(folds.max()) + 1)
    for k in range(int(folds.max()) + 1):
        fit_rows, held_out = folds != k, folds == k
        for g, C in enumerate(tried):
            head = clone(template).set_params(**({"C": C} if C is not None else {})).fit(features[fit_rows], classes[targets[fit_rows]])
            logits[g][held_out] = head.head_.logits(features[held_out])
            best_epochs.append(head.best_epoch_)
            if progress:
                progress("Cross-validating the head", k * len(tried) + g + 1, n_fits)
    if tried == (None,):
        chosen = {"max_epochs": max(1, int(np.median(best_epochs))), "validation_fraction": 0.0}
        return CrossValidation(chosen, classes, targets.astype(np.int64), logits[0], folds)
    losses = [negative_log_likelihood(g_logits, targets) for g_logits in logits]
    best = int(np.argmin(losses))
    grid_losses = {C: loss for C, loss in zip(grid, losses, strict=True)}
    return CrossValidation({"C": grid[best]}, classes, targets.astype(np.int64), logits[best], folds, grid_losses)


def refit(template: HeadClassifier, cv: CrossValidation, X: ArrayLike, y: ArrayLike) -> HeadClassifier:
    """`template` with the settings `cv` chose, fitted on all of X, y."""
    fitted: HeadClassifier = clone(template).set_params(**cv.params).fit(X, y)
    return fitted
