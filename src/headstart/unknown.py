"""Unknown (out-of-distribution) detection: a score per image, higher for images unlike any class the model knows, and a threshold.

Score kinds (bench/unknown.py measures each on a flowers model against cats, dogs and other photos):

- "msp": minus the largest softmax probability.
- "energy": -logsumexp(logits), the free energy of the logits.
- "mahalanobis": the smallest squared Mahalanobis distance from the head's standardised
  features to a class mean, under one covariance shared by the classes (Ledoit-Wolf shrinkage).
- "relative_mahalanobis": that minus the distance to one Gaussian fitted on all training features.
- "knn": one minus the cosine similarity to the k-th nearest training image's features.

The feature-space scores are kept as a projection P (n_features, dims) and per-class centers
C (n_classes, dims): score = min_k |features @ P - C_k|^2, the form the ONNX export computes too.
Pure NumPy; fitted on (training features, labels), thresholded on held-out scores.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from headstart.calibration import expected_calibration_error, fit_temperature, softmax
from headstart.config import is_finite_number
from headstart.errors import ConfigError
from headstart.summary import CalibrationRecord

ScoreKind = Literal["msp", "energy", "mahalanobis", "relative_mahalanobis", "knn"]
SCORE_KINDS: tuple[str, ...] = ("msp", "energy", "mahalanobis", "relative_mahalanobis", "knn")
DEFAULT_KIND: ScoreKind = "knn"
"""The best of the kinds on bench/unknown.py: AUROC 0.998 against cats and dogs for a flowers model."""
DEFAULT_RATE = 0.02
"""Share of held-out in-distribution images the default threshold calls unknown."""
KNN_K = 10
MAX_REFERENCES = 100_000
"""The most reference rows a bundle may hold; `fit_detector` keeps at most `references` (default 20,000)."""

_TENSORS: dict[str, tuple[str, ...]] = {
    "msp": (),
    "energy": (),
    "mahalanobis": ("projection", "centers"),
    "relative_mahalanobis": ("projection", "centers", "background_projection", "background_center"),
    "knn": ("references",),
}


SEEN_TOLERANCE = 1e-5  # cosine similarity above 1 - this: the same image (features differ in the last bits with the batch)


@dataclass(frozen=True)
class UnknownDetector:
    """A fitted unknown score and the threshold past which an image is called unknown.

    Attributes:
        kind: one of `SCORE_KINDS`.
        threshold: scores above it are unknown (inf: none is).
        tensors: the fitted arrays by name (see `tensor_shapes`), float32.
        k: for "knn", which nearest neighbour's similarity counts.
    """

    kind: ScoreKind
    threshold: float = math.inf
    tensors: Mapping[str, NDArray[np.float32]] = field(default_factory=dict)
    k: int = KNN_K

    def score(self, features: ArrayLike, logits: ArrayLike) -> NDArray[np.float32]:
        """The unknown score of each image, float32 of shape (n_samples,), from backbone features (n_samples, n_features)
        and the head's logits (n_samples, n_classes)."""
        t = self.tensors
        if self.kind == "msp":
            z = np.asarray(logits, dtype=np.float64)
            z = z - z.max(1, keepdims=True)
            return np.asarray(-1 / np.exp(z).sum(1), dtype=np.float32)
        if self.kind == "energy":
            z = np.asarray(logits, dtype=np.float64)
            top = z.max(1)
            return np.asarray(-(top + np.log(np.exp(z - top[:, None]).sum(1))), dtype=np.float32)
        f = np.asarray(features, dtype=np.float32)
        if self.kind == "knn":
            unit = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
            similarity = unit @ t["references"].T
            k = min(self.k, similarity.shape[1])
            kth = np.partition(-similarity, k - 1, axis=1)[:, k - 1]
            return (1 + kth).astype(np.float32)
        score = _min_distance(f @ t["projection"], t["centers"])
        if self.kind == "relative_mahalanobis":
            score -= _min_distance(f @ t["background_projection"], t["background_center"])
        return score

    def seen(self, features: ArrayLike) -> NDArray[np.bool_]:
        """Which images are, to float precision, among a "knn" detector's references: images the head was fitted on
        (or byte-for-byte copies of them). All False for the other kinds, which keep no training rows."""
        f = np.asarray(features, dtype=np.float32)
        if self.kind != "knn" or not len(f):
            return np.zeros(len(f), dtype=bool)
        unit = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        return np.asarray((unit @ self.tensors["references"].T).max(1) > 1 - SEEN_TOLERANCE)

    def is_unknown(self, scores: NDArray[np.float32], threshold: float | None = None) -> NDArray[np.bool_]:
        """Which scores are past `threshold` (default: the detector's own)."""
        return np.asarray(scores > (self.threshold if threshold is None else threshold))

    def with_threshold(self, threshold: float) -> UnknownDetector:
        return UnknownDetector(self.kind, threshold, self.tensors, self.k)

    @classmethod
    def from_tensors(
        cls, kind: Any, threshold: Any, tensors: Mapping[str, Any], n_features: int, n_classes: int, k: Any = KNN_K
    ) -> UnknownDetector:
        """A detector from values read from a file: kind, threshold and every tensor's name and shape checked
        (against the head's `n_features` and `n_classes`) before anything is copied, then finiteness.

        Raises:
            ConfigError: names the first value that is wrong.
        """
        if kind not in SCORE_KINDS:
            raise ConfigError(f"Unknown score kind {kind!r}; expected one of {', '.join(SCORE_KINDS)}.")
        if not is_finite_number(threshold):
            raise ConfigError(f"The unknown threshold must be a finite number, got {threshold!r}.")
        if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_REFERENCES):
            raise ConfigError(f"The kNN k must be an integer from 1 to {MAX_REFERENCES}, got {k!r}.")
        found = {name: tuple(int(d) for d in np.shape(v)) for name, v in tensors.items()}
        expected = tensor_shapes(kind, n_features, n_classes, found)
        if found != expected:
            detail = "; ".join(f"{n}: {found.get(n, 'missing')} instead of {s}" for n, s in expected.items() if found.get(n) != s)
            detail += "".join(f"; unexpected {n}" for n in sorted(found.keys() - expected.keys()))
            raise ConfigError(
                f"Unknown-detector tensors do not match a {kind} detector for {n_features} features: {detail.removeprefix('; ')[:300]}"
            )
        arrays: dict[str, NDArray[np.float32]] = {}
        for name in expected:
            if np.asarray(tensors[name]).dtype != np.float32:  # headstart writes float32 only: another type was written by someone else
                raise ConfigError(f"Unknown-detector tensor '{name}' is {np.asarray(tensors[name]).dtype}, not float32.")
            arrays[name] = np.asarray(tensors[name]).astype(np.float32)
            if not np.isfinite(arrays[name]).all():
                raise ConfigError(f"Unknown-detector tensor '{name}' contains NaN or infinite values.")
        return cls(kind, float(threshold), arrays, int(k))


def tensor_shapes(kind: str, n_features: int, n_classes: int, found: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The name and shape each tensor of a `kind` detector must have; the free sizes (dims, references) are read from `found`
    within bounds, without allocating anything."""

    def free(name: str, axis: int, high: int) -> int:
        shape = found.get(name, ())
        size = shape[axis] if len(shape) > axis else 0
        return size if 1 <= size <= high else -1

    dims, dims_b = free("projection", 1, n_features), free("background_projection", 1, n_features)
    shapes = {
        "projection": (n_features, dims),
        "centers": (n_classes, dims),
        "background_projection": (n_features, dims_b),
        "background_center": (1, dims_b),
        "references": (free("references", 0, MAX_REFERENCES), n_features),
    }
    return {name: shapes[name] for name in _TENSORS[kind]}


def fit_detector(
    features: ArrayLike,
    y: ArrayLike,
    n_classes: int,
    kind: ScoreKind = DEFAULT_KIND,
    standardization: tuple[NDArray[np.float32], NDArray[np.float32]] | None = None,
    dims: int | None = None,
    k: int = KNN_K,
    references: int = 20_000,
    seed: int = 0,
) -> UnknownDetector:
    """Fit an unknown score on training features (n_samples, n_features) and their class indices (n_samples,); no threshold yet.

    Args:
        standardization: the head's (mean, scale), shape (n_features,) each; the Mahalanobis scores work on
            (features - mean) / scale. Default: the training features' mean and standard deviation.
        dims: keep only the covariance's `dims` largest principal directions (default: all).
        k: for "knn", the neighbour whose similarity counts.
        references: for "knn", keep at most this many training rows (a seeded random subset).

    Raises:
        ConfigError: an unknown kind, or arrays that do not fit together.
    """
    if kind not in SCORE_KINDS:
        raise ConfigError(f"Unknown score kind {kind!r}; choose one of {', '.join(SCORE_KINDS)}.")
    f = np.asarray(features, dtype=np.float64)
    labels = np.asarray(y)
    if f.ndim != 2 or labels.shape != (len(f),) or len(f) < 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"Expected features (n_samples, n_features) and class indices (n_samples,), got {f.shape} and {labels.shape}.")
    if labels.min() < 0 or labels.max() >= n_classes or len(np.unique(labels)) < n_classes:
        raise ConfigError(f"Every one of the {n_classes} classes needs training features to fit an unknown detector.")
    if kind in ("msp", "energy"):
        return UnknownDetector(kind)
    if kind == "knn":
        if not 1 <= k <= min(references, MAX_REFERENCES):
            raise ConfigError(f"k must be from 1 to the number of references ({references}), got {k}.")
        if len(f) > references:
            f = f[np.sort(np.random.default_rng(seed).permutation(len(f))[:references])]
        unit = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        return UnknownDetector(kind, tensors={"references": unit.astype(np.float32)}, k=k)
    if standardization is None:
        mean, scale = f.mean(0), f.std(0) + 1e-6
    else:
        mean, scale = (np.asarray(a, dtype=np.float64) for a in standardization)
    z = (f - mean) / scale
    class_means = np.stack([z[labels == c].mean(0) for c in range(n_classes)])
    projection, centers = _whitening(z - class_means[labels], class_means, mean, scale, dims)
    tensors = {"projection": projection, "centers": centers}
    if kind == "relative_mahalanobis":
        overall = z.mean(0, keepdims=True)
        tensors["background_projection"], tensors["background_center"] = _whitening(z - overall, overall, mean, scale, dims)
    return UnknownDetector(kind, tensors=tensors)


def choose_threshold(heldout_scores: ArrayLike, rate: float = DEFAULT_RATE) -> float:
    """The threshold that calls at most `rate` of held-out in-distribution images unknown: their (1 - rate) quantile.

    Raises:
        ConfigError: no scores, a score not finite, or `rate` outside [0, 1).
    """
    scores = np.sort(np.asarray(heldout_scores, dtype=np.float64).ravel())
    if not (is_finite_number(rate) and 0 <= rate < 1):
        raise ConfigError(f"The unknown rate must be in [0, 1), got {rate!r}.")
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ConfigError("Choosing an unknown threshold needs finite held-out scores; got none, or NaN.")
    n_allowed = math.floor(rate * len(scores))  # at most this many held-out scores may lie above the threshold
    return float(np.nextafter(np.float32(scores[len(scores) - 1 - n_allowed]), np.float32(np.inf)))


def calibrate(
    detector: UnknownDetector | None,
    heldout_logits: ArrayLike,
    heldout_y: ArrayLike,
    heldout_scores: ArrayLike | None = None,
    rate: float = DEFAULT_RATE,
) -> tuple[CalibrationRecord, UnknownDetector | None]:
    """Fit the temperature on held-out logits and labels, and the detector's threshold on held-out scores.

    The held-out rows may be a validation split (scores from a detector fitted on the training
    split) or out-of-fold predictions (scores from each fold's own detector).

    Args:
        detector: fitted on training features (`fit_detector`), or None for temperature scaling alone.
        heldout_logits: shape (n_heldout, n_classes); heldout_y: their class indices, shape (n_heldout,).
        heldout_scores: the detector's scores of the held-out images, shape (n_heldout,).
        rate: the share of held-out images the threshold may call unknown.

    Returns:
        What was measured, and the detector with its threshold.
    """
    logits = np.asarray(heldout_logits, dtype=np.float32)
    temperature = fit_temperature(logits, heldout_y)
    before = expected_calibration_error(softmax(logits), heldout_y)
    after = expected_calibration_error(softmax(logits, temperature), heldout_y)
    if after > before:  # the likelihood's best temperature need not lower the ECE (few images): then none is applied
        temperature, after = 1.0, before
    record = CalibrationRecord(temperature, before, after, len(logits))
    if detector is None:
        return record, None
    if heldout_scores is None:
        raise ConfigError("Pass the detector's held-out scores to choose its threshold.")
    scores = np.asarray(heldout_scores, dtype=np.float32)
    detector = detector.with_threshold(choose_threshold(scores, rate))
    unknown_rate = float(detector.is_unknown(scores).mean())
    return dataclasses.replace(
        record, score=detector.kind, threshold=detector.threshold, heldout_unknown_rate=unknown_rate, k=detector.k
    ), detector


def ledoit_wolf(X: NDArray[np.float64]) -> tuple[NDArray[np.float64], float]:
    """The Ledoit-Wolf shrunk covariance of centred rows X (n_samples, n_features), and the shrinkage (as scikit-learn's
    `ledoit_wolf(X, assume_centered=True)`)."""
    n, p = X.shape
    emp_cov = X.T @ X / n
    mu = float(np.trace(emp_cov)) / p
    X2 = X**2
    beta_ = float((X2.T @ X2).sum())
    delta_ = float((emp_cov**2).sum())
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2 * mu * float(np.trace(emp_cov)) + p * mu**2) / p
    shrinkage = 0.0 if beta == 0 else min(beta, delta) / delta
    shrunk = (1 - shrinkage) * emp_cov
    shrunk.flat[:: p + 1] += shrinkage * mu
    return shrunk, shrinkage


def _whitening(
    residuals: NDArray[np.float64],
    class_means: NDArray[np.float64],
    mean: NDArray[np.float64],
    scale: NDArray[np.float64],
    dims: int | None,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """P and C such that |features @ P - C_k|^2 is the Mahalanobis distance of the standardised features to class mean k."""
    cov, _ = ledoit_wolf(residuals)
    eigenvalues, vectors = np.linalg.eigh(cov)
    keep = slice(None) if dims is None else slice(len(eigenvalues) - dims, None)
    white = vectors[:, keep] / np.sqrt(np.maximum(eigenvalues[keep], 1e-12))
    # z @ W = features @ (W / scale) - (mean / scale) @ W, so the constant moves into the centers
    return (white / scale[:, None]).astype(np.float32), ((class_means + mean / scale) @ white).astype(np.float32)


def _min_distance(projected: NDArray[np.float32], centers: NDArray[np.float32]) -> NDArray[np.float32]:
    """min over rows of `centers` of the squared distance to each row of `projected`."""
    best = np.full(len(projected), np.inf, dtype=np.float32)
    for center in centers:  # differences rather than |a|^2 - 2ab + |b|^2, which cancels badly in float32
        np.minimum(best, ((projected - center) ** 2).sum(1), out=best)
    return best
