"""heads: headstart's default linear head against scikit-learn's LogisticRegressionCV on identical cached features.

    .venv/bin/python bench/heads.py [--data DATA ...] [--folds 5] [--no-record]

For each dataset (default: flowers and cats_dogs from ../shared/datasets), the
efficientnet_lite0 features of every image (from headstart's feature cache,
computed on first use) are split by a seeded StratifiedKFold. Each fold fits
headstart's default frozen head as `train` fits it (`selection.cross_validate`
chooses C by an inner 5-fold CV on the training folds, then `selection.refit` fits
the L-BFGS linear head on all of them) and `make_pipeline(StandardScaler(),
LogisticRegressionCV())` (L-BFGS, C chosen by its own inner 5-fold CV), and scores
both on the held-out fold: mean and standard deviation of accuracy over the folds,
and seconds per fit. Issue 13's bar: headstart >= scikit-learn - 0.2 points.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
from _common import FLOWERS, cached_features, publish, table
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from headstart.classifier import HeadClassifier
from headstart.selection import cross_validate, refit


class DefaultHead:
    """headstart's default frozen head, fitted as `train` fits it: C by cross-validation, then a refit."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> HeadClassifier:
        self.head = refit(HeadClassifier(), cross_validate(HeadClassifier(), X, y), X, y)
        return self.head

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.head.predict(X)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", default=[FLOWERS, FLOWERS.parent / "cats_dogs"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    rows = []
    for data in args.data:
        records, X, _ = cached_features(data)
        y = np.asarray([r.label for r in records])
        scores: dict[str, list[float]] = {"headstart": [], "sklearn": []}
        seconds: dict[str, list[float]] = {"headstart": [], "sklearn": []}
        for train, test in StratifiedKFold(args.folds, shuffle=True, random_state=0).split(X, y):
            for name, clf in (
                ("headstart", DefaultHead()),
                ("sklearn", make_pipeline(StandardScaler(), LogisticRegressionCV(max_iter=2000))),
            ):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9 announces new LogisticRegressionCV defaults
                    clf.fit(X[train], y[train])
                seconds[name].append(time.perf_counter() - start)
                scores[name].append(float(np.mean(clf.predict(X[test]) == y[test])))
        mean = {k: 100 * np.mean(v) for k, v in scores.items()}
        rows.append(
            [
                f"{data.name} ({len(y)} images)",
                *(f"{mean[k]:.2f} ± {100 * np.std(scores[k]):.2f} ({np.mean(seconds[k]):.1f} s)" for k in ("headstart", "sklearn")),
                f"{mean['headstart'] - mean['sklearn']:+.2f}",
            ]
        )
    lines = [
        f"efficientnet_lite0 features, {args.folds}-fold stratified CV (seed 0), accuracy % mean ± std over folds (seconds per fit):",
        "",
        *table(["data", "headstart default (CV-chosen C, refit)", "StandardScaler + LogisticRegressionCV", "difference (points)"], rows),
    ]
    publish("heads: default linear head vs scikit-learn LogisticRegressionCV (identical features)", lines, record=not args.no_record)


if __name__ == "__main__":
    main()
