"""The feature cache's trust model: every vector sealed with the cache's key, its backbone and its image; a shard whose
vectors were shuffled, edited or brought in from another cache is discarded and its images extracted again."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from headstart.backbone import Backbone, create_backbone
from headstart.cache import FeatureCache
from headstart.seal import KEY_NAME


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return create_backbone("efficientnet_lite0")


def _vectors(n: int, width: int = 1280) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"{k:064x}": rng.standard_normal(width).astype(np.float32) for k in range(n)}


def _only_shard(cache: FeatureCache) -> Path:
    (shard,) = cache.directory.glob("*.safetensors")
    return shard


def test_stored_vectors_load_as_they_were_and_the_key_is_private(lite0: Backbone, tmp_path: Path) -> None:
    vectors = _vectors(3)
    FeatureCache(tmp_path, lite0).store(vectors)
    cache = FeatureCache(tmp_path, lite0)  # a later run: the same key
    loaded = cache.load(vectors)
    assert loaded.keys() == vectors.keys() and all(np.array_equal(loaded[d], v) for d, v in vectors.items())
    assert cache.digests() == set(vectors)
    assert stat.S_IMODE((tmp_path / KEY_NAME).stat().st_mode) == 0o600


def test_shuffled_vectors_in_a_shard_are_detected(lite0: Backbone, tmp_path: Path) -> None:
    vectors = _vectors(4)
    cache = FeatureCache(tmp_path, lite0)
    cache.store(vectors)
    shard = _only_shard(cache)
    with safe_open(shard, framework="numpy") as f:
        metadata = f.metadata()
    digests = list(vectors)
    shuffled = {d: vectors[digests[(k + 1) % len(digests)]] for k, d in enumerate(digests)}
    save_file(shuffled, shard, metadata=metadata)  # the same names and seals, each vector under another image's name
    assert cache.load(vectors) == {}
    assert not shard.exists()  # discarded: its images are extracted again


def test_a_vector_from_another_backbone_or_cache_is_not_trusted(lite0: Backbone, tmp_path: Path) -> None:
    vectors = _vectors(2)
    theirs = FeatureCache(tmp_path / "theirs", lite0)
    theirs.store(vectors)
    mine = FeatureCache(tmp_path / "mine", lite0)
    mine.directory.mkdir(parents=True)
    shutil.copy(_only_shard(theirs), mine.directory)
    assert mine.digests() == set(vectors)  # named, and sealed: but with the other cache's key
    assert mine.load(vectors) == {}
    other = create_backbone("efficientnet_lite0", layer=-2)  # another folder of the same cache
    moved = FeatureCache(tmp_path / "theirs", other)
    moved.directory.mkdir(parents=True)
    vectors = _vectors(2, other.n_features)
    theirs.store(vectors)
    shutil.move(next(p for p in theirs.directory.glob("*.safetensors") if set(vectors) <= _names(p)), moved.directory)
    assert moved.load(vectors) == {}


def _names(shard: Path) -> set[str]:
    with safe_open(shard, framework="numpy") as f:
        return set(f.keys())


def test_an_unsealed_shard_is_not_trusted(lite0: Backbone, tmp_path: Path) -> None:
    """As headstart wrote them before seals: such a shard is extracted again once."""
    vectors = _vectors(2)
    cache = FeatureCache(tmp_path, lite0)
    cache.directory.mkdir(parents=True)
    save_file(vectors, cache.directory / "old.safetensors")
    assert cache.digests() == set() and cache.load(vectors) == {}
