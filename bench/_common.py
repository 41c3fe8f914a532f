"""What every benchmark script shares: the machine line, a Markdown table, appending to results.md."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.md"
FLOWERS = REPO.parent / "shared" / "datasets" / "flowers"
HEADSTART = Path(sys.executable).with_name("headstart")


def machine() -> str:
    """Date, commit, processor and the cores this process may use."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = "+uncommitted" if subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO).returncode else ""
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.machine())
    return f"{datetime.date.today()}, commit {commit}{dirty}, {cpu}, {len(os.sched_getaffinity(0))} cores"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A Markdown table."""
    return [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}", *(f"| {' | '.join(map(str, row))} |" for row in rows)]


def publish(title: str, lines: Sequence[str], record: bool = True) -> None:
    """Print a section and, with `record`, append it to bench/results.md."""
    text = "\n".join([f"\n## {title}", machine() + "\n", *lines])
    print(text)
    if record:
        with RESULTS.open("a") as f:
            f.write(text + "\n")
