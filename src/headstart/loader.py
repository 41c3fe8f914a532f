"""Images decoded in a thread pool, one batch ahead of whoever consumes them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from headstart.data import Skipped
from headstart.errors import UnreadableImageError


@dataclass(frozen=True)
class Batch:
    """Decoded inputs: `arrays[k]` belongs to item `indices[k]`; unreadable items are in `skipped`."""

    indices: list[int]
    arrays: NDArray[np.float32]
    skipped: list[Skipped]


def available_cpus() -> int:
    """CPUs this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_batches(load: Callable[[int], NDArray[np.float32]], indices: Sequence[int], batch_size: int) -> Iterator[Batch]:
    """Yield batches of `load(i)` for `i` in `indices`, in order.

    The next batch is submitted to the thread pool before the current one is
    yielded, so decoding overlaps with the consumer and at most two batches are
    in memory. Items whose `load` raises UnreadableImageError are skipped.
    """
    with ThreadPoolExecutor(max_workers=available_cpus()) as pool:

        def submit(start: int) -> list[tuple[int, Future[NDArray[np.float32]]]]:
            return [(i, pool.submit(load, i)) for i in indices[start : start + batch_size]]

        pending = submit(0)
        for start in range(0, len(indices), batch_size):
            current, pending = pending, submit(start + batch_size)
            kept: list[int] = []
            arrays: list[NDArray[np.float32]] = []
            skipped: list[Skipped] = []
            for index, future in current:
                try:
                    arrays.append(future.result())
                    kept.append(index)
                except UnreadableImageError as e:
                    skipped.append(Skipped(e.path, e.reason))
            yield Batch(kept, np.stack(arrays) if arrays else np.zeros((0, 3, 1, 1), np.float32), skipped)
