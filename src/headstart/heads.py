"""Fitted classifier heads on pooled backbone features, in NumPy: what a model predicts with; torch only on request.

`Head` is a fitted head: its settings, class labels and weights. It needs neither
scikit-learn nor torch, so predicting, serving and loading a model import neither;
`headstart.classifier.HeadClassifier`, the scikit-learn estimator, fits one.

A head's state is a dict of float32 arrays named like the torch `nn.Sequential` it
converts to: "0.mean", "0.scale" (input standardisation), then "1.weight", "1.bias"
for "linear", or "1.*" and "4.*" around ReLU and Dropout for "mlp".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from headstart.calibration import softmax
from headstart.config import HEAD_KINDS, check_head_params, is_int
from headstart.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn


STD_FLOOR = 0.1
"""Each feature is scaled by 1 / (std + STD_FLOOR * mean std over features)."""

HeadState = dict[str, NDArray[np.float32]]
"""A head's parameters and standardisation statistics, by their torch state-dict names."""


@dataclass(frozen=True, eq=False)
class Head:
    """A fitted head, ready to predict: NumPy only.

    What a `Model` holds and a bundle saves (`params` in bundle.json, `weights` in
    model.safetensors); `HeadClassifier.fit` makes one, its `head_`.

    Attributes:
        params: the `HeadClassifier` parameters it was fitted with.
        classes: the class labels, sorted; column order of `logits` and `predict_proba`.
        weights: its float32 arrays by name (see the module docstring).
    """

    params: dict[str, Any]
    classes: NDArray[Any]
    weights: HeadState

    @property
    def kind(self) -> str:
        """ "linear" or "mlp"."""
        return head_kind(self.weights)

    @property
    def n_features(self) -> int:
        """The number of features it takes."""
        return int(self.weights["0.mean"].shape[0])

    def logits(self, X: ArrayLike) -> NDArray[np.float32]:
        """Logits, float32 of shape (n_samples, n_classes), of features X of shape (n_samples, n_features).

        Raises:
            ConfigError: X is not a finite array of that shape.
        """
        return compute_logits(self.weights, as_features(X, "X", self.n_features))

    def predict_proba(self, X: ArrayLike) -> NDArray[np.float32]:
        """Class probabilities, float32 of shape (n_samples, n_classes): the softmax of `logits`."""
        return softmax(self.logits(X))

    def logit_gradient(self, X: ArrayLike, class_index: int) -> NDArray[np.float32]:
        """Gradient of class `class_index`'s logit with respect to each row of X: float32, shape like X (n_samples, n_features).

        What Grad-CAM weights a feature map's channels by.
        """
        features = as_features(X, "X", self.n_features)
        if not is_int(class_index, 0, len(self.classes) - 1):
            raise ConfigError(f"class_index must be an integer from 0 to {len(self.classes) - 1}, got {class_index!r}.")
        w = self.weights
        if self.kind == "linear":
            return np.repeat((w["1.weight"][class_index] / w["0.scale"])[None], len(features), axis=0)
        hidden = ((features - w["0.mean"]) / w["0.scale"]) @ w["1.weight"].T + w["1.bias"]
        grad_hidden = (hidden > 0) * w["4.weight"][class_index]
        return (grad_hidden @ w["1.weight"]) / w["0.scale"]  # type: ignore[no-any-return]

    def to_torch(self) -> nn.Sequential:
        """The equivalent torch module, in eval mode; its state dict is named as `weights`. Imports torch."""
        return create_torch_head(self.weights, self.params.get("dropout", 0.5)).eval()

    def with_weights_from(self, module: nn.Module) -> Head:
        """This head with its weights read from a torch module shaped like `to_torch()` (e.g. after fine-tuning).

        Raises:
            ConfigError: the module's state dict has other names or shapes.
        """
        weights = read_torch_head(module)
        expected = {k: v.shape for k, v in self.weights.items()}
        _check_shapes({k: v.shape for k, v in weights.items()}, expected, f"the fitted {self.kind} head")
        return Head(dict(self.params), self.classes, weights)

    @classmethod
    def from_state(cls, params: Mapping[str, Any], classes: Sequence[str], state: Mapping[str, Any]) -> Head:
        """A saved head from its parameters, class labels and state (NumPy arrays or torch tensors), all checked.

        The state's names and shapes are checked against what the parameters call for
        (missing ones take `HeadClassifier`'s defaults) before any array is copied.

        Raises:
            ConfigError: an unknown or invalid parameter, or a state that does not match the parameters and classes.
        """
        check_head_params(params)
        kind, hidden = params.get("head", "linear"), params.get("hidden", 512)
        found = {k: tuple(int(d) for d in np.shape(v)) for k, v in state.items()}
        mean_shape = found.get("0.mean", ())
        n_features = mean_shape[0] if len(mean_shape) == 1 else 0
        expected = head_shapes(kind, n_features, len(classes), hidden)
        what = f"a {kind} head" + (f" of width {hidden}" if kind == "mlp" else "")
        _check_shapes(found, expected, f"{what} for {len(classes)} classes")
        weights: HeadState = {}
        for name in expected:
            try:
                weights[name] = np.asarray(state[name]).astype(np.float32)  # a copy, also of a torch tensor
            except (TypeError, ValueError, RuntimeError) as e:
                raise ConfigError(f"Head weight '{name}' is not a float array: {e}") from None
            if not np.isfinite(weights[name]).all():
                raise ConfigError(f"Head weight '{name}' contains NaN or infinite values.")
        return cls(dict(params), np.asarray(classes), weights)


def as_features(X: ArrayLike, name: str, n_features: int) -> NDArray[np.float32]:
    """X as a finite float32 array of shape (n_samples, n_features).

    Raises:
        ConfigError: X is not an array of numbers of that shape, or holds NaN or infinite values.
    """
    try:
        features = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be an array of numbers: {e}") from None
    if features.ndim != 2:
        raise ConfigError(f"Expected {name} of shape (n_samples, n_features), got {features.shape}; reshape a single row with X[None].")
    if features.shape[1] != n_features:
        raise ConfigError(f"{name} has {features.shape[1]} features, but the head was fitted on {n_features}.")
    if not np.isfinite(features).all():
        raise ConfigError(f"{name} contains NaN or infinite values.")
    return features


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


def _check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise ConfigError naming every array whose name or shape differs from `expected`."""
    if dict(found) == dict(expected):
        return
    detail = "; ".join(f"{k}: {found.get(k, 'missing')} instead of {v}" for k, v in expected.items() if found.get(k) != v)
    detail += "".join(f"; unexpected {k}" for k in sorted(found.keys() - expected.keys()))
    raise ConfigError(f"Head weights do not match {what}: {detail.removeprefix('; ')[:300]}")


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
