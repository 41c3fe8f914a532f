"""Feature extraction on a local Ray (Ray Data actors) against headstart's single-process engine, and Ray's scaling from 1 to 2 CPUs.

    .venv/bin/python bench/ray.py [--n-images 20000] [--cpus 1 2]

Makes `--n-images` distinct JPEGs (the cache is content-addressed, so copies would be skipped) by
cropping each flower photo a few pixels differently and re-encoding it, in a temporary folder
outside the repository. Then, on the same files, with no feature cache to start from:
headstart's single-process engine (decoding workers + one ONNX Runtime session per CPU, as `train`
runs it), and `extract --ray` on a local Ray started with each of `--cpus` CPUs (one actor per CPU,
writing the shards of a new cache). Ray's times include starting its actors and streaming the features
back, not `ray.init`, which is reported apart. Checks that the features agree. Prints a table and
appends it to bench/results.md.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import FLOWERS, publish, table
from PIL import Image

# This file is bench/ray.py: its folder leaves the import path, so that `import ray` finds Ray.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def variant(job: tuple[Path, Path, int]) -> None:
    """Photo `source` cropped by a few pixels chosen by `k`, re-encoded as a JPEG at `target`."""
    source, target, k = job
    with Image.open(source) as image:
        rgb = image.convert("RGB")
    left, top, right, bottom = k % 5, (k // 5) % 5, k % 3, (k // 3) % 3
    rgb.crop((left, top, rgb.width - right, rgb.height - bottom)).save(target, quality=90)


def make_images(root: Path, n_images: int) -> list[Path]:
    from headstart.files import file_digest

    sources = list({file_digest(p): p for p in sorted(FLOWERS.rglob("*.jpg"), reverse=True)}.values())[::-1]  # one of each identical pair
    jobs = []
    for i in range(n_images):
        source, k = sources[i % len(sources)], i // len(sources)
        folder = root / source.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((source, folder / f"{source.stem}_{k}.jpg", k))
    with multiprocessing.get_context("fork").Pool() as pool:
        pool.map(variant, jobs, chunksize=64)
    return [target for _, target, _ in jobs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=20000)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to bench/results.md")
    args = parser.parse_args()

    import ray

    from headstart.backbone import create_backbone
    from headstart.cache import FeatureCache
    from headstart.cluster import Listing, extract_on_ray, ray_session
    from headstart.engine import create_engine
    from headstart.features import extract_features
    from headstart.files import file_digest

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        paths = make_images(Path(tmp) / "images", args.n_images)
        made = time.perf_counter() - started
        digests = [file_digest(p) for p in paths]
        assert len(set(digests)) == len(paths), "the images should all differ"
        backbone = create_backbone("efficientnet_lite0")
        engine = create_engine(backbone, cache_root=Path(tmp))  # exported once, outside the timings

        started = time.perf_counter()
        local = extract_features(engine, paths)
        local_s = time.perf_counter() - started
        assert len(local.kept) == len(paths)
        rows = [
            (
                "headstart, single process (decoding workers + ONNX Runtime sessions)",
                "-",
                f"{local_s:.0f}",
                f"{len(paths) / local_s:.0f}",
                "1.00",
            )
        ]

        listing = Listing.local(paths)
        per_cpu: dict[int, float] = {}
        worst = 0.0
        for cpus in args.cpus:
            started = time.perf_counter()
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
            init_s = time.perf_counter() - started
            cache = FeatureCache(Path(tmp) / f"cache-{cpus}", backbone)
            with ray_session() as n_cpus:
                started = time.perf_counter()
                result = extract_on_ray(backbone, listing, cache, Path(tmp), n_cpus)
                ray_s = time.perf_counter() - started
            ray.shutdown()
            assert result.n_extracted == len(paths) and not result.skipped
            features = cache.load(digests)
            worst = max(worst, max(float(np.abs(features[d] - row).max()) for d, row in zip(digests, local.features)))
            per_cpu[cpus] = len(paths) / ray_s
            rows.append(
                (
                    f"Ray Data, local, {cpus} CPU(s): {cpus} actor(s)",
                    f"{init_s:.1f}",
                    f"{ray_s:.0f}",
                    f"{per_cpu[cpus]:.0f}",
                    f"{local_s / ray_s:.2f}",
                )
            )

    lines = [*table(["engine", "ray.init s", "seconds", "images/s", "speed vs single process"], rows), ""]
    if 1 in per_cpu and 2 in per_cpu:
        lines.append(f"Ray from 1 to 2 CPUs: {per_cpu[2] / per_cpu[1]:.2f}x the images/s ({per_cpu[2] / 2:.0f} images/s per CPU at 2).")
    lines.append(
        f"{len(paths):,} distinct JPEGs (flowers cropped by up to 4 px and re-encoded at quality 90; made in {made:.0f} s), "
        f"efficientnet_lite0, no feature cache to start from. Features of every Ray run equal the single-process engine's "
        f"within {worst:.1e} (max |difference|). Load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after."
    )
    publish(f"ray: extract --ray on a local Ray vs the single-process engine, {len(paths):,} images", lines, record=not args.no_record)


if __name__ == "__main__":
    main()
