"""Batched backbone forward passes over image files, decoding in threads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from headstart.backbones import Backbone
from headstart.config import DataConfig, Progress
from headstart.data import Skipped, load_image
from headstart.loader import load_batches
from headstart.transforms import preprocess


@dataclass(frozen=True)
class Extraction:
    """Features of the readable images among `paths`.

    Attributes:
        features: float32 array of shape (len(kept), n_features).
        kept: int64 indices into the input paths, one per feature row.
        skipped: the unreadable files and why.
    """

    features: NDArray[np.float32]
    kept: NDArray[np.int64]
    skipped: list[Skipped]


def load_input(path: Path, cfg: DataConfig) -> NDArray[np.float32]:
    """Decode and preprocess one file: float32 array of shape (3, H, W)."""
    return preprocess(load_image(path), cfg)


def extract_features(
    backbone: Backbone,
    paths: Sequence[Path],
    batch_size: int = 32,
    progress: Progress | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Extraction:
    """Run the frozen backbone over image files.

    Images are decoded in a thread pool one batch ahead of the forward pass, so
    at most two batches are held in memory. Unreadable files are skipped.

    Args:
        forward: what to compute per batch; default `backbone.features` (pooled
            features). `backbone.imagenet_logits` gives ImageNet logits instead.
    """
    forward = forward or backbone.features
    cfg = backbone.data_config
    rows: list[NDArray[np.float32]] = []
    kept: list[int] = []
    skipped: list[Skipped] = []
    for batch in load_batches(lambda i: load_input(paths[i], cfg), range(len(paths)), batch_size):
        kept += batch.indices
        skipped += batch.skipped
        if batch.indices:
            rows.append(forward(torch.from_numpy(batch.arrays)).numpy())
        if progress:
            progress("Extracting features", len(kept) + len(skipped), len(paths))
    features = np.concatenate(rows) if rows else np.zeros((0, backbone.n_features), np.float32)
    return Extraction(features.astype(np.float32, copy=False), np.asarray(kept, dtype=np.int64), skipped)
