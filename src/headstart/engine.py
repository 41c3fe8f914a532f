"""How the frozen backbone runs: ONNX Runtime on the CPU, PyTorch as the fallback.

The first time a backbone (name, weights, preprocessing, layer) is used, its
feature extractor is exported to ONNX under `<cache>/onnx/` (`onnx_export`,
which imports PyTorch) and kept only if it agrees with PyTorch
(`PARITY_TOLERANCE`). The verdict is recorded beside the file, sealed with the
cache's key (see `seal`), so later runs start at once, without PyTorch; a file
or verdict that fails its seal is exported again. A backbone that fails to
export or to match runs in PyTorch. A failure that may pass (a full disk, too little memory) is
not recorded: that run uses PyTorch, and the next one tries the export again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import queue
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from headstart.backbone import Backbone
from headstart.config import default_cache_dir
from headstart.files import atomic_write_bytes, atomic_write_json, read_regular
from headstart.pipeline import available_cpus
from headstart.seal import cache_key, is_sealed, seal

if TYPE_CHECKING:
    import onnxruntime
    import torch

EngineKind = Literal["auto", "onnx", "torch"]
ENGINE_KINDS = ("auto", "onnx", "torch")
EXPORT_FORMAT = 3  # 2: static "same" padding, folded into the convolutions; 3: the feature map as a second output
PARITY_TOLERANCE = 1e-4  # max |onnx - torch| / max |torch| over the check batch
MAX_EXPORT_BYTES = 4 << 30


class Engine:
    """Computes a backbone's pooled features for a batch of preprocessed images."""

    name: str

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    def __call__(self, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
        """Features of shape (n, n_features) for inputs of shape (n, 3, H, W)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.backbone.name!r})"


class TorchEngine(Engine):
    """The backbone's own PyTorch forward pass (eager, inference mode).

    `forward` replaces `backbone.features`, e.g. `backbone.imagenet_logits`.
    """

    name = "pytorch"

    def __init__(self, backbone: Backbone, forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(backbone)
        self.forward = forward or backbone.features

    def __call__(self, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
        import torch

        return self.forward(torch.from_numpy(inputs)).numpy()


SLICES_PER_SESSION = 4  # small slices, taken by whichever session is free, so one slowed session does not hold up a batch


class OnnxEngine(Engine):
    """ONNX Runtime CPU sessions over the backbone's exported, verified feature extractor.

    One single-threaded session per CPU; each batch is cut into a few slices per
    session, run by whichever session is free. On small CNNs this beats one
    session with a thread per CPU (120 vs 103 images/s for EfficientNet-Lite0
    on 2 cores), because a layer-wise split leaves cores waiting on the small
    and depthwise layers; the small slices keep a session slowed by the
    decoding process from holding up the others (220 vs 177 images/s end to end).
    """

    name = "onnxruntime"

    def __init__(self, backbone: Backbone, path: Path, threads: int | None = None, data: bytes | None = None) -> None:
        """`data`: the file's bytes when they are already at hand (sent to a Ray worker, say), instead of reading `path`."""
        super().__init__(backbone)
        self.path = path
        self.threads = threads or available_cpus()
        self.mean_pooled = bool((_read_record(path.with_suffix(".json")) or {}).get("mean_pooled"))  # from the export's verdict
        data = read_regular(path, MAX_EXPORT_BYTES) if data is None else data
        self.sessions = [cpu_session(data, 1) for _ in range(self.threads)]
        self._idle: queue.SimpleQueue[onnxruntime.InferenceSession] = queue.SimpleQueue()
        for session in self.sessions:
            self._idle.put(session)
        self._pool = ThreadPoolExecutor(max_workers=self.threads) if self.threads > 1 else None

    def __call__(self, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
        if self._pool is None or len(inputs) == 1:
            return _run(self.sessions[0], inputs)
        slices = [s for s in np.array_split(inputs, self.threads * SLICES_PER_SESSION) if len(s)]
        return np.concatenate(list(self._pool.map(self._run_on_idle, slices)))

    def feature_maps(self, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
        """The unpooled maps the features come from, shape (n, channels, h, w)."""
        maps: NDArray[np.float32] = self.sessions[0].run(["feature_map"], {"pixels": inputs})[0]
        return maps

    def _run_on_idle(self, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
        session = self._idle.get()
        try:
            return _run(session, inputs)
        finally:
            self._idle.put(session)


def _run(session: onnxruntime.InferenceSession, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
    outputs: list[NDArray[np.float32]] = session.run(["features"], {"pixels": inputs})
    return outputs[0]


def create_engine(backbone: Backbone, kind: EngineKind = "auto", cache_root: Path | None = None) -> Engine:
    """The engine for `backbone`: "onnx" (raises if unavailable), "torch", or "auto" (ONNX, else PyTorch with a warning)."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_KINDS)}, got {kind!r}")
    if kind == "torch":
        return TorchEngine(backbone)
    try:
        path = exported_model(backbone, cache_root or default_cache_dir())
        return OnnxEngine(backbone, path)
    except ExportError as e:
        if kind == "onnx":
            raise
        warnings.warn(f"{e}; running it in PyTorch instead (slower, same features).", stacklevel=2)
        return TorchEngine(backbone)


class ExportError(RuntimeError):
    """The backbone could not be exported to ONNX, or the export disagrees with PyTorch."""


def engine_key(backbone: Backbone) -> str:
    """A short hash of the backbone and the exporter/runtime versions its ONNX file depends on."""
    identity = {
        "format": EXPORT_FORMAT,
        "backbone": backbone.fingerprint(),
        "torch": importlib.metadata.version("torch"),
        "onnxruntime": importlib.metadata.version("onnxruntime"),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def exported_model(backbone: Backbone, cache_root: Path) -> Path:
    """The path of `backbone`'s verified ONNX feature extractor, exporting and verifying it on first use.

    Raises:
        ExportError: export failed or its features differ from PyTorch's (now or on an earlier run),
            or it failed for want of disk space or memory this time (then it is tried again on the next call).
    """
    path = cache_root / "onnx" / f"{engine_key(backbone)}.onnx"
    record_path = path.with_suffix(".json")
    try:
        key = cache_key(cache_root)
    except OSError as e:  # a read-only cache that has none yet: nothing in it can be trusted
        raise ExportError(f"Backbone '{backbone.name}': the cache's key could not be read or made ({_describe(e)})") from e
    record = _read_record(record_path)
    if record and not is_sealed(key, record.pop("seal", None), path.stem.encode(), _canonical(record)):
        record = None  # edited, or from another cache: exported again
    if record and record.get("verified") is True and _sha256(path) == record.get("sha256"):
        return path
    if record and record.get("verified") is False:
        raise ExportError(f"Backbone '{backbone.name}' did not export to ONNX: {record.get('reason')}")
    from headstart import onnx_export

    try:
        exported = onnx_export.export_features(backbone, available_cpus())
    except (OSError, MemoryError) as e:  # may pass (a full disk, a busy machine): not recorded
        raise ExportError(
            f"Backbone '{backbone.name}' could not be exported to ONNX this time ({_describe(e)}); it will be tried again on the next run"
        ) from e
    except Exception as e:  # exporters fail in many ways on arbitrary timm models
        return _refuse(backbone, path, key, _describe(e))
    error = exported.max_relative_error
    if not error <= PARITY_TOLERANCE:
        return _refuse(backbone, path, key, f"ONNX features differ from PyTorch's (max relative error {error:.2e})")
    try:
        atomic_write_bytes(path, exported.data)
        record = {
            "verified": True,
            "sha256": hashlib.sha256(exported.data).hexdigest(),
            "max_relative_error": error,
            "mean_pooled": exported.mean_pooled,
            "backbone": backbone.name,
        }
        _write_record(path, key, record)
    except OSError as e:
        raise ExportError(
            f"Backbone '{backbone.name}': its ONNX file could not be saved ({_describe(e)}); it will be tried again on the next run"
        ) from e
    return path


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(read_regular(path, MAX_EXPORT_BYTES)).hexdigest()
    except OSError:
        return None


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(read_regular(path, 1 << 20))
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def _write_record(path: Path, key: bytes, record: dict[str, Any]) -> None:
    """The verdict on the engine `path`, sealed with the cache's key and bound to the engine's name."""
    atomic_write_json(path.with_suffix(".json"), {**record, "seal": seal(key, path.stem.encode(), _canonical(record))})


def _refuse(backbone: Backbone, path: Path, key: bytes, reason: str) -> Path:
    with contextlib.suppress(OSError):  # unrecorded, the export is simply tried again next time
        _write_record(path, key, {"verified": False, "reason": reason, "backbone": backbone.name})
    raise ExportError(f"Backbone '{backbone.name}' did not export to ONNX: {reason}")


def cpu_session(data: bytes, threads: int) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session over a model's bytes, with `threads` threads that do not spin when idle."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave idle cores to the decoding workers
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
