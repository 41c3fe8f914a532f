"""Calibration: temperature scaling fitted on held-out logits, and how well confidences match accuracy (ECE, reliability bins).

Pure functions of arrays, in NumPy: they work on a validation split's logits as on out-of-fold ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from headstart.errors import ConfigError

N_BINS = 15
"""Equal-width confidence bins of the expected calibration error."""
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def softmax(logits: ArrayLike, temperature: float = 1.0) -> NDArray[np.float32]:
    """softmax(logits / temperature), float32 of shape (n_samples, n_classes)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(1, keepdims=True)
    return z.astype(np.float32)


def negative_log_likelihood(logits: ArrayLike, y: ArrayLike, temperature: float = 1.0) -> float:
    """Mean -log softmax(logits / temperature)[y] over the rows."""
    z, labels = _checked(logits, y)
    z = z / temperature
    log_norm = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    return float((log_norm - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: ArrayLike, y: ArrayLike) -> float:
    """The temperature T in [0.01, 100] minimising the NLL of softmax(logits / T) on held-out logits and labels.

    The NLL is convex in 1/T, so a golden-section search on log T finds the minimum.

    Args:
        logits: held-out logits, shape (n_samples, n_classes).
        y: their true class indices, shape (n_samples,).

    Raises:
        ConfigError: the arrays do not fit together or are not finite.
    """
    z, labels = _checked(logits, y)
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return negative_log_likelihood(z, labels, math.exp(log_t))

    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > 1e-5:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(math.exp((lo + hi) / 2))


@dataclass(frozen=True)
class ReliabilityBins:
    """Confidence against accuracy in equal-width bins of the top-class probability.

    Attributes:
        edges: the bin edges, n_bins + 1 values from 0 to 1.
        counts: rows whose confidence falls in each bin.
        confidence: mean confidence per bin (0 for an empty bin).
        accuracy: share of rows whose top class is the true one, per bin (0 for an empty bin).
    """

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    confidence: tuple[float, ...]
    accuracy: tuple[float, ...]

    @property
    def ece(self) -> float:
        """The expected calibration error: sum over bins of count / total * |accuracy - confidence|."""
        total = sum(self.counts)
        return sum(n / total * abs(a - c) for n, a, c in zip(self.counts, self.accuracy, self.confidence)) if total else 0.0


def reliability_bins(proba: ArrayLike, y: ArrayLike, n_bins: int = N_BINS) -> ReliabilityBins:
    """Bin rows by their top-class probability into `n_bins` equal-width bins ((0, 1/n], ..., ((n-1)/n, 1]).

    Args:
        proba: class probabilities, shape (n_samples, n_classes).
        y: true class indices, shape (n_samples,).
    """
    p, labels = _checked(proba, y)
    if n_bins < 1:
        raise ConfigError(f"n_bins must be at least 1, got {n_bins}.")
    confidence = p.max(1)
    correct = p.argmax(1) == labels
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    sums = np.bincount(index, confidence, minlength=n_bins)
    hits = np.bincount(index, correct.astype(np.float64), minlength=n_bins)
    safe = np.maximum(counts, 1)
    return ReliabilityBins(
        tuple(float(e) for e in np.linspace(0, 1, n_bins + 1)),
        tuple(int(n) for n in counts),
        tuple(float(v) for v in sums / safe),
        tuple(float(v) for v in hits / safe),
    )


def expected_calibration_error(proba: ArrayLike, y: ArrayLike, n_bins: int = N_BINS) -> float:
    """The ECE of class probabilities (n_samples, n_classes) against true class indices (n_samples,), over `n_bins` equal-width bins."""
    return reliability_bins(proba, y, n_bins).ece


def _checked(values: ArrayLike, y: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    z = np.asarray(values, dtype=np.float64)
    labels = np.asarray(y)
    if z.ndim != 2 or labels.ndim != 1 or len(z) != len(labels) or len(z) == 0 or z.shape[1] < 2:
        raise ConfigError(
            f"Expected scores of shape (n_samples, n_classes) and labels of shape (n_samples,), got {z.shape} and {labels.shape}."
        )
    if not np.isfinite(z).all():
        raise ConfigError("The scores contain NaN or infinite values.")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= z.shape[1]:
        raise ConfigError(f"Labels must be class indices from 0 to {z.shape[1] - 1}.")
    return z, labels.astype(np.int64)
