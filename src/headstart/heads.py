"""Classifier heads that sit on pooled backbone features."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from headstart.errors import ConfigError

HEAD_KINDS = ("linear", "mlp")


STD_FLOOR = 0.1
"""Each feature is scaled by 1 / (std + STD_FLOOR * mean std over features)."""


class Standardize(nn.Module):
    """(x - mean) / scale with the training features' statistics, kept as buffers."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    def fit(self, features: torch.Tensor) -> Standardize:
        """Take mean and scale from training features of shape (n, n_features).

        Features that barely vary (often exact zeros) must not be blown up, so the
        scale has a floor proportional to the typical spread.
        """
        std = features.std(0)
        self.mean.copy_(features.mean(0))
        self.scale.copy_(std + STD_FLOOR * std.mean() + 1e-8)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def standardizer(head: nn.Sequential) -> Standardize:
    """The input standardisation layer every head starts with."""
    first = head[0]
    if not isinstance(first, Standardize):
        raise TypeError(f"Expected a head starting with Standardize, got {type(first).__name__}.")
    return first


def _linear(n_features: int, n_classes: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(Standardize(n_features), nn.Linear(n_features, n_classes))


def _mlp(n_features: int, n_classes: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        Standardize(n_features),
        nn.Linear(n_features, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, n_classes),
    )


_BUILDERS: dict[str, Callable[[int, int, int, float], nn.Sequential]] = {"linear": _linear, "mlp": _mlp}


def build_head(kind: str, n_features: int, n_classes: int, hidden: int = 512, dropout: float = 0.5) -> nn.Sequential:
    """A head mapping (n, n_features) features to (n, n_classes) logits.

    `linear` is multinomial logistic regression; `mlp` is Dense(hidden) + ReLU +
    Dropout + Dense. Both standardise their input first.
    """
    if kind not in _BUILDERS:
        raise ConfigError(f"Unknown head '{kind}'. Choose one of: {', '.join(HEAD_KINDS)}.")
    return _BUILDERS[kind](n_features, n_classes, hidden, dropout)
