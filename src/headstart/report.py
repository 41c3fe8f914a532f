"""Figures people look at, drawn with matplotlib's object-oriented API (Agg, no display)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from headstart.files import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def image_grid(rows: Sequence[Sequence[Image.Image]], titles: Sequence[Sequence[str]], cell_inches: float = 1.8) -> Figure:
    """A grid of images, one row per sequence, each titled."""
    from matplotlib.figure import Figure

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    figure = Figure(figsize=(cell_inches * n_cols, cell_inches * n_rows + 0.3), layout="constrained")
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    for r, (images, names) in enumerate(zip(rows, titles, strict=True)):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c < len(images):
                ax.imshow(images[c])
                ax.set_title(names[c], fontsize=8)
    return figure


def save_figure(figure: Figure, path: Path, dpi: int = 100) -> Path:
    """Render to PNG and write atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())
