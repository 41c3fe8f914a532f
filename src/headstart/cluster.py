"""Feature extraction and batch prediction on a Ray cluster (Ray Data), for more images than one machine gets through in time.

The driver (the process that runs `headstart extract --ray` or `predict --ray`) lists the images
and Ray Data streams their locations, one block per batch, through a pool of actors (`map_batches`
with a callable class, one CPU each). Each actor loads the backbone's ONNX engine once, reads each
file with headstart's bounded reads (a local or shared folder) or through pyarrow's filesystems
(`s3://`, `gs://`, ...), hashes it, decodes it with headstart's own decoding and runs headstart's
engine: the features are those a local run computes, keyed by the same sha256. They stream back to
the driver, which writes them into its feature cache as shards of `cache.SHARD_SIZE` images, each
written atomically (an interrupted run keeps every shard it finished, and the next run skips those
images), or turns them into predictions. Ray retries the batch of an actor that dies on a new actor,
and the driver stores each digest once. Only this module imports Ray, and only when one of its
functions runs: the core install does not need it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from headstart import cache as feature_cache
from headstart.backbone import Backbone
from headstart.cache import FeatureCache
from headstart.config import Progress
from headstart.data import IMAGE_EXTENSIONS, MAX_FILE_BYTES, Skipped
from headstart.errors import ClusterError, ConfigError, DataError, FileRefusedError, UnreadableImageError
from headstart.files import display, read_bounded, read_regular
from headstart.pipeline import available_cpus

if TYPE_CHECKING:
    import pyarrow
    import pyarrow.fs

    from headstart.model import Model, Prediction, UnknownOption

BATCH_SIZE = 64  # images per Ray task: large enough that Ray's per-task cost (milliseconds) is small beside the work (about a second)
TASKS_PER_CPU = 4  # fewer images than BATCH_SIZE x this per CPU are cut into smaller batches, so that every CPU has work
READ_AHEAD = 8  # files each actor reads at once: object stores answer each request in tens of milliseconds
REACH_SECONDS = 30  # for a URI's storage to say what is at the URI, and for a Ray cluster's address to answer as Ray does
GCS_RETRY_SECONDS = 15  # for Google Cloud Storage's client to retry a request (its default, 15 minutes, looks like a hang)
REASON_CHARS = 200  # of a storage's reason in a one-line error (Google Cloud Storage's run to a thousand)
INSTALL_HINT = "pip install 'headstart[ray]'"
# What an HTTP/2 client sends first: the connection preface, then an empty SETTINGS frame (RFC 9113, 3.4). Ray's cluster
# (its GCS at HOST:PORT, its Ray Client server at ray://HOST:PORT) is a gRPC server, which answers with a SETTINGS frame.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
HTTP2_FRAME_HEADER = 9  # bytes; the frame's type is the fourth
HTTP2_SETTINGS = 4  # the type of a SETTINGS frame

_T = TypeVar("_T")


def import_ray() -> ModuleType:
    """The `ray` package with Ray Data.

    Raises:
        ConfigError: Ray is not installed (the message says how to install it).
    """
    try:
        import ray
        import ray.data  # noqa: F401 (Ray Data is the part used; it needs pyarrow and pandas)
    except ImportError as e:
        raise ConfigError(f"Running on Ray needs ray[data], which is not installed ({e.name or e}): {INSTALL_HINT}") from None
    return ray


def is_uri(location: str) -> bool:
    """Whether `location` names a pyarrow filesystem object (`s3://bucket/photos`, `gs://...`, `file:///...`) rather than a local path."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.isascii() and scheme.replace("+", "").isalnum() and not Path(location).exists()


LOCAL = -1  # `Listing.sources` of a local path


@dataclass(frozen=True)
class Store:
    """A pyarrow filesystem that a URI named: objects are read through it by their path in it.

    Attributes:
        uri: the URI as given, without its query and trailing slash; an object is reported as this, `/`, and its path below `root`.
        filesystem: the filesystem (`S3FileSystem`, `GcsFileSystem`, ...), which each Ray actor receives once.
        root: the URI's path in `filesystem`.
    """

    uri: str
    filesystem: pyarrow.fs.FileSystem
    root: str


@dataclass(frozen=True)
class Listing:
    """Image locations in order, and the inputs that named nothing.

    Attributes:
        locations: local paths (as `os.fsdecode` gives them), or objects' paths in their store's filesystem.
        sources: for each location, the index of its store in `stores`, or `LOCAL`.
        missing: the inputs that named nothing.
        stores: the filesystems of the URIs listed.
    """

    locations: list[str]
    sources: list[int]
    missing: list[Skipped]
    stores: list[Store] = dataclasses.field(default_factory=list)

    @classmethod
    def local(cls, paths: Sequence[str | os.PathLike[str]]) -> Listing:
        """Local paths only."""
        return cls([os.fspath(p) for p in paths], [LOCAL] * len(paths), [])

    def path(self, k: int) -> Path:
        """How location `k` is reported (a URI's `//` shows as `/`)."""
        source = self.sources[k]
        if source == LOCAL:
            return Path(self.locations[k])
        store = self.stores[source]
        relative = self.locations[k][len(store.root) :].lstrip("/")
        return Path(f"{store.uri}/{relative}" if relative else store.uri)


def list_inputs(inputs: Sequence[str | os.PathLike[str]]) -> Listing:
    """Expand local files and folders (as `data.list_images` does) and URIs into image locations, in the given order.

    A `file://` URI is listed, and read, as the local path it names (symlinked folders are not followed, so each file
    is listed once). Elsewhere (`s3://`, `gs://`, ...) the objects with image extensions under the URI, or the object
    it names, are listed, recursively, sorted, hidden names left out.

    Raises:
        DataError: a URI cannot be listed (unknown scheme, no credentials, not found), or its storage gave no answer
            within `REACH_SECONDS`.
    """
    import pyarrow.fs

    from headstart.data import list_images

    locations: list[str] = []
    sources: list[int] = []
    missing: list[Skipped] = []
    stores: list[Store] = []
    for item in inputs:
        store, kind = _reach(item) if isinstance(item, str) and is_uri(item) else (None, None)
        if store is None or isinstance(store.filesystem, pyarrow.fs.LocalFileSystem):
            paths, skipped = list_images([item if store is None else store.root])
            locations += [os.fspath(p) for p in paths]
            sources += [LOCAL] * len(paths)
            missing += skipped
        else:
            found = [store.root] if kind == pyarrow.fs.FileType.File else _list_objects(store)
            locations += found
            sources += [len(stores)] * len(found)
            stores.append(store)
    return Listing(locations, sources, missing, stores)


def _reach(uri: str) -> tuple[Store, pyarrow.fs.FileType]:
    """The filesystem of `uri`, and what is at the URI (for a local one, possibly nothing), asked under a deadline.

    Raises:
        DataError: the URI cannot be read, names nothing, or its storage gave no answer within `REACH_SECONDS`.
    """
    import pyarrow.fs

    def ask() -> tuple[Store, pyarrow.fs.FileType]:
        try:
            filesystem, root = pyarrow.fs.FileSystem.from_uri(_bounded_retries(uri))  # s3:// asks for the bucket's region here
            kind = filesystem.get_file_info(root).type
        except (OSError, ValueError) as e:  # pyarrow's errors: ArrowInvalid (a ValueError), ArrowIOError (an OSError)
            raise _unlisted(uri, e) from None
        local = isinstance(filesystem, pyarrow.fs.LocalFileSystem)  # `list_images` says what is not there
        if kind not in (pyarrow.fs.FileType.File, pyarrow.fs.FileType.Directory) and not local:
            raise DataError(
                f"{display(uri)}: no such file or folder. Give a folder of photos (s3://bucket/photos/, gs://..., a local path)."
            )
        return Store(uri.partition("?")[0].rstrip("/"), filesystem, root.rstrip("/") or root), kind

    return _within_deadline(ask, uri)


def _bounded_retries(uri: str) -> str:
    """`uri`, with Google Cloud Storage's retries limited to `GCS_RETRY_SECONDS` (its client's default: 15 minutes)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("gs", "gcs") or "retry_limit_seconds" in urllib.parse.parse_qs(parts.query):
        return uri
    return f"{uri}{'&' if parts.query else '?'}retry_limit_seconds={GCS_RETRY_SECONDS}"


def _within_deadline(call: Callable[[], _T], uri: str) -> _T:
    """`call()`, given up on after `REACH_SECONDS`: it runs in a daemon thread, which this process does not wait for at exit.

    Raises:
        DataError: no answer came in time.
    """
    answers: list[_T] = []
    errors: list[Exception] = []

    def run() -> None:
        try:
            answers.append(call())
        except Exception as e:  # raised again in the calling thread
            errors.append(e)

    thread = threading.Thread(target=run, name=f"headstart: {uri}", daemon=True)
    thread.start()
    thread.join(REACH_SECONDS)
    if errors:
        raise errors[0]
    if not answers:
        raise DataError(f"{display(uri)}: no answer within {REACH_SECONDS} s. Check the URI, the network and the credentials for it.")
    return answers[0]


def _unlisted(uri: str, error: Exception) -> DataError:
    reason = _brief(str(error)) or type(error).__name__
    return DataError(f"{display(uri)}: cannot be listed ({reason}). Check the URI and the credentials for it.")


def _brief(message: str) -> str:
    """The first sentence of a message's first line, at most `REASON_CHARS` long, for a one-line error."""
    line = next((line.strip() for line in message.splitlines() if line.strip()), "")
    sentence = re.split(r"(?<=\.)\s", line, maxsplit=1)[0].rstrip(".")
    return sentence if len(sentence) <= REASON_CHARS else f"{sentence[: REASON_CHARS - 3]}..."


def _list_objects(store: Store) -> list[str]:
    """The paths of the image objects under `store.root`, recursively, sorted, hidden names left out.

    Raises:
        DataError: the listing failed.
    """
    import pyarrow.fs

    try:
        found = store.filesystem.get_file_info(pyarrow.fs.FileSelector(store.root, recursive=True))
    except (OSError, ValueError) as e:  # pyarrow's errors: ArrowInvalid (a ValueError), ArrowIOError (an OSError)
        raise _unlisted(store.uri, e) from None
    names = []
    for item in found:
        relative = item.path[len(store.root) :].lstrip("/")
        hidden = any(part.startswith(".") for part in relative.split("/"))
        if item.type == pyarrow.fs.FileType.File and not hidden and Path(relative).suffix.lower() in IMAGE_EXTENSIONS:
            names.append(item.path)
    return sorted(names)


class ImageWorker:
    """A Ray Data actor (a callable class): loads the backbones' ONNX engines once, then turns batches of image
    locations into features.

    Each image is decoded once, prepared for each backbone by its own preprocessing, and its
    features are the backbones' concatenated, as `Model.extract` does. Images whose digest is in
    `known` (already cached; raw sha256 digests, sorted, dtype S32: 32 bytes an image) are only hashed.
    Objects are read through `filesystems` (those of `Listing.stores`).

    Input columns: `index` (int64), `location` (bytes), `source` (int32: the index of its filesystem, or `LOCAL`).
    Output columns: `index` (int64, the input's), `digest` (sha256 hex; empty when the file could not
    be read), `features` (float32 bytes; empty when cached or skipped), `reason` (why it was skipped, UTF-8).
    """

    def __init__(
        self,
        backbones: Sequence[Backbone],
        onnx: Sequence[bytes],
        known: NDArray[np.bytes_],
        reduced_decode: bool,
        filesystems: Sequence[pyarrow.fs.FileSystem],
    ) -> None:
        from headstart.engine import OnnxEngine

        # Each engine's file is given as bytes; its path only names it.
        self.engines = [OnnxEngine(b, Path(f"{b.name}.onnx"), threads=1, data=data) for b, data in zip(backbones, onnx, strict=True)]
        self.cfgs = [b.data_config for b in backbones]
        self.known = known
        self.reduced_decode = reduced_decode
        self.filesystems = filesystems
        self.reader = ThreadPoolExecutor(max_workers=READ_AHEAD)

    def __call__(self, batch: pyarrow.Table) -> pyarrow.Table:
        import pyarrow as pa

        from headstart.features import run_engines
        from headstart.pipeline import decode_inputs
        from headstart.transforms import normalize

        locations = [os.fsdecode(b) for b in batch.column("location").to_pylist()]
        sources = batch.column("source").to_pylist()
        n = len(locations)
        digests, reasons, features = [""] * n, [""] * n, [b""] * n
        decoded: list[int] = []
        pixels: list[tuple[NDArray[np.uint8], ...]] = []
        for k, data in enumerate(self._read_all(locations, sources)):
            if isinstance(data, str):
                reasons[k] = data
                continue
            digest = hashlib.sha256(data).digest()
            digests[k] = digest.hex()
            if _contains(self.known, digest):
                continue
            try:
                pixels.append(decode_inputs(data, self.cfgs, self.reduced_decode, name=locations[k]))
                decoded.append(k)
            except UnreadableImageError as e:
                reasons[k] = e.reason
        if decoded:
            inputs = [normalize(np.stack([p[m] for p in pixels]), cfg) for m, cfg in enumerate(self.cfgs)]
            for k, row in zip(decoded, run_engines(self.engines, inputs)):
                features[k] = np.ascontiguousarray(row, dtype=np.float32).tobytes()
        return pa.table(
            {
                "index": batch.column("index"),
                "digest": pa.array(digests, pa.string()),
                "features": pa.array(features, pa.binary()),
                "reason": pa.array([r.encode("utf-8", "surrogateescape") for r in reasons], pa.binary()),
            }
        )

    def _read_all(self, locations: list[str], sources: list[int]) -> Iterator[bytes | str]:
        """Each file's bytes, or why it cannot be read, in order; at most `READ_AHEAD` files are held at once."""
        pending: deque[Future[bytes | str]] = deque()
        for location, source in zip(locations, sources):
            pending.append(self.reader.submit(self._read, location, source))
            if len(pending) >= READ_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def _read(self, location: str, source: int) -> bytes | str:
        try:
            if source == LOCAL:
                return read_regular(Path(location), MAX_FILE_BYTES)
            return self._read_object(self.filesystems[source], location)
        except FileRefusedError as e:  # a FIFO, a device, a file too large
            return e.reason
        except (OSError, ValueError) as e:  # a vanished file, a symlink loop, no permission; pyarrow's errors for an object
            return (e.strerror if isinstance(e, OSError) else None) or _brief(str(e)) or type(e).__name__

    @staticmethod
    def _read_object(filesystem: pyarrow.fs.FileSystem, path: str) -> bytes:
        size = filesystem.get_file_info(path).size
        if size is not None and size > MAX_FILE_BYTES:
            raise FileRefusedError(Path(path), f"too large: {size:,} bytes, more than the {MAX_FILE_BYTES:,} allowed")
        with filesystem.open_input_stream(path) as f:  # read as large as said, not as the bound: an actor may run under `ulimit -v`
            return read_bounded(f, MAX_FILE_BYTES, Path(path), size or 0)


def _sorted_digests(digests: set[str]) -> NDArray[np.bytes_]:
    """Hex sha256 digests as the sorted array of raw digests an `ImageWorker` looks them up in."""
    return np.sort(np.array([bytes.fromhex(d) for d in digests], dtype="S32"))


def _contains(known: NDArray[np.bytes_], digest: bytes) -> bool:
    """Whether a raw sha256 digest is in a sorted array of them (NumPy ignores trailing zero bytes on both sides alike)."""
    k = int(np.searchsorted(known, digest))
    return k < len(known) and bytes(known[k]) == digest.rstrip(b"\0")


def _unbuilt() -> None:
    """The network of a backbone sent to a Ray worker: workers run its ONNX engine, never the network."""


def _portable(backbone: Backbone) -> Backbone:
    """`backbone` without the means to build its network (a closure that may hold weights), so it pickles small."""
    return dataclasses.replace(backbone, _network=_unbuilt)


def _onnx_bytes(backbone: Backbone, cache_root: Path) -> bytes:
    """The verified ONNX file of `backbone` (exported on first use, as for a local run).

    Raises:
        ConfigError: the backbone does not run in ONNX Runtime, which the Ray workers use.
    """
    from headstart.engine import MAX_EXPORT_BYTES, ExportError, exported_model

    try:
        return read_regular(exported_model(backbone, cache_root), MAX_EXPORT_BYTES)
    except ExportError as e:
        raise ConfigError(f"{e}. The Ray workers run ONNX Runtime only: extract this backbone without --ray.") from None


@contextmanager
def ray_session(address: str | None = None) -> Iterator[int]:
    """Connect to the Ray cluster at `address` (else `$RAY_ADDRESS`, else start a local Ray on this machine's CPUs) for the
    duration of the block; yields its number of CPUs. A session already started in this process (`ray.init`) is used as it is.

    Raises:
        ConfigError: Ray is not installed, or the cluster cannot be reached.
    """
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        address = address or os.environ.get("RAY_ADDRESS") or None
        local: dict[str, Any] = {} if address else {"num_cpus": available_cpus()}
        try:
            if address:
                _probe(address)
            ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False, **local)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ConfigError(
                f"Could not connect to the Ray cluster at {display(str(address))}: {_brief(str(e)) or type(e).__name__}. "
                "Give its address (ray://HEAD:10001, or auto on one of its nodes), or leave --address out for a local Ray."
            ) from None
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)  # Ray Data logs each run's plan and progress; the progress callback reports instead
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield max(1, int(ray.cluster_resources().get("CPU", 1)))
    finally:
        context.enable_progress_bars = bars
        logger.setLevel(level)
        if started:
            ray.shutdown()


def _probe(address: str) -> None:
    """Fail within `REACH_SECONDS` where no Ray cluster answers at a `host:port` or `ray://host:port` address (Ray's own
    connect retries for minutes, and prints its retries): something must accept a connection there and answer as a gRPC
    server does (with TLS, `RAY_USE_TLS`, only the connection is checked). Other addresses, such as `auto`, are left to Ray.

    Raises:
        ConnectionError: nothing accepts a connection, or what does is not a gRPC server.
    """
    parts = urllib.parse.urlsplit("//" + address.removeprefix("ray://"))
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is no number: Ray says so
        return
    if host is None or port is None:
        return
    deadline = time.monotonic() + REACH_SECONDS
    try:
        connection = socket.create_connection((host, port), timeout=REACH_SECONDS)
    except OSError as e:
        raise ConnectionError(f"nothing accepts a connection at {host}:{port} ({e.strerror or e})") from None
    with connection:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):  # as Ray reads it
            return
        answer = b""
        try:
            connection.sendall(HTTP2_PREFACE)
            while len(answer) < HTTP2_FRAME_HEADER and (chunk := _receive(connection, HTTP2_FRAME_HEADER - len(answer), deadline)):
                answer += chunk
        except TimeoutError:
            raise ConnectionError(f"no Ray cluster answered at {host}:{port} within {REACH_SECONDS} s") from None
        except OSError:  # reset: what listens there is no gRPC server either
            pass
    if len(answer) < HTTP2_FRAME_HEADER or answer[3] != HTTP2_SETTINGS:
        raise ConnectionError(f"what listens at {host}:{port} is no Ray cluster (it does not answer as a gRPC server does)")


def _receive(connection: socket.socket, size: int, deadline: float) -> bytes:
    """At most `size` bytes from `connection` (none once it is closed), waiting until `deadline` (`time.monotonic`) at most.

    Raises:
        TimeoutError: nothing came by `deadline`.
    """
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    connection.settimeout(left)
    return connection.recv(size)


def _stream(
    listing: Listing,
    backbones: Sequence[Backbone],
    onnx: Sequence[bytes],
    known: NDArray[np.bytes_],
    n_cpus: int,
    batch_size: int,
    reduced_decode: bool,
) -> Iterator[pyarrow.Table]:
    """The `ImageWorker` output for every location, in batches as the actors finish them (in no particular order)."""
    import pyarrow as pa

    ray = import_ray()
    n = len(listing.locations)
    batch_size = max(1, min(batch_size, math.ceil(n / (TASKS_PER_CPU * n_cpus))))  # a few images: still every CPU, and progress
    blocks = [
        pa.table(
            {
                "index": pa.array(range(start, min(start + batch_size, n)), pa.int64()),
                "location": pa.array([os.fsencode(v) for v in listing.locations[start : start + batch_size]], pa.binary()),
                "source": pa.array(listing.sources[start : start + batch_size], pa.int32()),
            }
        )
        for start in range(0, n, batch_size)
    ]
    dataset = ray.data.from_arrow(blocks).map_batches(
        ImageWorker,
        batch_size=None,  # one block, one batch
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(n_cpus, len(blocks))),
        num_cpus=1,
        fn_constructor_kwargs={
            "backbones": [_portable(b) for b in backbones],
            "onnx": list(onnx),
            "known": known,
            "reduced_decode": reduced_decode,
            "filesystems": [store.filesystem for store in listing.stores],
        },
    )
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
    except ray.exceptions.RayError as e:  # a worker that cannot start, a node lost for good, ...
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # Ray colours its messages
        reason = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
        raise ClusterError(f"The Ray job failed: {reason[:300]}. Ray's logs are under /tmp/ray/session_latest/logs on each node.") from None


def _rows(table: pyarrow.Table) -> Iterator[tuple[int, str, bytes, str]]:
    """(index, digest, features bytes, reason) of each output row."""
    for index, digest, features, reason in zip(
        table.column("index").to_pylist(),
        table.column("digest").to_pylist(),
        table.column("features").to_pylist(),
        table.column("reason").to_pylist(),
        strict=True,
    ):
        yield index, digest, features, reason.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class RayExtraction:
    """What `extract_on_ray` left in one backbone's feature cache.

    Attributes:
        directory: the cache folder of the backbone.
        n_images: the image files listed.
        n_extracted: images run through the backbone (each distinct content once).
        n_cached: images whose features were in the cache already.
        skipped: the files that could not be read or decoded, and why, in listing order.
        n_cpus: the CPUs of the Ray cluster (one actor each).
    """

    directory: Path
    n_images: int
    n_extracted: int
    n_cached: int
    skipped: list[Skipped]
    n_cpus: int


def extract_on_ray(
    backbone: Backbone,
    listing: Listing,
    cache: FeatureCache,
    cache_root: Path,
    n_cpus: int,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> RayExtraction:
    """Fill `cache` with the features of every image in `listing`, computed on the Ray session (see `ray_session`).

    Images whose content is cached already are hashed and skipped by the actors. New features
    are written as a shard every `cache.SHARD_SIZE` images (atomically), each digest once.
    """
    known = cache.digests()
    pending: dict[str, NDArray[np.float32]] = {}
    stored: set[str] = set()
    bad: dict[int, str] = {}
    n_cached = done = 0
    total = len(listing.locations)
    onnx = _onnx_bytes(backbone, cache_root)
    for table in _stream(listing, (backbone,), (onnx,), _sorted_digests(known), n_cpus, batch_size, reduced_decode=True):
        for index, digest, features, reason in _rows(table):
            if reason:
                bad[index] = reason
            elif digest in known:
                n_cached += 1
            elif digest not in stored and digest not in pending:
                row = np.frombuffer(features, dtype=np.float32)
                if row.shape != (backbone.n_features,):
                    raise RuntimeError(f"a Ray worker returned {row.shape} features for {display(listing.locations[index])}")
                pending[digest] = row
            done += 1
        if len(pending) >= feature_cache.SHARD_SIZE:
            cache.store(pending)
            stored.update(pending)
            pending = {}
        if progress:
            progress(f"Extracting features on Ray ({n_cpus} CPUs, {backbone.name})", done, total)
    cache.store(pending)
    stored.update(pending)
    skipped = [Skipped(listing.path(k), bad[k]) for k in sorted(bad)]
    return RayExtraction(cache.directory, total, len(stored), n_cached, skipped, n_cpus)


def predict_on_ray(
    model: Model,
    listing: Listing,
    n_cpus: int,
    top_k: int = 3,
    unknown: UnknownOption = "auto",
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> tuple[list[Prediction], list[Skipped]]:
    """The `top_k` classes of every image in `listing`, its features computed on the Ray session, in listing order;
    and the files skipped. The model's head, calibration and unknown detector run here, on each batch as it arrives.
    """
    from headstart.model import Prediction

    threshold = model.unknown_threshold(unknown)
    onnx = [_onnx_bytes(b, model.cache_root) for b in model.backbones]
    predicted: dict[int, Prediction] = {}
    bad: dict[int, str] = {}
    total = len(listing.locations)
    n_features = sum(b.n_features for b in model.backbones)
    for table in _stream(listing, model.backbones, onnx, _sorted_digests(set()), n_cpus, batch_size, reduced_decode=True):
        indices: list[int] = []
        rows: list[NDArray[np.float32]] = []
        for index, _, features, reason in _rows(table):
            if reason:
                bad[index] = reason
            else:
                indices.append(index)
                rows.append(np.frombuffer(features, dtype=np.float32))
        if rows:
            proba, scores = model.outputs(np.stack(rows).reshape(len(rows), n_features))
            for k, (index, p) in enumerate(zip(indices, proba, strict=True)):
                score = None if scores is None else float(scores[k])
                predicted[index] = Prediction.from_probabilities(listing.path(index), p, model.classes, top_k, score, threshold)
        if progress:
            progress(f"Predicting on Ray ({n_cpus} CPUs)", len(predicted) + len(bad), total)
    return [predicted[k] for k in sorted(predicted)], [Skipped(listing.path(k), bad[k]) for k in sorted(bad)]
