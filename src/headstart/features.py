"""Batched backbone forward passes over image files: decoding in worker processes, inference in an engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from headstart.config import Progress
from headstart.data import Skipped
from headstart.engine import Engine
from headstart.pipeline import decode_batches


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
    engine: Engine,
    paths: Sequence[Path],
    batch_size: int = 32,
    progress: Progress | None = None,
    reduced_decode: bool = True,
) -> Extraction:
    """Run the frozen backbone over image files; unreadable files are skipped.

    Images are decoded in worker processes a few batches ahead of the engine,
    so memory stays flat however many paths there are.

    Args:
        reduced_decode: decode large JPEGs at reduced scale (see `pipeline.decode_input`).
    """
    rows: list[NDArray[np.float32]] = []
    kept: list[int] = []
    skipped: list[Skipped] = []
    for batch in decode_batches(paths, engine.backbone.data_config, batch_size, reduced_decode=reduced_decode):
        kept += batch.indices
        skipped += batch.skipped
        if batch.indices:
            rows.append(engine(batch.arrays))
        if progress:
            progress("Extracting features", len(kept) + len(skipped), len(paths))
    features = np.concatenate(rows) if rows else np.zeros((0, engine.backbone.n_features), np.float32)
    return Extraction(features.astype(np.float32, copy=False), np.asarray(kept, dtype=np.int64), skipped)
