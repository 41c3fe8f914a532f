"""kill -9 at random points of feature extraction and of fine-tuning: the rerun completes, equals an uninterrupted run, and no half-written file is ever left to be read."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import headstart
from conftest import FLOWERS_TINY, copy_flowers

pytestmark = pytest.mark.kill

# Training in a child process, with small cache shards so that kills land between shard writes too.
TRAIN = """
import sys
import headstart, headstart.cache
headstart.cache.SHARD_SIZE = 16
headstart.train(sys.argv[1], cache_dir=sys.argv[2], out=sys.argv[3], report=False)
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 flower photos, 32 per class."""
    return copy_flowers(tmp_path_factory.mktemp("kill") / "flowers", per_class=32)


def _kill_when(command: list[str], ready: Callable[[], bool], jitter: float) -> bool:
    """Run `command`, SIGKILL it `jitter` seconds after `ready()` first holds; True if it was still running then.

    Kills are tied to the run's progress rather than to wall time, so they land
    mid-run however fast or slow the machine is.
    """
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not ready():
        time.sleep(0.01)
    try:
        process.wait(timeout=jitter)
        return False
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        return True


def _written(folder: Path, pattern: str, at_least: int = 1) -> Callable[[], bool]:
    """Whether `folder` holds at least `at_least` files matching `pattern`."""
    return lambda: folder.exists() and sum(1 for _ in folder.rglob(pattern)) >= at_least


def _assert_every_file_complete(*folders: Path) -> None:
    """Every safetensors and JSON file parses in full (temporary files are never read by headstart)."""
    for folder in folders:
        for path in folder.rglob("*.safetensors"):
            with safe_open(path, framework="numpy") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    f.get_tensor(key)
        for path in folder.rglob("*.json"):
            json.loads(path.read_text())


def test_extraction_killed_at_random_points_resumes_to_the_same_model(photos: Path, tmp_path: Path) -> None:
    reference_out = tmp_path / "reference"
    subprocess.run(
        [sys.executable, "-c", TRAIN, str(photos), str(tmp_path / "reference-cache"), str(reference_out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    reference = headstart.load(reference_out)
    rng = random.Random(5)
    paths = sorted(photos.rglob("*.jpg"))[::8]
    # 160 images in shards of 16: kill early, midway and late in extraction, at a random moment after the k-th shard.
    for trial, shards in enumerate([rng.randint(1, 3), rng.randint(4, 6), rng.randint(7, 8)]):
        cache, out = tmp_path / f"cache{trial}", tmp_path / f"model{trial}"
        command = [sys.executable, "-c", TRAIN, str(photos), str(cache), str(out)]
        ready = _written(cache, "*.safetensors", at_least=shards)
        assert _kill_when(command, ready, rng.uniform(0, 0.2)), "the kill should land while the run is going"
        _assert_every_file_complete(cache, out)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        model = headstart.load(out)
        assert model.summary.n_cached >= shards * 16
        assert model.summary.n_extracted + model.summary.n_cached == 160
        np.testing.assert_allclose(model.predict_proba(paths), reference.predict_proba(paths), atol=1e-4)


def test_finetuning_killed_at_random_points_resumes_to_the_same_model(tmp_path: Path) -> None:
    def command(out: Path, cache: Path) -> list[str]:
        return [sys.executable, "-m", "headstart.cli.main", "train", str(FLOWERS_TINY), "--strategy", "finetune", "--epochs", "2",
                "--unfreeze", "1", "--out", str(out), "--cache-dir", str(cache), "--no-report"]  # fmt: skip

    subprocess.run(command(tmp_path / "reference", tmp_path / "reference-cache"), check=True, stdout=subprocess.DEVNULL)
    reference = headstart.load(tmp_path / "reference")
    rng = random.Random(7)
    paths = sorted(FLOWERS_TINY.rglob("*.jpg"))[::4]
    # Kill after the features are cached (head phase), and after the first fine-tuning checkpoint (kills during
    # extraction are the test above's).
    for trial, stage in enumerate(["features", "checkpoint"]):
        out, cache = tmp_path / f"tuned{trial}", tmp_path / f"cache{trial}"
        ready = {"features": _written(cache, "*.safetensors"), "checkpoint": _written(out / ".checkpoint", "checkpoint.json")}[stage]
        jitter = rng.uniform(0, 0.5)
        assert _kill_when(command(out, cache), ready, jitter), f"the kill at stage {stage!r} should land while the run is going"
        _assert_every_file_complete(out, cache)
        checkpoint = out / ".checkpoint" / "checkpoint.json"
        if stage == "checkpoint":  # killed after epoch 1: its checkpoint names a tensor file that is there, beside a saved model
            assert (checkpoint.parent / json.loads(checkpoint.read_text())["tensors"]).is_file()
            assert (out / "bundle.json").exists()
        if (out / "bundle.json").exists():
            headstart.load(out)  # the best-so-far model saved before the kill loads
        resume = ["--resume"] if checkpoint.exists() else []
        subprocess.run([*command(out, cache), *resume], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        model = headstart.load(out)
        assert [r["phase"] for r in model.summary.history].count("finetune") == 2
        assert not (out / ".checkpoint").exists()
        np.testing.assert_allclose(model.predict_proba(paths), reference.predict_proba(paths), atol=1e-4)
