"""On-disk feature store: each image's pooled features, keyed by its content hash.

A cache folder belongs to one backbone (name, weights hash, preprocessing).
Features live in safetensors shards whose tensor names are the images' sha256
digests, so the shard headers are the index and a shard is never half-written.
An ensemble's backbones each use their own cache, so single-backbone runs and
ensemble runs share features.

The cache is the user's own, and trusted as their files are (see `seal`): each
vector is sealed, in its shard's metadata, with the cache's key, its backbone
and its image's digest. A shard holding a vector whose seal fails (shuffled,
edited, moved from another backbone, or brought in from another cache) is
deleted like a damaged one, and its images are extracted again.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from safetensors import safe_open
from safetensors.numpy import save as save_safetensors

from headstart.backbone import Backbone
from headstart.config import Progress
from headstart.data import Skipped
from headstart.engine import Engine, create_engine
from headstart.errors import FileRefusedError
from headstart.features import Extraction, extract_features
from headstart.files import atomic_write_bytes, file_digest
from headstart.seal import cache_key, is_sealed, seal

FEATURE_FORMAT = 2  # 2: large JPEGs decoded at reduced scale (see `pipeline.decode_input`)
SHARD_SIZE = 1024


def backbone_key(backbone: Backbone) -> str:
    """A short hash of everything that decides the cached features: the backbone and how images are decoded."""
    identity = {"format": FEATURE_FORMAT, "backbone": backbone.fingerprint()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


class FeatureCache:
    """The cached features of one backbone, under `root/features/<backbone_key>/`; each is float32 of shape (n_features,)."""

    def __init__(self, root: Path, backbone: Backbone) -> None:
        """Raises OSError when the cache's key can be neither read nor made (see `seal.cache_key`)."""
        self.directory = root / "features" / backbone_key(backbone)
        self.n_features = backbone.n_features
        self._key = cache_key(root)

    def load(self, digests: Iterable[str]) -> dict[str, NDArray[np.float32]]:
        """The cached features among `digests`.

        A damaged shard (unreadable, or holding a wanted tensor that is not finite float32 of
        shape (n_features,) or fails its seal) is deleted, and its images are extracted again.
        """
        wanted = set(digests)
        found: dict[str, NDArray[np.float32]] = {}
        for shard in sorted(self.directory.glob("*.safetensors")) if self.directory.is_dir() else []:
            try:
                with safe_open(shard, framework="numpy") as f:
                    seals = f.metadata() or {}
                    tensors = {key: f.get_tensor(key) for key in wanted.intersection(f.keys()).difference(found)}
            except Exception:  # a damaged shard is re-extracted, never fatal
                shard.unlink(missing_ok=True)
                continue
            if all(self._valid(t) and is_sealed(self._key, seals.get(d), *self._sealed(d, t)) for d, t in tensors.items()):
                found.update(tensors)
            else:
                shard.unlink(missing_ok=True)
        return found

    def digests(self) -> set[str]:
        """The digests of every sealed image in a readable shard, from the shard headers alone (no tensor is read, no seal checked)."""
        found: set[str] = set()
        for shard in sorted(self.directory.glob("*.safetensors")) if self.directory.is_dir() else []:
            try:
                with safe_open(shard, framework="numpy") as f:
                    found.update(set(f.keys()).intersection(f.metadata() or {}))
            except Exception:  # a damaged shard: `load` deletes it, and its images are extracted again
                continue
        return found

    def _valid(self, tensor: NDArray[np.float32]) -> bool:
        return tensor.shape == (self.n_features,) and tensor.dtype == np.float32 and bool(np.isfinite(tensor).all())

    def _sealed(self, digest: str, tensor: NDArray[np.float32]) -> tuple[bytes, bytes, bytes]:
        """What a vector's seal covers: its backbone (this folder), its image's digest, and its bytes."""
        return self.directory.name.encode(), digest.encode(), tensor.tobytes()

    def store(self, features: dict[str, NDArray[np.float32]]) -> None:
        """Write features as a new shard, atomically, each sealed."""
        if features:
            seals = {d: seal(self._key, *self._sealed(d, t)) for d, t in features.items()}
            atomic_write_bytes(self.directory / f"{uuid.uuid4().hex}.safetensors", save_safetensors(features, metadata=seals))


def _digests(paths: Sequence[Path]) -> tuple[dict[int, str], list[Skipped]]:
    """The digest of each readable file by its index, and the files that cannot be read at all."""
    digests: dict[int, str] = {}
    unreadable: list[Skipped] = []
    for i, path in enumerate(paths):
        try:
            digests[i] = file_digest(path)
        except FileRefusedError as e:  # a FIFO, a device, a file too large
            unreadable.append(Skipped(path, e.reason))
        except OSError as e:  # a vanished file, a symlink loop, no permission
            unreadable.append(Skipped(path, e.strerror or str(e)))
    return digests, unreadable


@dataclass(frozen=True)
class CachedExtraction(Extraction):
    """An `Extraction` that also says how many images ran through the backbone."""

    n_extracted: int
    n_cached: int


@dataclass(frozen=True)
class ExtractSummary:
    """What `headstart extract` left in the feature cache.

    Attributes:
        backbone: the backbone's name (an ensemble's members joined by '+': each has its own cache folder).
        directories: the cache folder of each backbone, in member order.
        n_images: the image files found.
        n_extracted: images run through a backbone (the most any member ran).
        n_cached: images whose features were cached already (the fewest any member found).
        n_copies: images run through no backbone because they are byte-for-byte copies of another image of this run.
        skipped: the files left out, and why.
        seconds: how long it took.
        n_cpus: the CPUs that computed the features (this machine's, or the Ray cluster's).
        ray: whether they were computed on Ray.
    """

    backbone: str
    directories: tuple[Path, ...]
    n_images: int
    n_extracted: int
    n_cached: int
    n_copies: int
    skipped: list[Skipped]
    seconds: float
    n_cpus: int
    ray: bool


def extract_with_cache(
    backbone: Backbone,
    paths: Sequence[Path],
    cache: FeatureCache | None,
    batch_size: int = 32,
    progress: Progress | None = None,
    make_engine: Callable[[Backbone], Engine] = create_engine,
) -> CachedExtraction:
    """Features for `paths`, running the backbone only on images the cache lacks.

    The engine is made only when some image needs it. New features are stored
    every `SHARD_SIZE` images, so an interrupted run keeps what it finished.
    """
    if cache is None:
        result = extract_features(make_engine(backbone), paths, batch_size, progress)
        return CachedExtraction(result.features, result.kept, result.skipped, len(result.kept), 0)
    digests, unreadable = _digests(paths)
    known = cache.load(digests.values())
    n_cached = sum(d in known for d in digests.values())
    missing = list(dict.fromkeys(d for d in digests.values() if d not in known))
    first_path = {d: paths[i] for i, d in reversed(digests.items())}
    bad: dict[str, str] = {}
    n_extracted = 0
    engine: Engine | None = None
    for start in range(0, len(missing), SHARD_SIZE):
        chunk = missing[start : start + SHARD_SIZE]

        def chunk_progress(desc: str, done: int, total: int, status: str = "", /, offset: int = start) -> None:
            if progress:
                progress(desc, offset + done, len(missing), status)

        chunk_paths = [first_path[d] for d in chunk]
        engine = engine or make_engine(backbone)
        result = extract_features(engine, chunk_paths, batch_size, chunk_progress)
        new = {chunk[i]: row for i, row in zip(result.kept, result.features)}
        cache.store(new)
        known.update(new)
        n_extracted += len(new)
        digest_of = dict(zip(chunk_paths, chunk))
        bad.update({digest_of[s.path]: s.reason for s in result.skipped})
    kept = [i for i, d in digests.items() if d in known]
    skipped = unreadable + [Skipped(paths[i], bad[d]) for i, d in digests.items() if d in bad]
    features = np.stack([known[digests[i]] for i in kept]) if kept else np.zeros((0, backbone.n_features), np.float32)
    return CachedExtraction(features, np.asarray(kept, dtype=np.int64), skipped, n_extracted, n_cached)


def extract_members_with_cache(
    backbones: Sequence[Backbone],
    paths: Sequence[Path],
    caches: Sequence[FeatureCache | None],
    batch_size: int = 32,
    progress: Progress | None = None,
    make_engine: Callable[[Backbone], Engine] = create_engine,
) -> CachedExtraction:
    """`extract_with_cache` for each of an ensemble's backbones (each with its own cache, and its own preprocessing).

    Features are concatenated in member order, shape (len(kept), sum of n_features); an
    image is kept only if every backbone could read it. `n_extracted` is the most images
    any backbone ran on, `n_cached` the fewest any found in its cache.
    """
    if len(backbones) != len(caches):
        raise ValueError(f"{len(backbones)} backbones for {len(caches)} caches")
    results = [
        extract_with_cache(b, paths, c, batch_size, _named(progress, b.name) if len(backbones) > 1 else progress, make_engine)
        for b, c in zip(backbones, caches, strict=True)
    ]
    if len(results) == 1:
        return results[0]
    rows = [dict(zip(r.kept.tolist(), range(len(r.kept)))) for r in results]
    kept = [i for i in rows[0] if all(i in row for row in rows[1:])]
    features = np.concatenate([r.features[[row[i] for i in kept]] for r, row in zip(results, rows)], axis=1)
    reasons: dict[Path, str] = {}
    for r in results:
        for s in r.skipped:
            reasons.setdefault(s.path, s.reason)
    skipped = [Skipped(path, reasons[path]) for path in dict.fromkeys(paths) if path in reasons]
    return CachedExtraction(
        features.astype(np.float32, copy=False),
        np.asarray(kept, dtype=np.int64),
        skipped,
        max(r.n_extracted for r in results),
        min(r.n_cached for r in results),
    )


def _named(progress: Progress | None, name: str) -> Progress | None:
    """`progress` with `name` added to each description: one bar per backbone."""
    if progress is None:
        return None
    report = progress

    def named(desc: str, done: int, total: int, status: str = "", /) -> None:
        report(f"{desc} ({name})", done, total, status)

    return named
