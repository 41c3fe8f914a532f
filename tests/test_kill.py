"""kill -9 at random points of feature extraction and of training: the rerun completes, equals an uninterrupted run, and never reads a half-written file."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import headstart
from conftest import SHARED

TRIALS = 3
# Extraction in a child process, with small cache shards so a kill lands between shard writes.
EXTRACT = """
import sys
import headstart, headstart.cache
headstart.cache.SHARD_SIZE = 16
headstart.train(sys.argv[1], cache_dir=sys.argv[2], out=sys.argv[3], write_report=False)
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 flower photos, 32 per class."""
    root = tmp_path_factory.mktemp("kill") / "flowers"
    for folder in sorted((SHARED / "datasets" / "flowers").iterdir()):
        (root / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:32]:
            shutil.copy(path, root / folder.name / path.name)
    return root


def _run_and_kill(command: list[str], delay: float) -> bool:
    """Start `command`, SIGKILL it after `delay` seconds; True if it was still running when killed."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        return True


def _assert_no_half_files(*folders: Path) -> None:
    """Every safetensors and JSON file is complete (temporary files may remain; they are never read)."""
    for folder in folders:
        for path in folder.rglob("*.safetensors"):
            with safe_open(path, framework="numpy") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    f.get_tensor(key)
        for path in folder.rglob("*.json"):
            import json

            json.loads(path.read_text())


def test_extraction_killed_at_random_points_resumes_to_the_same_model(photos: Path, tmp_path: Path) -> None:
    reference = headstart.train(photos, cache_dir=tmp_path / "reference-cache")
    rng = random.Random(5)
    cache, out = tmp_path / "cache", tmp_path / "model"
    killed = 0
    for _ in range(TRIALS):
        killed += _run_and_kill([sys.executable, "-c", EXTRACT, str(photos), str(cache), str(out)], rng.uniform(4.0, 9.0))
        _assert_no_half_files(cache, out)
        if (out / "bundle.json").exists():
            headstart.load(out)
    assert killed >= 2, "the kills should land while the run is going"
    subprocess.run([sys.executable, "-c", EXTRACT, str(photos), str(cache), str(out)], check=True)
    model = headstart.load(out)
    assert model.summary["n_extracted"] + model.summary["n_cached"] == 160
    paths = sorted(photos.rglob("*.jpg"))[::8]
    np.testing.assert_allclose(model.predict_proba(paths), reference.predict_proba(paths), atol=1e-4)


def test_finetuning_killed_at_random_points_resumes_to_completion(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "tuned"
    command = [sys.executable, "-m", "headstart.cli.main", "train", str(photos), "--strategy", "finetune", "--epochs", "2",
               "--unfreeze", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-report"]  # fmt: skip
    rng = random.Random(7)
    killed = 0
    for _ in range(TRIALS):
        if (out / ".checkpoint").exists() or not (out / "bundle.json").exists():
            killed += _run_and_kill([*command, "--resume"] if (out / ".checkpoint").exists() else command, rng.uniform(8.0, 20.0))
        _assert_no_half_files(out, tmp_path / "cache")
        if (out / "bundle.json").exists():
            headstart.load(out)  # whatever was saved before the kill loads
    assert killed >= 2
    resume = ["--resume"] if (out / ".checkpoint").exists() else []
    subprocess.run([*command, *resume], check=True, stdout=subprocess.DEVNULL)
    model = headstart.load(out)
    assert [r["phase"] for r in model.summary["history"]].count("finetune") == 2
    assert not (out / ".checkpoint").exists()
