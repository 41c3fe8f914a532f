"""Configuration: preprocessing (a frozen value that travels with the weights), the head's settings, the cache location, progress reporting."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from headstart.errors import ConfigError

HEAD_KINDS = ("linear", "mlp")
SOLVERS = ("auto", "lbfgs", "adamw")
HEAD_PARAMETERS = (
    "head",
    "C",
    "solver",
    "hidden",
    "dropout",
    "lr",
    "weight_decay",
    "batch_size",
    "max_epochs",
    "patience",
    "class_weight",
    "random_state",
    "validation_fraction",
)
"""`HeadClassifier`'s parameters, the keys of a bundle's `head` settings."""
MAX_HIDDEN = 1 << 16
MAX_CLASS_WEIGHT = 1e6

Interpolation = Literal["bicubic", "bilinear", "nearest"]


def default_cache_dir() -> Path:
    """Where features and exported engines are cached: `$HEADSTART_CACHE_DIR`, else `$XDG_CACHE_HOME/headstart`, else `~/.cache/headstart`."""
    if os.environ.get("HEADSTART_CACHE_DIR"):
        return Path(os.environ["HEADSTART_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "headstart"


def is_int(value: Any, low: int = 0, high: int = 1 << 62) -> bool:
    """Whether `value` is an integer (not a bool) from `low` to `high`: for values read from files or given by users."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= int(value) <= high


def is_finite_number(value: Any) -> bool:
    """Whether `value` is a real number (not a bool), neither NaN nor infinite."""
    try:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int too large for a float, e.g. read from a file
        return False


class Progress(Protocol):
    """Called as progress(description, done, total, status) while long work runs.

    One bar per description; `status` is a short running summary such as "loss 0.31".
    """

    def __call__(self, description: str, done: int, total: int, status: str = "", /) -> None: ...


@dataclass(frozen=True)
class DataConfig:
    """How an image becomes a backbone input.

    The short side is resized to `resize_size` with `interpolation`, a centred
    `input_size` square is cropped, and pixels in [0, 1] are normalised with
    `mean` and `std` per RGB channel.
    """

    input_size: int = 224
    resize_size: int = 256
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_timm(cls, cfg: dict[str, Any]) -> DataConfig:
        """Build from `timm.data.resolve_model_data_config` output."""
        input_size = int(cfg["input_size"][-1])
        interpolation = cfg.get("interpolation", "bicubic")
        if interpolation not in ("bicubic", "bilinear", "nearest"):
            interpolation = "bicubic"
        return cls(
            input_size=input_size,
            resize_size=math.floor(input_size / float(cfg.get("crop_pct") or 0.875)),
            interpolation=interpolation,
            mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """The inverse of `to_dict`; ValueError for a field out of type or range (e.g. from an edited file)."""

        mean, std = d["mean"], d["std"]
        if not (
            is_int(d["input_size"], 16, 2048)
            and is_int(d["resize_size"], d["input_size"], 4096)
            and d["interpolation"] in ("bicubic", "bilinear", "nearest")
            and isinstance(mean, list | tuple)
            and len(mean) == 3
            and all(is_finite_number(v) for v in mean)
            and isinstance(std, list | tuple)
            and len(std) == 3
            and all(is_finite_number(v) and v > 0 for v in std)
        ):
            raise ValueError(f"not a valid data config: {d!r:.200}")
        return cls(d["input_size"], d["resize_size"], d["interpolation"], tuple(float(v) for v in mean), tuple(float(v) for v in std))  # type: ignore[arg-type]


def check_head_params(params: Mapping[str, Any]) -> None:
    """Raise ConfigError for a name that is not a `HeadClassifier` parameter, or a value outside what it accepts.

    Parameters missing from `params` are not checked: they take their defaults.
    """
    unknown = sorted(str(name)[:40] for name in set(params) - set(HEAD_PARAMETERS))
    if unknown:
        raise ConfigError(f"Unknown head parameters {unknown[:3]}; this version of headstart knows {sorted(HEAD_PARAMETERS)}.")
    head, solver = params.get("head", "linear"), params.get("solver", "auto")
    if head not in HEAD_KINDS:
        raise ConfigError(f"Unknown head {_shown(head)}. Choose one of: {', '.join(HEAD_KINDS)}.")
    if solver not in SOLVERS or (solver == "lbfgs" and head != "linear"):
        raise ConfigError(f"solver must be 'auto', 'lbfgs' (linear head only) or 'adamw', got {_shown(solver)} for a {head} head.")
    if "C" in params and not (is_finite_number(params["C"]) and params["C"] > 0):
        raise ConfigError(f"C must be a finite number above 0, got {_shown(params['C'])}.")
    class_weight = params.get("class_weight")
    if not (class_weight is None or (isinstance(class_weight, str) and class_weight == "balanced") or _is_weight_map(class_weight)):
        raise ConfigError(
            f"class_weight must be None, 'balanced' or a dict of class: weight (a number above 0, at most {MAX_CLASS_WEIGHT:g}), "
            f"got {_shown(class_weight)}."
        )
    for name, low, high in (
        ("hidden", 1, MAX_HIDDEN),
        ("batch_size", 1, 1 << 20),
        ("max_epochs", 1, 1 << 20),
        ("patience", 1, 1 << 20),
        ("random_state", 0, (1 << 32) - 1),
    ):
        value = params.get(name, low)
        if not (is_int(value, low, high) or (name == "random_state" and value is None)):
            raise ConfigError(
                f"{name} must be an integer from {low} to {high}{' or None' if name == 'random_state' else ''}, got {_shown(value)}."
            )
    for name in ("dropout", "lr", "weight_decay", "validation_fraction"):
        value = params.get(name, 0.0)
        if not (is_finite_number(value) and value >= 0):
            raise ConfigError(f"{name} must be a finite number of at least 0, got {_shown(value)}.")
        if name in ("dropout", "validation_fraction") and not value < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {value}.")


def uses_lbfgs(params: Mapping[str, Any]) -> bool:
    """Whether a head with these parameters is fitted by L-BFGS (the linear head with solver "auto" or "lbfgs"), whose strength is `C`."""
    return params.get("head", "linear") == "linear" and params.get("solver", "auto") in ("auto", "lbfgs")


def _is_weight_map(value: Any) -> bool:
    return isinstance(value, dict) and all(is_finite_number(w) and 0 < w <= MAX_CLASS_WEIGHT for w in value.values())


def _shown(value: Any) -> str:
    """A value's repr, cut to a length that fits an error line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
