"""ensemble: accuracy of EfficientNet-Lite0, Lite1 and Lite2 alone and of their features concatenated.

    .venv/bin/python bench/ensemble.py [--data DATA] [--folds 5] [--no-pairs] [--no-record]

For each backbone and each ensemble (default: Lite0, Lite1, Lite2, the three
pairs and all three), the features of every image of DATA (default: flowers
from ../shared/datasets) come from headstart's feature cache, as `headstart
train --backbone a+b+c` gets them (each member's own preprocessing and cache,
concatenated in member order; computed on first use). A seeded
StratifiedKFold(5, shuffle=True, random_state=0) splits them, and each fold fits
`make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))` (C=1) and
headstart's default head `HeadClassifier()` on the training folds and scores the
held-out fold: mean and standard deviation of accuracy over the folds, and
seconds per fit.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
from _common import FLOWERS, cached_features, publish, table
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from headstart.classifier import HeadClassifier

SINGLES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
PAIRS = ["efficientnet_lite0+efficientnet_lite1", "efficientnet_lite0+efficientnet_lite2", "efficientnet_lite1+efficientnet_lite2"]
ALL = "+".join(SINGLES)


def short(backbone: str) -> str:
    return backbone.replace("efficientnet_lite", "Lite").replace("+", " + ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FLOWERS)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--no-pairs", action="store_true", help="only the three backbones and all three together")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    rows = []
    for backbone in [*SINGLES, *([] if args.no_pairs else PAIRS), ALL]:
        records, X, n_extracted = cached_features(args.data, backbone)
        y = np.asarray([r.label for r in records])
        scores: dict[str, list[float]] = {"sklearn": [], "headstart": []}
        seconds: dict[str, list[float]] = {"sklearn": [], "headstart": []}
        for train, test in StratifiedKFold(args.folds, shuffle=True, random_state=0).split(X, y):
            for name, clf in (
                ("sklearn", make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))),
                ("headstart", HeadClassifier()),
            ):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    clf.fit(X[train], y[train])
                seconds[name].append(time.perf_counter() - start)
                scores[name].append(float(np.mean(clf.predict(X[test]) == y[test])))
        rows.append(
            [
                short(backbone),
                X.shape[1],
                *(
                    f"{100 * np.mean(scores[k]):.2f} ± {100 * np.std(scores[k]):.2f} ({np.mean(seconds[k]):.1f} s)"
                    for k in ("sklearn", "headstart")
                ),
                n_extracted,
            ]
        )
        print(*rows[-1], sep=" | ", flush=True)
    lines = [
        f"{args.data.name} ({len(y)} images), {args.folds}-fold stratified CV (shuffle, random_state 0), accuracy % mean ± std over folds "
        "(seconds per fit). Features from headstart's cache, each member with its own preprocessing, concatenated in member order:",
        "",
        *table(
            ["backbones", "features", "StandardScaler + LogisticRegression", "HeadClassifier() (default linear)", "images extracted now"],
            rows,
        ),
    ]
    publish("ensemble: EfficientNet-Lite0/1/2 alone and concatenated", lines, record=not args.no_record)


if __name__ == "__main__":
    main()
