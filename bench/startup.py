"""Start-up: the wall time of each command as a fresh process, against `python -c "import torch"` and `python -c pass`.

    .venv/bin/python bench/startup.py [--data DATA] [--runs N] [--no-record]

Each command runs once untimed (warm disk cache, ONNX export, features in
the cache), then N times (default 3) as a fresh process; the table gives the
median. `predict` uses the frozen-backbone model tests/fixtures/model_v2 with
its backbone already exported to ONNX; `train` runs on DATA (default: the
flowers dataset) with every feature already cached, into a new --out folder
each time, without and with its HTML report. The cache is a temporary
HEADSTART_CACHE_DIR. Prints a table and appends it to bench/results.md
(--no-record: print only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from _common import FLOWERS, HEADSTART, REPO, publish, table

MODEL = REPO / "tests" / "fixtures" / "model_v2"  # efficientnet_lite0, frozen, with a linear head
CATS_DOGS_TINY = REPO.parent / "shared" / "fixtures" / "cats_dogs_tiny"
PHOTO = CATS_DOGS_TINY / "val" / "cats" / "cat.4001.jpg"


def seconds(command: Sequence[str | Path], env: dict[str, str]) -> float:
    """Wall time of one fresh process; a failure stops the benchmark with the command's error output."""
    started = time.perf_counter()
    done = subprocess.run(list(map(str, command)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return elapsed


def median_of(make: Callable[[int], Sequence[str | Path]], runs: int, env: dict[str, str]) -> tuple[float, list[float]]:
    """`make(0)` once untimed, then the median of `make(1)`..`make(runs)` (a new command each run: new --out folders)."""
    seconds(make(0), env)
    times = [seconds(make(run), env) for run in range(1, runs + 1)]
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=FLOWERS, help="the dataset `train` runs on [default: flowers]")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print the table without appending it to bench/results.md")
    args = parser.parse_args()
    python, headstart = sys.executable, str(HEADSTART)
    train = [headstart, "train", args.data]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        env = {**os.environ, "HEADSTART_CACHE_DIR": str(out / "cache"), "NO_COLOR": "1"}
        commands: dict[str, Callable[[int], Sequence[str | Path]]] = {
            "`python -c pass`": lambda run: [python, "-c", "pass"],
            '`python -c "import torch"`': lambda run: [python, "-c", "import torch"],
            "`headstart --help`": lambda run: [headstart, "--help"],
            "`headstart info MODEL`": lambda run: [headstart, "info", MODEL],
            f"`headstart check {CATS_DOGS_TINY.name}`": lambda run: [headstart, "check", CATS_DOGS_TINY],
            "`headstart predict MODEL one.jpg`": lambda run: [headstart, "predict", MODEL, PHOTO],
            f"`headstart train {args.data.name} --no-report`": lambda run: [*train, "--no-report", "--out", out / f"plain{run}"],
            f"`headstart train {args.data.name}` (report)": lambda run: [*train, "--out", out / f"report{run}"],
        }
        results = {}
        for name, make in commands.items():
            print(f"{name} ...", flush=True)
            results[name] = median_of(make, args.runs, env)
    nothing, torch = results["`python -c pass`"][0], results['`python -c "import torch"`'][0]
    rows = [
        (name, f"{median:.2f}", " / ".join(f"{t:.2f}" for t in times), f"{median / torch:.2f}", f"{median / nothing:.0f}")
        for name, (median, times) in results.items()
    ]
    plain, report = (results[name][0] for name in list(results)[-2:])
    lines = [
        *table(["command", "median s", "runs s", "/ import torch", "/ python -c pass"], rows),
        f"\nFresh processes, median of {args.runs} after one untimed run each; the backbone already exported to ONNX and every "
        f"{args.data.name} feature already cached. The report adds {report - plain:.1f} s to `train`. "
        "A command at or above 1.00x `import torch` pays for importing torch.",
    ]
    title = f"startup: cold-process wall time per command ({args.data.name})"
    publish(title, lines, record=not args.no_record)


if __name__ == "__main__":
    main()
