"""Fine-tuning vs the linear head of the same run, on a real dataset (2-core CPU timings).

    .venv/bin/python bench/finetune.py ../shared/datasets/flowers
    .venv/bin/python bench/finetune.py ../shared/datasets/cats_dogs

Prints a table and appends it to bench/results.md. Both runs use the same
80/20 split (seed 0); the fine-tuning run reuses the features the linear run
cached, so its time is the phase-two cost plus the (cached) phase one.
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
        linear = headstart.train(args.data, backbone=args.backbone, strategy="linear", cache_dir=tmp)
        linear_seconds = time.perf_counter() - started
        started = time.perf_counter()
        tuned = headstart.train(
            args.data, backbone=args.backbone, strategy="finetune", unfreeze=unfreeze, epochs=args.epochs,
            augment=args.augment, cache_dir=tmp, out=Path(tmp) / "model",
        )  # fmt: skip
        tuned_seconds = time.perf_counter() - started

    history = [row for row in tuned.summary.history if row["phase"] == "finetune"]
    lin_acc = linear.summary.validation.accuracy
    ft_acc = tuned.summary.validation.accuracy
    rows = [
        ("linear head, frozen features", f"{lin_acc:.4f}", "-", f"{linear_seconds:.0f}"),
        (
            f"finetune top {args.unfreeze} blocks, {args.augment} augmentation",
            f"{ft_acc:.4f}",
            f"{len(history)} run, best {tuned.summary.finetune.best_epoch}",
            f"{tuned_seconds:.0f}",
        ),
    ]
    lines = [
        *table(["strategy", "val accuracy", "epochs", "wall s"], rows),
        f"\nfine-tuned minus linear: {ft_acc - lin_acc:+.4f}; per-epoch seconds: {[round(r['seconds']) for r in history]}",
    ]
    publish(f"finetune: {args.data.name}, {args.backbone}, 80/20 split seed 0", lines)


if __name__ == "__main__":
    main()
