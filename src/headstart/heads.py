"""Classifier heads on pooled backbone features, as NumPy arrays; torch only on request.

A head's state is a dict of float32 arrays named like the torch `nn.Sequential` it
converts to: "0.mean", "0.scale" (input standardisation), then "1.weight", "1.bias"
for "linear", or "1.*" and "4.*" around ReLU and Dropout for "mlp".
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from headstart.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

HEAD_KINDS = ("linear", "mlp")

STD_FLOOR = 0.1
"""Each feature is scaled by 1 / (std + STD_FLOOR * mean std over features)."""

HeadState = dict[str, NDArray[np.float32]]
"""A head's parameters and standardisation statistics, by their torch state-dict names."""


def head_shapes(kind: str, n_features: int, n_classes: int, hidden: int = 512) -> dict[str, tuple[int, ...]]:
    """The name and shape of every array in the state of a `kind` head, without allocating any.

    Raises:
        ConfigError: `kind` is not one of `HEAD_KINDS`.
    """
    if kind not in HEAD_KINDS:
        raise ConfigError(f"Unknown head '{kind}'. Choose one of: {', '.join(HEAD_KINDS)}.")
    shapes: dict[str, tuple[int, ...]] = {"0.mean": (n_features,), "0.scale": (n_features,)}
    if kind == "linear":
        return {**shapes, "1.weight": (n_classes, n_features), "1.bias": (n_classes,)}
    return {**shapes, "1.weight": (hidden, n_features), "1.bias": (hidden,), "4.weight": (n_classes, hidden), "4.bias": (n_classes,)}


def head_kind(state: Mapping[str, Any]) -> str:
    """The kind of head a state is: "mlp" when it has a second layer ("4.weight"), else "linear"."""
    return "mlp" if "4.weight" in state else "linear"


def fit_standardization(features: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Mean and scale, each of shape (n_features,), from training features of shape (n_samples, n_features).

    Features that barely vary (often exact zeros) must not be blown up, so the scale
    has a floor proportional to the typical spread: scale = std + STD_FLOOR * mean(std) + 1e-8,
    with the sample std (ddof=1, as torch's `std`; 0 for a single sample).
    """
    features = np.asarray(features, dtype=np.float32)
    mean = features.mean(0, dtype=np.float64)
    std = features.std(0, ddof=1, dtype=np.float64) if len(features) > 1 else np.zeros(features.shape[1])
    scale = std + STD_FLOOR * std.mean() + 1e-8
    return mean.astype(np.float32), scale.astype(np.float32)


def init_head_state(
    kind: str, mean: NDArray[np.float32], scale: NDArray[np.float32], n_classes: int, hidden: int, rng: np.random.Generator
) -> HeadState:
    """A fresh head around the given standardisation: each layer's weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as torch's nn.Linear."""
    shapes = head_shapes(kind, len(mean), n_classes, hidden)
    state: HeadState = {"0.mean": np.array(mean, dtype=np.float32), "0.scale": np.array(scale, dtype=np.float32)}
    for layer in ("1", "4") if kind == "mlp" else ("1",):
        fan_in = shapes[f"{layer}.weight"][1]
        bound = np.float32(1 / np.sqrt(max(fan_in, 1)))
        for name in (f"{layer}.weight", f"{layer}.bias"):
            state[name] = (rng.random(shapes[name], dtype=np.float32) * 2 - 1) * bound
    return state


def compute_logits(state: Mapping[str, NDArray[np.float32]], features: NDArray[np.float32]) -> NDArray[np.float32]:
    """Logits of shape (n_samples, n_classes) for float32 features of shape (n_samples, n_features); a head in eval mode."""
    z: NDArray[np.float32] = (np.asarray(features, dtype=np.float32) - state["0.mean"]) / state["0.scale"]
    out: NDArray[np.float32] = z @ state["1.weight"].T + state["1.bias"]
    if head_kind(state) == "mlp":
        relu: NDArray[np.float32] = np.maximum(out, 0, out=out)
        out = relu @ state["4.weight"].T + state["4.bias"]
    return out


def create_torch_head(state: Mapping[str, NDArray[np.float32]], dropout: float = 0.5) -> nn.Sequential:
    """The equivalent torch module (in training mode, as torch builds modules), its state dict named as `state`.

    Imports torch: for fine-tuning jointly with the backbone, Grad-CAM and export.
    """
    import torch
    from torch import nn

    n_features = int(state["0.mean"].shape[0])
    weight = state["1.weight"]
    layers: list[nn.Module] = [_standardize_class()(n_features), nn.Linear(weight.shape[1], weight.shape[0])]
    if head_kind(state) == "mlp":
        out = state["4.weight"]
        layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(out.shape[1], out.shape[0])]
    module = nn.Sequential(*layers)
    module.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}, strict=True)
    return module


def read_torch_head(module: nn.Module) -> HeadState:
    """A head's state, as float32 NumPy copies, from a torch module such as `create_torch_head` builds."""
    return {name: tensor.detach().cpu().float().numpy().copy() for name, tensor in module.state_dict().items()}


@cache
def _standardize_class() -> type[nn.Module]:
    """torch's Standardize layer, defined on first use so that importing this module does not import torch."""
    import torch
    from torch import nn

    class Standardize(nn.Module):
        """(x - mean) / scale with the training features' statistics, kept as buffers."""

        mean: torch.Tensor
        scale: torch.Tensor

        def __init__(self, n_features: int) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(n_features))
            self.register_buffer("scale", torch.ones(n_features))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - self.mean) / self.scale

    return Standardize
