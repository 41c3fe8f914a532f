"""Fine-tuning vs the frozen linear head, both scored on a test split used for nothing else (2-core CPU timings).

    .venv/bin/python bench/finetune.py ../shared/datasets/flowers
    .venv/bin/python bench/finetune.py ../shared/datasets/cats_dogs

Prints a table and appends it to bench/results.md. Both runs hold out the same
seeded 20% test split first; the frozen head is then cross-validated and refitted
on the other 80%, and fine-tuning splits those 80/20 for early stopping. Each
model is scored on the test split with and without test-time augmentation (the
mirror image). The fine-tuning run reuses the features the linear run cached,
so its time is the phase-two cost plus the (cached) phase one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import publish, table

import headstart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--unfreeze", default="2")
    parser.add_argument("--augment", default="strong")
    args = parser.parse_args()
    unfreeze = None if args.unfreeze == "all" else int(args.unfreeze)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        linear = headstart.train(args.data, backbone=args.backbone, strategy="linear", cache_dir=tmp, test_split=0.2, tta=True)
        linear_seconds = time.perf_counter() - started
        started = time.perf_counter()
        tuned = headstart.train(
            args.data, backbone=args.backbone, strategy="finetune", unfreeze=unfreeze, epochs=args.epochs,
            augment=args.augment, cache_dir=tmp, out=Path(tmp) / "model", test_split=0.2, tta=True,
        )  # fmt: skip
        tuned_seconds = time.perf_counter() - started

    history = [row for row in tuned.summary.history if row["phase"] == "finetune"]
    lin, ft = linear.summary, tuned.summary
    assert lin.test_images == ft.test_images and lin.test and lin.test_tta and ft.test and ft.test_tta
    rows = [
        ("linear head, frozen features", f"{lin.validation.accuracy:.4f} ({lin.scored_on})", f"{lin.test.accuracy:.4f}",
         f"{lin.test_tta.accuracy:.4f}", "-", f"{linear_seconds:.0f}"),
        (f"finetune top {args.unfreeze} blocks, {args.augment} augmentation", f"{ft.validation.accuracy:.4f} (validation split)",
         f"{ft.test.accuracy:.4f}", f"{ft.test_tta.accuracy:.4f}", f"{len(history)} run, best {ft.finetune.best_epoch}",
         f"{tuned_seconds:.0f}"),
    ]  # fmt: skip
    gain, gain_tta = 100 * (ft.test.accuracy - lin.test.accuracy), 100 * (ft.test_tta.accuracy - lin.test_tta.accuracy)
    lines = [
        *table(["strategy", "held-out accuracy (chosen on)", "test accuracy", "test, with TTA", "epochs", "wall s"], rows),
        f"\n{lin.test.n_images} test images. Fine-tuned minus frozen on the test split: {gain:+.2f} points without TTA, "
        f"{gain_tta:+.2f} with; TTA itself: frozen {100 * (lin.test_tta.accuracy - lin.test.accuracy):+.2f}, "
        f"fine-tuned {100 * (ft.test_tta.accuracy - ft.test.accuracy):+.2f} points. Per-epoch seconds: {[round(r['seconds']) for r in history]}",
    ]
    publish(f"finetune vs frozen on a test split: {args.data.name}, {args.backbone}, 20% test split seed 0", lines)


if __name__ == "__main__":
    main()
