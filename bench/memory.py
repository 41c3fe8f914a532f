"""Peak memory while extracting features from many images: it must not grow with their number.

    .venv/bin/python bench/memory.py [DATA] [--counts 2000 20000]

Each count runs in a fresh process: the flower files repeated under their own
paths up to that many images, through headstart's default pipeline and engine
(no feature cache, so every image is decoded and run). Reports the peak
resident memory of the main process and of the decoding workers. Prints a
table and appends it to bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import FLOWERS, publish, table


def child(data: Path, count: int) -> None:
    from headstart.backbone import create_backbone
    from headstart.engine import create_engine
    from headstart.features import extract_features

    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    paths = [files[i % len(files)] for i in range(count)]
    engine = create_engine(create_backbone("efficientnet_lite0"))
    started = time.perf_counter()
    result = extract_features(engine, paths)
    seconds = time.perf_counter() - started
    kib = 1024  # ru_maxrss is in KiB on Linux
    print(
        json.dumps(
            {
                "rows": len(result.kept),
                "seconds": seconds,
                "main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
                "workers_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib,
                "features_mib": result.features.nbytes / 2**20,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?", default=FLOWERS)
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.data, args.child)

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "HEADSTART_CACHE_DIR": cache}
        subprocess.run(
            [sys.executable, __file__, str(args.data), "--child", "1"], check=True, env=env, stdout=subprocess.DEVNULL
        )  # export once
        for count in args.counts:
            out = subprocess.run(
                [sys.executable, __file__, str(args.data), "--child", str(count)], check=True, env=env, capture_output=True, text=True
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert r["rows"] == count
            rows.append(
                (
                    count,
                    f"{r['seconds']:.0f}",
                    f"{count / r['seconds']:.0f}",
                    f"{r['main_mib']:.0f}",
                    f"{r['workers_mib']:.0f}",
                    f"{r['features_mib']:.0f}",
                )
            )
    lines = [
        *table(["images", "seconds", "images/s", "peak RSS main MiB", "peak RSS per worker MiB", "of which the features array MiB"], rows),
        f"\n{args.data.name} files repeated; efficientnet_lite0, default engine and pipeline, no feature cache. The main process holds the "
        "model, the engine sessions, a fixed number of decoded batches, and the growing (n, 1280) float32 feature array.",
    ]
    publish("memory: extraction peak RSS", lines)


if __name__ == "__main__":
    main()
