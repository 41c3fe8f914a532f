"""Batched backbone forward passes over image files: decoding in worker processes, inference in engines.

A model with several backbones (an ensemble) has one engine per backbone: each
image is decoded once, prepared for each backbone by its own preprocessing, and
its features are the backbones' features concatenated in member order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from headstart.config import Progress
from headstart.data import Skipped
from headstart.engine import Engine
from headstart.pipeline import decode_member_batches


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


def extract_features(
    engine: Engine | Sequence[Engine],
    paths: Sequence[Path],
    batch_size: int = 32,
    progress: Progress | None = None,
    reduced_decode: bool = True,
    flip: bool = False,
) -> Extraction:
    """Run the frozen backbone (or each of several, features concatenated) over image files; unreadable files are skipped.

    Images are decoded in worker processes a few batches ahead of the engine,
    so memory stays flat however many paths there are.

    Args:
        engine: one engine, or one per backbone of an ensemble (in member order).
        reduced_decode: decode large JPEGs at reduced scale (see `pipeline.decode_input`).
        flip: the features of the images mirrored left to right (for test-time augmentation).
    """
    engines = (engine,) if isinstance(engine, Engine) else tuple(engine)
    rows: list[NDArray[np.float32]] = []
    kept: list[int] = []
    skipped: list[Skipped] = []
    cfgs = [e.backbone.data_config for e in engines]
    for batch in decode_member_batches(paths, cfgs, batch_size, reduced_decode=reduced_decode):
        kept += batch.indices
        skipped += batch.skipped
        if batch.indices:
            rows.append(run_engines(engines, [mirrored(x) for x in batch.arrays] if flip else batch.arrays))
        if progress:
            progress("Extracting features", len(kept) + len(skipped), len(paths))
    features = np.concatenate(rows) if rows else np.zeros((0, sum(e.backbone.n_features for e in engines)), np.float32)
    return Extraction(features.astype(np.float32, copy=False), np.asarray(kept, dtype=np.int64), skipped)


def run_engines(engines: Sequence[Engine], inputs: Sequence[NDArray[np.float32]]) -> NDArray[np.float32]:
    """Features of one batch: engine `m` on `inputs[m]` (shape (n, 3, H_m, W_m)), concatenated; shape (n, sum of n_features)."""
    if len(engines) != len(inputs):
        raise ValueError(f"{len(engines)} engines for {len(inputs)} inputs")
    outputs = [np.asarray(e(x), dtype=np.float32) for e, x in zip(engines, inputs, strict=True)]
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=1)


def mirrored(inputs: NDArray[np.float32]) -> NDArray[np.float32]:
    """A batch of preprocessed images (n, 3, H, W) mirrored left to right."""
    return np.ascontiguousarray(inputs[..., ::-1])
