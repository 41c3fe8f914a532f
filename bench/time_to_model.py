"""Time from a photo folder to a saved model: headstart's default vs the Keras recipe of the reference tutorials.

    .venv/bin/python bench/time_to_model.py [DATA] [--keras-python PYTHON]

The Keras recipe (bench/keras_recipe.py) runs in its own virtual environment
with tensorflow-cpu (created at bench/.venv-keras on first use). Both sides
are timed as fresh processes, imports included, each after reading the photos
and importing its framework once (warm disk cache). headstart's default (with its
HTML report) is timed on an empty cache (the one-time ONNX export included)
and on new photos with the backbone already exported; then without the report. Prints a table and
appends it to bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import FLOWERS, HEADSTART, REPO, publish, table

KERAS_VENV = REPO / "bench" / ".venv-keras"
TENSORFLOW = "tensorflow-cpu==2.21.0"


def keras_python(given: Path | None) -> Path:
    if given:
        return given
    python = KERAS_VENV / "bin" / "python"
    if not python.exists():
        print(f"Creating {KERAS_VENV} with {TENSORFLOW} (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(KERAS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", TENSORFLOW], check=True)
    return python


def warm_up(python: Path, data: Path) -> None:
    """Read the photos and import the framework once, so neither side pays for a cold disk cache."""
    for path in data.rglob("*"):
        if path.is_file():
            path.read_bytes()
    framework = "tensorflow" if python != Path(sys.executable) else "headstart.api"
    subprocess.run([str(python), "-c", f"import {framework}"], check=True, capture_output=True)


def headstart_run(data: Path, cache: Path, out: Path, report: bool) -> tuple[float, float]:
    """Seconds for `headstart train` in a fresh process, and the validation accuracy it saved."""
    command = [str(HEADSTART), "train", str(data), "--out", str(out), "--report" if report else "--no-report"]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HEADSTART_CACHE_DIR": str(cache)}, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    return seconds, json.loads((out / "metrics.json").read_text())["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?", default=FLOWERS)
    parser.add_argument("--keras-python", type=Path, help="a Python with tensorflow-cpu [default: bench/.venv-keras]")
    args = parser.parse_args()
    python = keras_python(args.keras_python)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm_up(python, args.data)
        started = time.perf_counter()
        keras = subprocess.run(
            [str(python), str(REPO / "bench" / "keras_recipe.py"), str(args.data), str(root / "keras.keras")],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        keras_seconds = time.perf_counter() - started
        keras_accuracy = json.loads(keras.stdout.strip().splitlines()[-1])["val_accuracy"]

        warm_up(Path(sys.executable), args.data)
        cold = headstart_run(args.data, root / "cache", root / "cold", report=True)
        shutil.rmtree(root / "cache" / "features")  # new photos; the exported backbone stays
        new_data = headstart_run(args.data, root / "cache", root / "new", report=True)
        shutil.rmtree(root / "cache" / "features")
        no_report = headstart_run(args.data, root / "cache", root / "no-report", report=False)

    def row(name: str, seconds: float, accuracy: float) -> tuple[str, str, str, str]:
        return name, f"{seconds:.1f}", f"{accuracy:.3f}", f"{keras_seconds / seconds:.1f}"

    rows = [
        row("Keras recipe: MobileNetV2 frozen + Dense, fit 6 epochs (random weights*)", keras_seconds, keras_accuracy),
        row("headstart train, empty cache (includes one-time ONNX export)", *cold),
        row("**headstart train, new photos (backbone exported before)**", *new_data),
        row("headstart train --no-report, new photos", *no_report),
    ]
    lines = [
        *table(["", "seconds", "val accuracy", "speed-up"], rows),
        f"\n{args.data.name}, 80/20 split, each a fresh process (imports included); headstart default: efficientnet_lite0 + linear head, HTML report. "
        "*No ImageNet weights for Keras' MobileNetV2 exist offline, so its accuracy here is that of random features; "
        "its time is the same as with pretrained weights (the reference tutorial reports about 0.90 on flowers with them).",
    ]
    publish(f"time-to-model: {args.data.name}", lines)


if __name__ == "__main__":
    main()
