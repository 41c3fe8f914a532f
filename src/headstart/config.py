"""Configuration: preprocessing (a frozen value that travels with the weights), the cache location, progress reporting."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

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
    """Whether `value` is an int or float (not a bool), neither NaN nor infinite."""
    try:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
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
