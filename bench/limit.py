"""How close feature extraction comes to the machine's limit, and what bounds it.

    .venv/bin/python bench/limit.py [DATA]        (default ../shared/datasets/flowers)

Counts the backbone's FLOPs per image (2 x multiply-adds of every conv and
linear layer, split into depthwise and the rest), measures the machine's peak
(the fastest of ONNX Runtime, NumPy and PyTorch at a 4096 x 4096 float32
matmul on all available cores) and compares it with
the FLOP rate headstart achieves: engine alone on decoded batches, and end to
end from JPEG files. An ONNX Runtime profile then splits engine time between
depthwise convolutions and everything else. Prints a table and appends it to
bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from _common import FLOWERS, publish, table
from onnx import TensorProto, helper
from torch import nn

from headstart.backbone import Backbone, create_backbone
from headstart.engine import create_engine
from headstart.features import extract_features
from headstart.pipeline import available_cpus, decode_input

KINDS = ("depthwise conv", "1x1 conv", "full conv", "other")


def conv_kind(in_per_group: int, kernel: int) -> str:
    return "depthwise conv" if in_per_group == 1 and kernel > 1 else "1x1 conv" if kernel == 1 else "full conv"


def layer_flops(backbone: Backbone) -> dict[str, float]:
    """FLOPs for one image per kind of layer, from the output shape of every conv and linear layer."""
    counts = dict.fromkeys(KINDS, 0.0)

    def hook(module: nn.Module, _: object, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            in_per_group, kernel = module.in_channels // module.groups, module.kernel_size[0]
            counts[conv_kind(in_per_group, kernel)] += 2 * in_per_group * kernel * module.kernel_size[1] * output.numel()
        elif isinstance(module, nn.Linear):
            counts["other"] += 2 * module.in_features * output.numel()

    handles = [m.register_forward_hook(hook) for m in backbone.module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    size = backbone.data_config.input_size
    backbone.features(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return counts


def matmul_peak(n: int = 4096, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of a large float32 matmul on all available cores, by each library at hand.

    They differ (MKL, in PyTorch, is slow on AMD CPUs); the best is the machine's peak.
    """
    cpus = available_cpus()
    torch.set_num_threads(cpus)
    a, b = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = cpus
    session = onnxruntime.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString(), options
    )
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    runs = {
        "ONNX Runtime (MLAS)": lambda: session.run(None, {"a": a, "b": b}),
        "NumPy (OpenBLAS)": lambda: a @ b,
        "PyTorch (MKL)": lambda: ta @ tb,
    }
    rates = {}
    for name, run in runs.items():
        run()
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        rates[name] = 2 * n**3 * repeats / (time.perf_counter() - started)
    return rates


def node_time(model: Path, batch: np.ndarray) -> dict[str, float]:
    """Share of one-thread ONNX Runtime node time per kind of layer (convs told apart by their weight shape)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            session.run(None, {"pixels": batch})
        events = json.loads(Path(session.end_profiling()).read_text())
    times = dict.fromkeys(KINDS, 0.0)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        shapes = [next(iter(s.values())) for s in event["args"].get("input_type_shape", [])]
        weight = shapes[1] if len(shapes) > 1 else []
        is_conv = "Conv" in event["args"].get("op_name", "") and len(weight) == 4
        times[conv_kind(weight[1], weight[2]) if is_conv else "other"] += event["dur"]
    total = sum(times.values())
    return {kind: t / total for kind, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?", default=FLOWERS)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    backbone = create_backbone(args.backbone)
    by_kind = layer_flops(backbone)
    flops = sum(by_kind.values())
    matmuls = matmul_peak()
    peak = max(matmuls.values())

    paths = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    with tempfile.TemporaryDirectory() as cache:
        engine = create_engine(backbone, "onnx", Path(cache))
        size = backbone.data_config.input_size
        batch = np.random.default_rng(0).standard_normal((32, 3, size, size), dtype=np.float32)
        engine(batch)
        started = time.perf_counter()
        for _ in range(8):
            engine(batch)
        engine_rate = 8 * len(batch) / (time.perf_counter() - started)
        started = time.perf_counter()
        extract_features(engine, paths)
        end_to_end = len(paths) / (time.perf_counter() - started)
        time_share = node_time(engine.path, batch)  # type: ignore[attr-defined]

    started = time.perf_counter()
    for path in paths[:300]:
        decode_input(path, backbone.data_config)
    decode_rate = 300 / (time.perf_counter() - started)

    rows = [
        *((f"4096² float32 matmul, {name}", f"{rate / 1e9:.0f}", "-", f"{rate / peak:.2f}") for name, rate in matmuls.items()),
        (
            "engine only (decoded batches of 32)",
            f"{flops * engine_rate / 1e9:.0f}",
            f"{engine_rate:.0f}",
            f"{flops * engine_rate / peak:.2f}",
        ),
        ("end to end from JPEG files", f"{flops * end_to_end / 1e9:.0f}", f"{end_to_end:.0f}", f"{flops * end_to_end / peak:.2f}"),
    ]
    lines = [
        *table(["", "GFLOP/s", "images/s", "fraction of peak"], rows),
        f"\n{args.backbone}: {flops / 1e9:.3f} GFLOP per image. Decoding + resize + crop: {decode_rate:.0f} images/s on one core "
        f"({args.data.name}, first 300 files), i.e. {end_to_end / decode_rate:.0%} of one core at the end-to-end rate.\n",
        *table(
            ["layer kind", "share of FLOPs", "share of engine time (1 thread, batch 32)"],
            [(kind, f"{by_kind[kind] / flops:.1%}", f"{time_share[kind]:.1%}") for kind in KINDS],
        ),
    ]
    publish(f"limit: {args.backbone} on {available_cpus()} CPUs", lines)


if __name__ == "__main__":
    main()
