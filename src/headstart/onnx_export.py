"""Exporting a backbone's feature extractor to ONNX, checked against PyTorch (imports torch; runs once per backbone and machine)."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from headstart.backbone import Backbone

OPSET = 17


@dataclasses.dataclass(frozen=True)
class Exported:
    """An exported feature extractor and how it compares with PyTorch.

    Attributes:
        data: the ONNX model: input "pixels" (n, 3, H, W); outputs "features" (n, n_features) and "feature_map".
        max_relative_error: max |onnx - torch| / max |torch| of the features over a fixed random batch.
        mean_pooled: whether the features are the spatial mean of a (n, c, h, w) feature map, which makes
            Grad-CAM computable from the map and the head's gradient alone.
    """

    data: bytes
    max_relative_error: float
    mean_pooled: bool


def export_features(backbone: Backbone, threads: int) -> Exported:
    """Export `backbone`'s feature extractor and compare it with PyTorch on a fixed random batch."""
    data = _export(backbone)
    batch = _check_batch(backbone)
    with torch.inference_mode():
        maps = backbone.feature_map(batch)
        expected = backbone.pool(maps).numpy()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    actual = session.run(["features"], {"pixels": batch.numpy()})[0]
    if actual.shape != expected.shape:
        return Exported(data, float("inf"), False)
    scale = max(float(np.abs(expected).max()), 1e-12)
    error = float(np.abs(actual - expected).max() / scale)
    mean_pooled = (
        maps.ndim == 4 and maps.shape[1] == expected.shape[1] and float(np.abs(maps.mean((2, 3)).numpy() - expected).max()) <= 1e-4 * scale
    )
    return Exported(data, error, mean_pooled)


class _Features(nn.Module):
    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.module = backbone.module  # registered, so export sees its parameters

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.backbone.feature_map(x)
        return self.backbone.pool(maps), maps


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
            output_names=["features", "feature_map"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}, "feature_map": {0: "batch"}},
        )
        model = onnx.load(path)
    for node in model.graph.node:  # ONNX Runtime folds a Pad into the next Conv only without the empty optional input torch writes
        if node.op_type == "Pad" and len(node.input) == 3 and not node.input[2]:
            del node.input[2]
    return bytes(model.SerializeToString())


def with_static_padding(backbone: Backbone) -> Backbone:
    """A copy of `backbone` whose TensorFlow-style "same" convolutions pad by fixed amounts.

    timm's `Conv2dSame` (in the `tf_` ports, such as EfficientNet-Lite) works
    out its padding from each input's shape. Fixed amounts for the backbone's
    input size compute the same thing, and an exporter writes them as
    constants that ONNX Runtime folds into the convolution.
    """
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import get_same_padding

    module: Any = copy.deepcopy(backbone.module)
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:])))
        for name, m in module.named_modules()
        if isinstance(m, Conv2dSame)
    ]
    size = backbone.data_config.input_size
    with torch.no_grad():
        module.forward_features(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    for name, (height, width) in sizes.items():
        conv: nn.Conv2d = module.get_submodule(name)
        pad_h = get_same_padding(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pad_w = get_same_padding(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, _PaddedConv(conv, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)))
    return backbone.with_module(module)


class _PaddedConv(nn.Module):
    def __init__(self, conv: nn.Conv2d, padding: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv = conv
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return nn.functional.conv2d(nn.functional.pad(x, self.padding), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)
