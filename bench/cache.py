"""The feature cache: a second training run on the same photos vs the first.

    .venv/bin/python bench/cache.py [DATA]

Trains the default model twice on the same folder with the same cache, in
this process (`headstart.train`, imports excluded) and as fresh CLI processes
(`headstart train --no-report`, imports included). The backbone is exported
to ONNX beforehand, so the first run is the cost of new photos. Prints a
table and appends it to bench/results.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from _common import FLOWERS, HEADSTART, publish, table

import headstart
import headstart.cache
from headstart.backbone import create_backbone
from headstart.engine import create_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?", default=FLOWERS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "api"
        create_engine(create_backbone("efficientnet_lite0"), "onnx", cache)
        seconds = []
        for _ in range(2):
            headstart.cache._remembered_sha256.cache_clear()  # every file hashed again: only the feature cache helps
            started = time.perf_counter()
            model = headstart.train(args.data, cache_dir=cache)
            seconds.append(time.perf_counter() - started)
        assert model.summary.n_extracted == 0
        rows.append(("`headstart.train` in one process", f"{seconds[0]:.1f}", f"{seconds[1]:.2f}", f"{seconds[1] / seconds[0]:.1%}"))

        env = {**os.environ, "HEADSTART_CACHE_DIR": str(Path(tmp) / "cli")}
        create_engine(create_backbone("efficientnet_lite0"), "onnx", Path(env["HEADSTART_CACHE_DIR"]))
        seconds = []
        for run in range(2):
            started = time.perf_counter()
            command = [str(HEADSTART), "train", str(args.data), "--out", f"{tmp}/model{run}", "--no-report"]
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
            seconds.append(time.perf_counter() - started)
        rows.append(("`headstart train` CLI, fresh process", f"{seconds[0]:.1f}", f"{seconds[1]:.2f}", f"{seconds[1] / seconds[0]:.1%}"))
    lines = [
        *table(["", "first run s", "second run s", "second / first"], rows),
        f"\n{args.data.name}, efficientnet_lite0 + linear head; the second run reads every feature from the cache (0 images through the "
        "backbone) and refits the head. The CLI's second run is mostly Python start-up and imports (torch, timm, ONNX Runtime).",
    ]
    publish(f"cache: {args.data.name}, second run vs first", lines)


if __name__ == "__main__":
    main()
