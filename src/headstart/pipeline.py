"""Images decoded into batches ahead of whoever consumes them, with bounded memory.

`decode_batches` decodes in worker processes (for feature extraction, where the
consumer is a native inference engine that needs every core it can get);
`load_batches` runs any Python callable in a thread pool (for fine-tuning,
where each item is an augmented image). Both keep a fixed number of batches in
flight, so memory stays flat however many images there are.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from headstart.config import DataConfig
from headstart.data import Skipped, decode_image
from headstart.errors import UnreadableImageError
from headstart.transforms import crop_pixels, normalize

PREFETCH_PER_WORKER = 2
_Chunk = tuple[list[int], tuple[NDArray[np.uint8], ...], list[Skipped]]  # kept positions, their pixels per config, the unreadable files


@dataclass(frozen=True)
class Batch:
    """Decoded inputs: `arrays[k]` belongs to item `indices[k]`; unreadable items are in `skipped`."""

    indices: list[int]
    arrays: NDArray[np.float32]
    skipped: list[Skipped]


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`) CPU limit in CPUs, if one is set."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def ignore_sigint() -> None:
    """Initializer of worker processes: Ctrl-C is the main process's to handle (workers would each print a traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` processes (forked where possible) that ignore Ctrl-C."""
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=ignore_sigint)


def decode_workers(cpus: int | None = None) -> int:
    """Decoding processes to run beside the inference engine: a quarter of the CPUs, at least one.

    Decoding a typical photo costs a fifth or less of a small CNN's forward pass,
    so the rest of the cores are left to the engine's threads.
    """
    return max(1, (cpus or available_cpus()) // 4)


def decode_input(path: Path, cfg: DataConfig, reduced_decode: bool = True) -> NDArray[np.uint8]:
    """Decode, resize and crop one file to uint8 pixels of shape (input_size, input_size, 3).

    With `reduced_decode`, JPEGs at least four times the resize size on their
    short side are decoded at reduced scale (see `load_image`), keeping at least
    twice the resize size, before the same bicubic resize and crop. Pixels then
    differ slightly from a full decode; bench/decode.py measures by how much.
    The resize runs under the decoding's time limit and error handling.

    Raises:
        UnreadableImageError: the file cannot be decoded, or decoding or resizing it ran out of time or memory.
    """
    return decode_inputs(path, (cfg,), reduced_decode)[0]


def decode_inputs(
    source: Path | bytes, cfgs: Sequence[DataConfig], reduced_decode: bool = True, name: str = "upload"
) -> tuple[NDArray[np.uint8], ...]:
    """`decode_input` for several preprocessings (an ensemble's backbones) from one decode of the file.

    A large JPEG is decoded at the reduced scale the largest `resize_size` allows; each
    preprocessing then resizes and crops that image (configs that are equal share the work).
    `source` may also be a file's bytes already read (then `name` stands for its path in errors).
    """

    def crops(image: Image.Image) -> tuple[NDArray[np.uint8], ...]:
        done = {cfg: crop_pixels(image, cfg) for cfg in dict.fromkeys(cfgs)}
        return tuple(done[cfg] for cfg in cfgs)

    return decode_image(source, crops, min_size=2 * max(cfg.resize_size for cfg in cfgs) if reduced_decode else None, name=name)


def decode_pixels(
    paths: Sequence[Path], cfg: DataConfig, reduced_decode: bool = True
) -> tuple[list[int], NDArray[np.uint8], list[Skipped]]:
    """`decode_input` for each path, in this process: the positions decoded, their pixels stacked, and the unreadable files."""
    kept, (pixels,), skipped = decode_member_pixels(paths, (cfg,), reduced_decode)
    return kept, pixels, skipped


def decode_member_pixels(paths: Sequence[Path], cfgs: Sequence[DataConfig], reduced_decode: bool = True) -> _Chunk:
    """`decode_inputs` for each path, in this process: the positions decoded, their pixels stacked per config, the unreadable files."""
    kept: list[int] = []
    pixels: list[tuple[NDArray[np.uint8], ...]] = []
    skipped: list[Skipped] = []
    for k, path in enumerate(paths):
        try:
            pixels.append(decode_inputs(path, cfgs, reduced_decode))
            kept.append(k)
        except UnreadableImageError as e:
            skipped.append(Skipped(e.path, e.reason))
    stacked = tuple(
        np.stack([p[m] for p in pixels]) if pixels else np.zeros((0, cfg.input_size, cfg.input_size, 3), np.uint8)
        for m, cfg in enumerate(cfgs)
    )
    return kept, stacked, skipped


def decode_batches(
    paths: Sequence[Path],
    cfg: DataConfig,
    batch_size: int,
    reduced_decode: bool = True,
    workers: int | None = None,
    max_in_flight: int | None = None,
) -> Iterator[Batch]:
    """Yield the backbone inputs for `paths` in order, `batch_size` at a time.

    Batches are decoded in `workers` processes (default `decode_workers()`), with
    at most `max_in_flight` batches (default two per worker) submitted ahead of
    the consumer. Inputs that fit in one batch are decoded in this process.
    Unreadable files are skipped and listed in each batch's `skipped`.
    """
    for batch in decode_member_batches(paths, (cfg,), batch_size, reduced_decode, workers, max_in_flight):
        yield Batch(batch.indices, batch.arrays[0], batch.skipped)


@dataclass(frozen=True)
class MemberBatch:
    """Decoded inputs for several preprocessings: `arrays[m][k]` is item `indices[k]` as config `m` prepares it."""

    indices: list[int]
    arrays: tuple[NDArray[np.float32], ...]
    skipped: list[Skipped]


def decode_member_batches(
    paths: Sequence[Path],
    cfgs: Sequence[DataConfig],
    batch_size: int,
    reduced_decode: bool = True,
    workers: int | None = None,
    max_in_flight: int | None = None,
) -> Iterator[MemberBatch]:
    """`decode_batches` for an ensemble: each file decoded once, then resized, cropped and normalised per config in `cfgs`."""
    cfgs = tuple(cfgs)
    starts = range(0, len(paths), batch_size)
    if len(paths) <= batch_size:
        for start in starts:
            yield _batch(start, decode_member_pixels(paths[start : start + batch_size], cfgs, reduced_decode), cfgs)
        return
    workers = workers or decode_workers()
    limit = max_in_flight or PREFETCH_PER_WORKER * workers
    chunks = ((start, paths[start : start + batch_size]) for start in starts)
    with process_pool(workers) as pool:
        pending: deque[tuple[int, Future[_Chunk]]] = deque()

        def submit_next() -> None:
            for start, chunk in itertools.islice(chunks, 1):
                pending.append((start, pool.submit(decode_member_pixels, chunk, cfgs, reduced_decode)))

        for _ in range(limit):
            submit_next()
        while pending:
            start, future = pending.popleft()
            submit_next()
            yield _batch(start, future.result(), cfgs)


def _batch(start: int, chunk: _Chunk, cfgs: tuple[DataConfig, ...]) -> MemberBatch:
    kept, pixels, skipped = chunk
    return MemberBatch([start + k for k in kept], tuple(normalize(p, cfg) for p, cfg in zip(pixels, cfgs, strict=True)), skipped)


def load_batches(load: Callable[[int], NDArray[np.float32]], indices: Sequence[int], batch_size: int) -> Iterator[Batch]:
    """Yield batches of `load(i)` for `i` in `indices`, in order.

    The next batch is submitted to a thread pool before the current one is
    yielded, so loading overlaps with the consumer and at most two batches are
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
