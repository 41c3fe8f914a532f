"""unknown: which out-of-distribution score tells a flowers model's own photos from cats, dogs and other photos; calibration.

    .venv/bin/python bench/unknown.py [--rate 0.02] [--no-record]

A flowers model is fitted much as `headstart train --no-refit` fits it (efficientnet_lite0 features from the
cache, the linear head (L-BFGS at C=0.1) fitted on the training part of the seed-0 80/20
split). In-distribution: the flowers validation images (300). Out-of-distribution: all of
cats_dogs (2,999) and ../shared/photos (13). For every score kind of `headstart.unknown`
(fitted on the training split's features), the AUROC of telling the two apart, and the
share of each set called unknown at a threshold chosen as `headstart train` would choose it
but without looking at the validation images: the (1 - rate) quantile of out-of-fold scores
of the training images (5 folds: a detector fitted on four scores the fifth). Then the
temperature fitted on the validation logits and the ECE (15 bins) before and after, with the
ECE also measured on out-of-fold halves (temperature fitted on one half of the validation
images, ECE on the other, both ways, averaged).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import FLOWERS, publish, table
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from headstart.backbone import create_backbone
from headstart.cache import FeatureCache, extract_with_cache
from headstart.calibration import expected_calibration_error, fit_temperature, softmax
from headstart.classifier import HeadClassifier
from headstart.config import default_cache_dir
from headstart.data import list_images, load_dataset
from headstart.engine import create_engine
from headstart.unknown import choose_threshold, fit_detector

CATS_DOGS = FLOWERS.parent / "cats_dogs"
PHOTOS = FLOWERS.parents[1] / "photos"
VARIANTS: list[tuple[str, str, dict[str, int]]] = [
    ("msp", "msp", {}),
    ("energy", "energy", {}),
    ("mahalanobis", "mahalanobis", {}),
    ("mahalanobis, top 256 PCA dims", "mahalanobis", {"dims": 256}),
    ("relative_mahalanobis", "relative_mahalanobis", {}),
    ("knn (k=1)", "knn", {"k": 1}),
    ("knn (k=10)", "knn", {"k": 10}),
]


def features_of(paths: list[Path]) -> np.ndarray:
    net = create_backbone("efficientnet_lite0")
    root = default_cache_dir()
    extraction = extract_with_cache(net, paths, FeatureCache(root, net), 64, None, lambda b: create_engine(b, cache_root=root))
    assert len(extraction.kept) == len(paths), extraction.skipped
    return extraction.features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=0.02, help="share of held-out flowers the threshold may call unknown")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    dataset = load_dataset(FLOWERS, val_split=0.2, seed=0)
    classes = dataset.classes
    X_train, X_val = features_of([r.path for r in dataset.train]), features_of([r.path for r in dataset.val])
    y_train = np.asarray([classes.index(r.label) for r in dataset.train])
    y_val = np.asarray([classes.index(r.label) for r in dataset.val])
    cats_dogs = load_dataset(CATS_DOGS, val_split=0.0)
    X_cd = features_of([r.path for r in cats_dogs.train])
    X_photos = features_of(list_images([PHOTOS])[0])
    labels = np.asarray(classes)
    clf = HeadClassifier().fit(X_train, labels[y_train], X_val, labels[y_val]).head_
    standardization = (clf.weights["0.mean"], clf.weights["0.scale"])
    accuracy = float((clf.logits(X_val).argmax(1) == y_val).mean())

    rows = []
    for name, kind, options in VARIANTS:
        started = time.perf_counter()
        detector = fit_detector(X_train, y_train, len(classes), kind, standardization, **options)  # type: ignore[arg-type]
        seconds = time.perf_counter() - started

        def score(X: np.ndarray, det=detector) -> np.ndarray:  # type: ignore[no-untyped-def]
            return det.score(X, clf.logits(X))

        s_val, s_cd, s_photos = score(X_val), score(X_cd), score(X_photos)
        # threshold without the validation images: out-of-fold scores of the training images
        oof = np.empty(len(y_train), dtype=np.float32)
        for fit_rows, held in StratifiedKFold(5, shuffle=True, random_state=0).split(X_train, y_train):
            fold = HeadClassifier().fit(X_train[fit_rows], labels[y_train[fit_rows]]).head_
            fold_std = (fold.weights["0.mean"], fold.weights["0.scale"])
            det = fit_detector(X_train[fit_rows], y_train[fit_rows], len(classes), kind, fold_std, **options)  # type: ignore[arg-type]
            oof[held] = det.score(X_train[held], fold.logits(X_train[held]))
        threshold = choose_threshold(oof, args.rate)
        ood = np.r_[s_cd, s_photos]
        auroc = roc_auc_score(np.r_[np.zeros(len(s_val)), np.ones(len(ood))], np.r_[s_val, ood])
        auroc_cd = roc_auc_score(np.r_[np.zeros(len(s_val)), np.ones(len(s_cd))], np.r_[s_val, s_cd])
        auroc_photos = roc_auc_score(np.r_[np.zeros(len(s_val)), np.ones(len(s_photos))], np.r_[s_val, s_photos])
        rows.append(
            [
                name,
                f"{auroc:.4f}",
                f"{auroc_cd:.4f}",
                f"{auroc_photos:.4f}",
                f"{np.mean(s_val > threshold):.1%}",
                f"{np.mean(s_cd > threshold):.1%}",
                f"{int(np.sum(s_photos > threshold))}/{len(s_photos)}",
                f"{seconds:.2f}",
            ]
        )

    logits_val = clf.logits(X_val)
    temperature = fit_temperature(logits_val, y_val)
    halves = []
    order = np.random.default_rng(0).permutation(len(y_val))
    a, b = order[: len(order) // 2], order[len(order) // 2 :]
    for fit_half, test_half in ((a, b), (b, a)):
        t = fit_temperature(logits_val[fit_half], y_val[fit_half])
        halves.append(
            (
                expected_calibration_error(softmax(logits_val[test_half]), y_val[test_half]),
                expected_calibration_error(softmax(logits_val[test_half], t), y_val[test_half]),
            )
        )
    ece_before = expected_calibration_error(softmax(logits_val), y_val)
    ece_after = expected_calibration_error(softmax(logits_val, temperature), y_val)
    lines = [
        f"flowers model (efficientnet_lite0, linear head, {len(y_train)} training / {len(y_val)} validation images, "
        f"val accuracy {accuracy:.2%}); out-of-distribution: cats_dogs ({len(X_cd)}) and ../shared/photos ({len(X_photos)}). "
        f"Threshold: the {1 - args.rate:.0%} quantile of out-of-fold training scores (5 folds).\n",
        *table(
            [
                "score",
                "AUROC (all OOD)",
                "AUROC cats_dogs",
                "AUROC photos",
                "flowers val unknown",
                "cats_dogs unknown",
                "photos unknown",
                "fit s",
            ],
            rows,
        ),
        "",
        f"Temperature scaling on the validation logits: T = {temperature:.3f}; ECE (15 bins) {ece_before:.4f} -> {ece_after:.4f}. "
        f"Fitted on one half of the validation images and measured on the other (mean of both ways): "
        f"{np.mean([h[0] for h in halves]):.4f} -> {np.mean([h[1] for h in halves]):.4f}.",
    ]
    publish("unknown: out-of-distribution scores and calibration (flowers model)", lines, record=not args.no_record)


if __name__ == "__main__":
    main()
