"""Batched backbone forward passes over image files, decoding in threads."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from headstart.backbones import Backbone
from headstart.config import DataConfig, Progress
from headstart.data import Skipped, load_image
from headstart.errors import UnreadableImageError
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


def available_cpus() -> int:
    """CPUs this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    rows: list[NDArray[np.float32]] = []
    kept: list[int] = []
    skipped: list[Skipped] = []
    done = 0
    with ThreadPoolExecutor(max_workers=available_cpus()) as pool:
        for batch in _prefetched(pool, paths, backbone.data_config, batch_size):
            arrays = []
            for index, future in batch:
                try:
                    arrays.append(future.result())
                    kept.append(index)
                except UnreadableImageError as e:
                    skipped.append(Skipped(e.path, e.reason))
            if arrays:
                rows.append(forward(torch.from_numpy(np.stack(arrays))).numpy())
            done += len(batch)
            if progress:
                progress("Extracting features", done, len(paths))
    features = np.concatenate(rows) if rows else np.zeros((0, backbone.n_features), np.float32)
    return Extraction(features.astype(np.float32, copy=False), np.asarray(kept, dtype=np.int64), skipped)


def _prefetched(
    pool: ThreadPoolExecutor, paths: Sequence[Path], cfg: DataConfig, batch_size: int
) -> Iterator[list[tuple[int, Future[NDArray[np.float32]]]]]:
    """Yield batches of decode futures, submitting the next batch before yielding the current one."""
    starts = range(0, len(paths), batch_size)

    def submit(start: int) -> list[tuple[int, Future[NDArray[np.float32]]]]:
        return [(i, pool.submit(load_input, paths[i], cfg)) for i in range(start, min(start + batch_size, len(paths)))]

    pending = submit(0) if paths else []
    for start in starts:
        current, pending = pending, (submit(start + batch_size) if start + batch_size < len(paths) else [])
        yield current
