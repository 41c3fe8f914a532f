"""Feature extraction speed: headstart vs the PyTorch tutorial loop, same weights, same images, same run.

    .venv/bin/python bench/extract.py [DATA]        (default ../shared/datasets/flowers)

The tutorial loop is torchvision `ImageFolder` + `DataLoader(num_workers=2,
batch_size=32)` + timm's eval transform (the same resize/crop/normalisation as
headstart) + the eager timm model under `inference_mode`. headstart runs its
default engine (ONNX Runtime; the one-time export is timed separately) and,
to show where the gain comes from, its pipeline with the PyTorch engine.
Prints a table and appends it to bench/results.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import timm.data
import torch
import torchvision
from _common import FLOWERS, publish, table
from torch.utils.data import DataLoader

from headstart.backbone import Backbone, create_backbone
from headstart.engine import TorchEngine, create_engine
from headstart.features import extract_features
from headstart.pipeline import available_cpus, decode_workers


def tutorial_loop(backbone: Backbone, data: Path) -> tuple[list[Path], np.ndarray]:
    cfg = backbone.data_config
    transform = timm.data.create_transform(
        input_size=(3, cfg.input_size, cfg.input_size),
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        crop_pct=cfg.input_size / cfg.resize_size,
    )
    dataset = torchvision.datasets.ImageFolder(str(data), transform)
    loader = DataLoader(dataset, batch_size=32, num_workers=2)
    model = backbone.module.eval()
    rows = []
    with torch.inference_mode():
        for images, _ in loader:
            rows.append(model.forward_head(model.forward_features(images), pre_logits=True).numpy())
    return [Path(p) for p, _ in dataset.samples], np.concatenate(rows)


def timed(fn):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?", default=FLOWERS)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    backbone = create_backbone(args.backbone)

    with tempfile.TemporaryDirectory() as cache:
        engine, export_seconds = timed(lambda: create_engine(backbone, "onnx", Path(cache)))
        (paths, baseline), baseline_seconds = timed(lambda: tutorial_loop(backbone, args.data))
        ours, ours_seconds = timed(lambda: extract_features(engine, paths))
        ours_torch, ours_torch_seconds = timed(lambda: extract_features(TorchEngine(backbone), paths))

    n = len(paths)
    assert len(ours.kept) == n, "an image was skipped"
    error = float((np.abs(ours.features - baseline).max(1) / np.abs(baseline).max(1)).max())
    rows = [
        (
            "PyTorch tutorial loop (ImageFolder, DataLoader 2 workers, eager)",
            f"{baseline_seconds:.1f}",
            f"{n / baseline_seconds:.1f}",
            "1.00",
        ),
        (
            "headstart pipeline, PyTorch engine",
            f"{ours_torch_seconds:.1f}",
            f"{n / ours_torch_seconds:.1f}",
            f"{baseline_seconds / ours_torch_seconds:.2f}",
        ),
        (
            "**headstart default (ONNX Runtime)**",
            f"{ours_seconds:.1f}",
            f"{n / ours_seconds:.1f}",
            f"**{baseline_seconds / ours_seconds:.2f}**",
        ),
    ]
    lines = [
        *table(["", "seconds", "images/s", "speed-up"], rows),
        f"\n{n} images from {args.data.name}, {args.backbone}; headstart used {engine.threads} engine threads and "
        f"{decode_workers()} decoding process(es) on {available_cpus()} CPUs. One-time ONNX export + verification: {export_seconds:.1f} s. "
        f"Max relative difference of headstart's features from the tutorial loop's: {error:.1e}.",
    ]
    publish(f"extract: {args.data.name}, {args.backbone}", lines)


if __name__ == "__main__":
    main()
