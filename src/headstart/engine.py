"""How the frozen backbone runs: ONNX Runtime on the CPU, PyTorch as the fallback.

The first time a backbone (name, weights, preprocessing, layer) is used, its
feature extractor is exported to ONNX under `<cache>/onnx/`, run on a fixed
input through both ONNX Runtime and PyTorch, and kept only if the two agree
(`PARITY_TOLERANCE`). The verdict is recorded beside the file, so later runs
start at once; a backbone that fails to export or to match runs in PyTorch.
A failure that may pass (a full disk, too little memory) is not recorded: that
run uses PyTorch, and the next one tries the export again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime
import torch
from numpy.typing import NDArray
from torch import nn

from headstart.backbones import Backbone, with_static_padding
from headstart.config import default_cache_dir
from headstart.files import atomic_write_bytes, atomic_write_json
from headstart.pipeline import available_cpus

EngineKind = Literal["auto", "onnx", "torch"]
ENGINE_KINDS = ("auto", "onnx", "torch")
EXPORT_FORMAT = 2  # 2: static "same" padding, folded into the convolutions
OPSET = 17
PARITY_TOLERANCE = 1e-4  # max |onnx - torch| / max |torch| over the check batch


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

    def __init__(self, backbone: Backbone, path: Path, threads: int | None = None) -> None:
        super().__init__(backbone)
        self.path = path
        self.threads = threads or available_cpus()
        data = path.read_bytes()
        self.sessions = [_session(data, 1) for _ in range(self.threads)]
        self._idle: queue.SimpleQueue[onnxruntime.InferenceSession] = queue.SimpleQueue()
        for session in self.sessions:
            self._idle.put(session)
        self._pool = ThreadPoolExecutor(max_workers=self.threads) if self.threads > 1 else None

    def __call__(self, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
        if self._pool is None or len(inputs) == 1:
            return _run(self.sessions[0], inputs)
        slices = [s for s in np.array_split(inputs, self.threads * SLICES_PER_SESSION) if len(s)]
        return np.concatenate(list(self._pool.map(self._run_on_idle, slices)))

    def _run_on_idle(self, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
        session = self._idle.get()
        try:
            return _run(session, inputs)
        finally:
            self._idle.put(session)


def _run(session: onnxruntime.InferenceSession, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
    outputs: list[NDArray[np.float32]] = session.run(None, {"pixels": inputs})
    return outputs[0]


def create_engine(backbone: Backbone, kind: EngineKind = "auto", cache_root: Path | None = None) -> Engine:
    """The engine for `backbone`: "onnx" (raises if unavailable), "torch", or "auto" (ONNX, else PyTorch with a warning)."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_KINDS)}, got {kind!r}")
    if kind == "torch":
        return TorchEngine(backbone)
    try:
        return OnnxEngine(backbone, exported_model(backbone, cache_root or default_cache_dir()))
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
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
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
    record = _read_record(record_path)
    if record and path.is_file() and record.get("sha256") == hashlib.sha256(path.read_bytes()).hexdigest():
        return path
    if record and record.get("verified") is False:
        raise ExportError(f"Backbone '{backbone.name}' did not export to ONNX: {record.get('reason')}")
    try:
        data = _export(backbone)
        error = _parity_error(backbone, data)
    except (OSError, MemoryError) as e:  # may pass (a full disk, a busy machine): not recorded
        raise ExportError(
            f"Backbone '{backbone.name}' could not be exported to ONNX this time ({_describe(e)}); it will be tried again on the next run"
        ) from e
    except Exception as e:  # exporters fail in many ways on arbitrary timm models
        return _refuse(backbone, record_path, _describe(e))
    if not error <= PARITY_TOLERANCE:
        return _refuse(backbone, record_path, f"ONNX features differ from PyTorch's (max relative error {error:.2e})")
    try:
        atomic_write_bytes(path, data)
        digest = hashlib.sha256(data).hexdigest()
        atomic_write_json(record_path, {"verified": True, "sha256": digest, "max_relative_error": error, "backbone": backbone.name})
    except OSError as e:
        raise ExportError(
            f"Backbone '{backbone.name}': its ONNX file could not be saved ({_describe(e)}); it will be tried again on the next run"
        ) from e
    return path


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _refuse(backbone: Backbone, record_path: Path, reason: str) -> Path:
    with contextlib.suppress(OSError):  # unrecorded, the export is simply tried again next time
        atomic_write_json(record_path, {"verified": False, "reason": reason, "backbone": backbone.name})
    raise ExportError(f"Backbone '{backbone.name}' did not export to ONNX: {reason}")


class _Features(nn.Module):
    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.module = backbone.module  # registered, so export sees its parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.pooled(x)


def _check_batch(backbone: Backbone) -> torch.Tensor:
    size = backbone.data_config.input_size
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))


def _export(backbone: Backbone) -> bytes:
    backbone = with_static_padding(backbone)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        path = Path(tmp) / "features.onnx"
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        torch.onnx.export(
            _Features(backbone).eval(),
            (_check_batch(backbone)[:1],),
            path,
            dynamo=False,
            opset_version=OPSET,
            input_names=["pixels"],
            output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
        )
        model = onnx.load(path)
    for node in model.graph.node:  # ONNX Runtime folds a Pad into the next Conv only without the empty optional input torch writes
        if node.op_type == "Pad" and len(node.input) == 3 and not node.input[2]:
            del node.input[2]
    return bytes(model.SerializeToString())


def _parity_error(backbone: Backbone, data: bytes) -> float:
    """Max relative error of the exported features against PyTorch's on a fixed random batch."""
    batch = _check_batch(backbone)
    expected = backbone.features(batch).numpy()
    actual = _run(_session(data, available_cpus()), batch.numpy())
    if actual.shape != expected.shape:
        return float("inf")
    return float(np.abs(actual - expected).max() / max(float(np.abs(expected).max()), 1e-12))


def _session(data: bytes, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave idle cores to the decoding workers
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
