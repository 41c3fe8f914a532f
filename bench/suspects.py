"""suspects: how well each ranking finds labels flipped at random, from out-of-fold predictions.

    .venv/bin/python bench/suspects.py [--data DATA ...] [--fraction 0.05] [--trials 3] [--no-record]

For each dataset (default: flowers and cats_dogs from ../shared/datasets), the
efficientnet_lite0 features of every image come from headstart's feature cache. Each
trial flips a seeded random `fraction` of the labels to another random class, runs
`selection.cross_validate(HeadClassifier())` (5 stratified folds, C chosen by
out-of-fold log loss) on the flipped labels, and ranks the images by each method:
recall@k is the share of the flipped images among the first k, k = the number flipped.
cleanlab's `find_label_issues` returns only the images it flags, so its recall@k is
capped by how many it flags (shown, with the share of the flagged that were flipped).
The top 10 of the ranking on the unflipped labels are printed for eyeballing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import FLOWERS, cached_features, publish, table

from headstart.classifier import HeadClassifier
from headstart.data import ImageRecord
from headstart.selection import cross_validate
from headstart.suspects import SUSPECT_C, find_suspects, flip_labels, recall_at_k

METHODS: dict[str, dict[str, str]] = {
    "headstart: lowest p(given), as many as cleanlab flags": {"filter_by": "count", "ranking": "self_confidence"},
    "lowest p(given), all images": {"filter_by": "none", "ranking": "self_confidence"},
    "lowest normalized margin, all images": {"filter_by": "none", "ranking": "normalized_margin"},
    "cleanlab prune_by_noise_rate + self_confidence": {"filter_by": "prune_by_noise_rate", "ranking": "self_confidence"},
    "cleanlab prune_by_noise_rate + normalized_margin": {"filter_by": "prune_by_noise_rate", "ranking": "normalized_margin"},
    "cleanlab both + self_confidence": {"filter_by": "both", "ranking": "self_confidence"},
    "cleanlab confident_learning + self_confidence": {"filter_by": "confident_learning", "ranking": "self_confidence"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", default=[FLOWERS, FLOWERS.parent / "cats_dogs"])
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    lines: list[str] = []
    for data in args.data:
        records, X, _ = cached_features(data)
        labels = [r.label for r in records]
        heads = {f"C={SUSPECT_C:g} (headstart's)": (SUSPECT_C,), "C by out-of-fold log loss (train's)": None}
        keys = [(h, m) for h in heads for m in METHODS]
        recalls: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
        flagged: dict[tuple[str, str], list[tuple[int, float]]] = {key: [] for key in keys}
        seconds: dict[str, list[float]] = {h: [] for h in heads}
        accuracy: dict[str, list[float]] = {h: [] for h in heads}
        chosen: list[float] = []
        for trial in range(args.trials):
            noisy, flipped = flip_labels(labels, args.fraction, seed=trial)
            truth = [records[i].path for i in flipped.tolist()]
            noisy_records = [ImageRecord(r.path, c) for r, c in zip(records, noisy, strict=True)]
            for head, grid in heads.items():
                start = time.perf_counter()
                cv = cross_validate(HeadClassifier(), X, noisy, seed=0, **({"grid": grid} if grid else {}))
                seconds[head].append(time.perf_counter() - start)
                accuracy[head].append(float((cv.logits.argmax(1) == cv.y).mean()))
                chosen += [cv.params["C"]] if grid is None else []
                for name, options in METHODS.items():
                    found = find_suspects(noisy_records, list(cv.classes), cv.y, cv.proba, **options)  # type: ignore[arg-type]
                    ranked = [s.path for s in found]
                    recalls[head, name].append(recall_at_k(ranked, truth))
                    flagged[head, name].append((len(ranked), len(set(ranked) & set(truth)) / max(1, len(ranked))))
        n_flipped = round(args.fraction * len(records))
        lines.append(
            f"\n{data.name}: {len(records)} images, {n_flipped} labels flipped ({args.fraction:.0%}) per trial, {args.trials} trials "
            f"(flip seeds 0..{args.trials - 1}); the log-loss choice of C was {', '.join(f'{c:g}' for c in chosen)}"
        )
        for head in heads:
            lines.append(
                f"\n{head}: out-of-fold accuracy against the flipped labels {100 * np.mean(accuracy[head]):.2f}%, "
                f"cross-validation {np.mean(seconds[head]):.1f} s\n"
            )
            rows = [
                [
                    name,
                    f"{100 * np.mean(recalls[head, name]):.1f} ({', '.join(f'{100 * r:.1f}' for r in recalls[head, name])})",
                    f"{np.mean([n for n, _ in flagged[head, name]]):.0f}",
                    f"{100 * np.mean([p for _, p in flagged[head, name]]):.1f}",
                ]
                for name in METHODS
            ]
            lines += table(["ranking", "recall@k % mean (per trial)", "images returned", "of which flipped %"], rows)
        cv = cross_validate(HeadClassifier(), X, labels, seed=0, grid=(SUSPECT_C,))
        top = find_suspects(records, list(cv.classes), cv.y, cv.proba)
        lines.append(f"\nUnflipped {data.name}, C={SUSPECT_C:g}: {len(top)} suspects; the top 10:\n")
        lines += table(
            ["rank", "file", "given", "suggested", "p(given)", "p(suggested)"],
            [[s.rank, s.path.relative_to(data), s.given, s.suggested, f"{s.p_given:.3f}", f"{s.p_suggested:.3f}"] for s in top[:10]],
        )
    publish("suspects: recall@k of flipped labels by ranking (efficientnet_lite0, out-of-fold)", lines, record=not args.no_record)


if __name__ == "__main__":
    main()
