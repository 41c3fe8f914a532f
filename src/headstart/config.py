"""Configuration: preprocessing (a frozen value that travels with the weights), the cache location, progress reporting."""

from __future__ import annotations

import math
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
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            interpolation=d["interpolation"],
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
        )
