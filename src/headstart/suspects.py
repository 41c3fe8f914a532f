"""Suspect labels: the images most likely mislabelled, found from out-of-fold predictions by confident learning (cleanlab).

Every image is scored by a head that never saw it (`selection.cross_validate`, with the strong
regularisation `SUSPECT_C`). cleanlab's `find_label_issues` (confident learning: the confident
joint of given and likely classes, pruned by noise rate) says how many labels are suspect; the
suspects are that many images with the lowest out-of-fold probability of their given label.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from headstart.config import Progress, default_cache_dir
from headstart.data import ImageRecord, Skipped
from headstart.errors import DataError
from headstart.files import atomic_write_bytes, csv_bytes

Ranking = Literal["self_confidence", "normalized_margin", "confidence_weighted_entropy"]
Filter = Literal["count", "prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given", "none"]
SUSPECT_C = 0.001
"""The linear head's `C` for finding suspects: stronger regularisation than the accuracy-chosen `C` ranks flipped labels better (bench/suspects.py)."""
CSV_HEADER = ("rank", "path", "given", "suggested", "p_given", "p_suggested", "quality")


@dataclass(frozen=True)
class SuspectLabel:
    """An image whose label the out-of-fold predictions doubt.

    Attributes:
        rank: 1 for the most suspect image.
        path: the image file.
        given: the label the data gives it.
        suggested: the most probable other class.
        p_given: the out-of-fold probability of `given`.
        p_suggested: the out-of-fold probability of `suggested`.
        quality: cleanlab's label quality score by the ranking used (0 to 1; lower is more suspect).
    """

    rank: int
    path: Path
    given: str
    suggested: str
    p_given: float
    p_suggested: float
    quality: float


def find_suspects(
    records: Sequence[ImageRecord],
    classes: Sequence[str],
    y: ArrayLike,
    oof_proba: ArrayLike,
    ranking: Ranking = "self_confidence",
    filter_by: Filter = "count",
) -> list[SuspectLabel]:
    """The images most likely mislabelled, most suspect first.

    By default these are the images with the lowest out-of-fold probability of their
    given label, as many as cleanlab's `find_label_issues` flags (confident learning,
    `prune_by_noise_rate`): on flowers with 5% of labels flipped, that ranking puts more
    of them first than cleanlab's own choice of images does (bench/suspects.py).

    Args:
        records: the images, one per row of `oof_proba`.
        classes: the class names, in the column order of `oof_proba`.
        y: each image's given class, as an index into `classes`, shape (n_images,).
        oof_proba: out-of-fold class probabilities, float of shape (n_images, n_classes)
            (e.g. `selection.cross_validate(...).proba`).
        ranking: cleanlab's label quality score to rank by (self_confidence: the probability of the given label).
        filter_by: how many and which images are suspects: "count" (the default) the lowest
            ranked, as many as `find_label_issues` flags; "none" every image, ranked; any
            other value: the images `find_label_issues` flags with that `filter_by`, ranked.

    Raises:
        ValueError: the shapes disagree.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(y, dtype=np.int64)
    proba = np.asarray(oof_proba, dtype=np.float64)
    if proba.shape != (len(records), len(classes)) or labels.shape != (len(records),):
        raise ValueError(
            f"expected {len(records)} labels and probabilities of shape ({len(records)}, {len(classes)}); got {labels.shape} and {proba.shape}"
        )
    proba = proba / proba.sum(1, keepdims=True)  # float32 softmax rows may miss 1 by more than cleanlab allows
    quality = get_label_quality_scores(labels, proba, method=ranking)
    if filter_by == "none":
        order = np.argsort(quality, kind="stable")
    elif filter_by == "count":
        n_issues = int(find_label_issues(labels, proba, n_jobs=1).sum())
        order = np.argsort(quality, kind="stable")[:n_issues]
    else:
        order = find_label_issues(labels, proba, filter_by=filter_by, return_indices_ranked_by=ranking, n_jobs=1)
    others = proba.copy()
    others[np.arange(len(labels)), labels] = -1.0
    suggested = others.argmax(1)
    return [
        SuspectLabel(
            rank=k,
            path=records[i].path,
            given=classes[labels[i]],
            suggested=classes[suggested[i]],
            p_given=float(proba[i, labels[i]]),
            p_suggested=float(proba[i, suggested[i]]),
            quality=float(quality[i]),
        )
        for k, i in enumerate(np.asarray(order, dtype=np.int64).tolist(), start=1)
    ]


@dataclass(frozen=True)
class SuspectSearch:
    """What `suspects_for_data` did.

    Attributes:
        suspects: the flagged images, most suspect first.
        n_images: images cross-validated (readable ones).
        accuracy: the out-of-fold accuracy against the given labels.
        skipped: files left out (unreadable), with the reason.
    """

    suspects: list[SuspectLabel]
    n_images: int
    accuracy: float
    skipped: list[Skipped]

    def write_csv(self, path: Path) -> Path:
        """Write one row per suspect (rank, path, given, suggested, p_given, p_suggested, quality), atomically.

        Paths that are not UTF-8 are written as their original bytes, so each names its file.
        """
        rows = (
            [s.rank, str(s.path), s.given, s.suggested, f"{s.p_given:.4f}", f"{s.p_suggested:.4f}", f"{s.quality:.4f}"]
            for s in self.suspects
        )
        return atomic_write_bytes(path, csv_bytes(CSV_HEADER, rows))


def suspects_for_data(
    data: str | os.PathLike[str],
    backbone: str = "efficientnet_lite0",
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    layer: int | None = None,
    head_params: dict[str, Any] | None = None,
    weights: str | os.PathLike[str] | None = None,
) -> SuspectSearch:
    """Find suspect labels in a dataset: cached frozen features of every readable image, a cross-validated head, cleanlab.

    Train and validation images (of a pre-split folder) are pooled: every image is judged
    by a head trained on the other folds.

    Args:
        data: a class-folder tree, a tree with train/ and val/, or a `path,label` CSV.
        backbone: whose features to use (see `headstart.backbones()`).
        cache_dir: the feature cache (default: `default_cache_dir()`).
        seed: seed of the folds.
        layer: pool an earlier stage's output instead (as `train --layer`).
        head_params: `HeadClassifier` settings (default: the default linear head).
        weights: a backbone weights file instead of the default pretrained ones.

    Raises:
        DataError: the data cannot be read, or a class has fewer than 2 usable images.
    """
    from functools import partial

    from headstart.backbone import create_backbone
    from headstart.cache import FeatureCache, extract_with_cache
    from headstart.classifier import HeadClassifier
    from headstart.data import check_layout, read_source
    from headstart.engine import create_engine
    from headstart.selection import cross_validate

    root = Path(data).expanduser()
    records, presplit_val, _ = read_source(root)
    records += presplit_val or []
    check_layout(root, records)
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    net = create_backbone(backbone, weights, layer, cache_root=cache_root)
    make_engine = partial(create_engine, cache_root=cache_root)
    extraction = extract_with_cache(net, [r.path for r in records], FeatureCache(cache_root, net), 32, progress, make_engine)
    kept = [records[i] for i in extraction.kept.tolist()]
    counts = Counter(r.label for r in kept)
    small = sorted(name for name, n in counts.items() if n < 2)
    if len(counts) < 2 or small:
        found = ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "none"
        raise DataError(
            f"Finding suspect labels cross-validates, which needs at least 2 classes of 2 usable images each; found {found}. "
            "Add images to the small classes (run `headstart check` for what is unusable)."
        )
    template = HeadClassifier(**(head_params or {}))
    cv = cross_validate(template, extraction.features, [r.label for r in kept], seed=seed, progress=progress, grid=(SUSPECT_C,))
    suspects = find_suspects(kept, [str(c) for c in cv.classes], cv.y, cv.proba)
    accuracy = float((cv.logits.argmax(1) == cv.y).mean())
    return SuspectSearch(suspects, len(kept), accuracy, list(extraction.skipped))


def recall_at_k(ranked: Sequence[Path], flipped: Sequence[Path], k: int | None = None) -> float:
    """The fraction of `flipped` among the first `k` of `ranked` (k defaults to the number flipped)."""
    k = len(flipped) if k is None else k
    return len(set(ranked[:k]) & set(flipped)) / max(1, len(flipped))


def flip_labels(labels: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[str], NDArray[np.int64]]:
    """`labels` with a seeded random `fraction` of them changed to another random class; and the indices changed."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    flipped = np.sort(rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)).astype(np.int64)
    out = list(labels)
    for i in flipped.tolist():
        others = [c for c in classes if c != labels[i]]
        out[i] = others[int(rng.integers(len(others)))]
    return out, flipped
