"""The image pipeline: decoding in worker processes, bounded memory, reduced-scale JPEG decoding, CPU count."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import FLOWERS_TINY, ODD_FILES, PHOTOS
from headstart.backbone import create_backbone
from headstart.config import DataConfig
from headstart.data import load_image
from headstart.pipeline import cgroup_cpu_quota, decode_batches, decode_input
from headstart.transforms import preprocess

CFG = DataConfig(input_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_batches_come_back_in_order_with_unreadable_files_skipped(tmp_path: Path) -> None:
    paths = sorted(FLOWERS_TINY.glob("*/*.jpg"))[:10]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths.insert(3, broken)
    batches = list(decode_batches(paths, CFG, batch_size=4, workers=2))
    assert [i for b in batches for i in b.indices] == [i for i in range(len(paths)) if i != 3]
    assert [s.path for b in batches for s in b.skipped] == [broken]
    arrays = np.concatenate([b.arrays for b in batches])
    assert arrays.shape == (10, 3, 224, 224) and arrays.dtype == np.float32
    expected = np.stack([preprocess(load_image(p), CFG) for p in paths if p != broken])
    np.testing.assert_array_equal(arrays, expected)  # same pixels as the single-image reference path


def test_at_most_max_in_flight_batches_are_decoded_ahead_of_the_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    submitted = [0]

    class CountingPool(ProcessPoolExecutor):
        def submit(self, *args: Any, **kwargs: Any) -> Any:
            submitted[0] += 1
            return super().submit(*args, **kwargs)

    monkeypatch.setattr("headstart.pipeline.ProcessPoolExecutor", CountingPool)
    paths = sorted(FLOWERS_TINY.glob("*/*.jpg")) * 3  # 120 images, 60 batches of 2
    ahead = []
    for consumed, _ in enumerate(decode_batches(paths, CFG, batch_size=2, workers=1, max_in_flight=3), start=1):
        ahead.append(submitted[0] - consumed)
    assert len(ahead) == 60 and submitted[0] == 60
    assert max(ahead) <= 3  # memory holds a fixed number of batches, however many images there are
    assert ahead[0] == 3  # it does run ahead: three batches decode while the first is used


def _jpeg(path: Path, size: tuple[int, int]) -> Path:
    photo = Image.open(PHOTOS / "kite.jpg").convert("RGB").resize(size, Image.Resampling.BICUBIC)
    photo.save(path, quality=92)
    return path


def test_large_jpegs_decode_at_reduced_scale_keeping_twice_the_resize_size(tmp_path: Path) -> None:
    big = _jpeg(tmp_path / "big.jpg", (3000, 2000))
    assert load_image(big).size == (3000, 2000)
    assert load_image(big, min_size=512).size == (1500, 1000)  # 1/2 scale; 1/4 would leave 500 < 512
    cfg = create_backbone("efficientnet_lite0").data_config
    reduced, full = decode_input(big, cfg), decode_input(big, cfg, reduced_decode=False)
    assert reduced.shape == full.shape == (224, 224, 3)
    assert 0 < np.abs(reduced.astype(int) - full.astype(int)).mean() < 2  # slightly different pixels, same picture


@pytest.mark.parametrize("name", ["kite.jpg", "dog.jpg", "sk_chelsea.png"])
def test_images_below_four_times_the_resize_size_decode_exactly(name: str) -> None:
    path = PHOTOS / name
    np.testing.assert_array_equal(decode_input(path, CFG), decode_input(path, CFG, reduced_decode=False))


def test_odd_files_decode_the_same_in_worker_processes() -> None:
    paths = sorted(p for p in ODD_FILES.iterdir() if p.is_file())
    batches = list(decode_batches(paths, CFG, batch_size=2, workers=2))
    inline = list(decode_batches(paths, CFG, batch_size=len(paths)))  # one batch: decoded in this process
    assert [i for b in batches for i in b.indices] == inline[0].indices
    assert [s.path for b in batches for s in b.skipped] == [s.path for s in inline[0].skipped]
    np.testing.assert_array_equal(np.concatenate([b.arrays for b in batches]), inline[0].arrays)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path: Path, files: dict[str, str], expected: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == expected
