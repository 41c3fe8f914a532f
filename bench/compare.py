"""compare: `headstart compare`'s leaderboard of EfficientNet-Lite0/1/2, their ensemble and both heads, by 5-fold CV.

    .venv/bin/python bench/compare.py [--data DATA ...] [--folds 5] [--earlier-layer efficientnet_lite0] [--no-record]

For each dataset (default: flowers and cats_dogs from ../shared/datasets),
`headstart.compare.compare` scores Lite0, Lite1, Lite2 and the Lite0+Lite1+Lite2
ensemble with the linear and the MLP head on the same images and the same seeded
stratified folds; `--earlier-layer NAME` adds NAME's layer -2 rows (a second call,
same images and folds). Features come from headstart's cache (extracted on first
use; the extraction and fit seconds are in the table). The key number: the
ensemble's best row minus the best single-backbone row, in accuracy points.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from _common import FLOWERS, publish, table

from headstart.compare import LITE, Leaderboard, compare


def rows(board: Leaderboard) -> list[list[object]]:
    return [
        [
            rank,
            e.backbone.replace("efficientnet_", "").replace("+", " + "),
            e.head,
            "final" if e.layer is None else e.layer,
            e.n_features,
            f"{100 * e.accuracy:.2f} ± {100 * e.std:.2f}",
            f"{e.log_loss:.3f}",
            f"C {e.C:g}" if e.C is not None else f"{e.epochs} epochs",
            f"{e.extraction_seconds:.1f} ({e.n_extracted} extracted, {e.n_cached} cached)",
            f"{e.fit_seconds:.1f}",
        ]
        for rank, e in enumerate(board.entries, start=1)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", default=[FLOWERS, FLOWERS.parent / "cats_dogs"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--earlier-layer", nargs="*", default=["efficientnet_lite0"], help="backbones to add at layer -2")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    lines: list[str] = []
    for data in args.data:
        board = compare(data, LITE, folds=args.folds)
        if args.earlier_layer:
            early = compare(data, args.earlier_layer, ensembles=False, layers=(-2,), folds=args.folds)
            assert early.n_images == board.n_images, "the layer -2 rows must be scored on the same images"
            merged = sorted(board.entries + early.entries, key=lambda e: (-e.accuracy, e.log_loss))
            board = dataclasses.replace(board, entries=tuple(merged))
        final = [e for e in board.entries if e.layer is None]
        single = max((e for e in final if len(e.members) == 1), key=lambda e: e.accuracy)
        ensemble = max((e for e in final if len(e.members) > 1), key=lambda e: e.accuracy)
        lines += [
            f"\n### {data.name}: {board.n_images} images, {len(board.classes)} classes, {board.folds}-fold stratified CV (seed 0)\n",
            *table(
                ["#", "backbone", "head", "layer", "features", "accuracy % (mean ± std)", "log loss", "chosen", "extraction s", "CV fit s"],
                rows(board),
            ),
            "",
            f"Ensemble vs best single backbone (final layer): {ensemble.label} {100 * ensemble.accuracy:.2f} vs "
            f"{single.label} {100 * single.accuracy:.2f}: **{100 * (ensemble.accuracy - single.accuracy):+.2f} points**.",
        ]
    publish("compare: backbones, their ensemble and heads by cross-validated accuracy", lines, record=not args.no_record)


if __name__ == "__main__":
    main()
