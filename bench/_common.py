"""What every benchmark script shares: the machine line, a Markdown table, appending to results.md, cached features."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def cached_features(data: Path, backbone: str = "efficientnet_lite0") -> tuple[list[Any], Any, int]:
    """The readable images of `data` (train and val together), their features (an ensemble's concatenated) and how many ran
    through a backbone, from headstart's feature cache (filled on first use)."""
    from headstart.backbone import create_backbones
    from headstart.cache import FeatureCache, extract_members_with_cache
    from headstart.config import default_cache_dir
    from headstart.data import load_dataset
    from headstart.engine import create_engine

    dataset = load_dataset(data, val_split=0.0)
    records = dataset.train + dataset.val
    root = default_cache_dir()
    nets = create_backbones(backbone, cache_root=root)
    extraction = extract_members_with_cache(
        nets, [r.path for r in records], [FeatureCache(root, n) for n in nets], 64, None, lambda b: create_engine(b, cache_root=root)
    )
    return [records[i] for i in extraction.kept.tolist()], extraction.features, extraction.n_extracted
