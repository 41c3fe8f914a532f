"""Figures and the HTML report, drawn with matplotlib's object-oriented API (Agg, no display).

Everything here is a function of values (histories, evaluations, images) that
returns a Figure or a string; only `save_figure` and `write_report` touch the disk.
Names are data: figures draw text with mathtext off (`$` stays a dollar sign), and
file and class names pass through `files.display` (and `html.escape` on the page).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from headstart.data import load_image
from headstart.files import atomic_write_bytes, display
from headstart.metrics import Evaluation
from headstart.model import Model, Scores

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CORRECT = "#1a7f37"  # green
WRONG = "#cf222e"  # red
TRAIN_COLOUR = "#0969da"
VAL_COLOUR = "#bc4c00"


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    titles: Sequence[Sequence[str]],
    colours: Sequence[Sequence[str]] | None = None,
    cell_inches: float = 1.9,
) -> Figure:
    """A grid of images, one row per sequence, each titled (in the given colour) as plain text: no mathtext."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    figure = _figure(cell_inches * n_cols, cell_inches * n_rows + 0.3)
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c < len(rows[r]):
                ax.imshow(rows[r][c])
                colour = colours[r][c] if colours else "black"
                ax.set_title(titles[r][c], fontsize=8, color=colour, parse_math=False)
                if colours:  # a frame in the same colour, so correct and wrong differ by more than text
                    ax.set_axis_on()
                    ax.set_xticks([])
                    ax.set_yticks([])
                    for spine in ax.spines.values():
                        spine.set_edgecolor(colour)
                        spine.set_linewidth(3)
    return figure


def curves(history: Sequence[dict[str, Any]]) -> Figure:
    """Loss and accuracy per epoch, training vs validation, for each training phase."""
    figure = _figure(10, 3.6)
    loss_ax, acc_ax = figure.subplots(1, 2)
    x = np.arange(1, len(history) + 1)
    for ax, key, label in ((loss_ax, "loss", "loss"), (acc_ax, "accuracy", "accuracy")):
        for prefix, colour, name in (("", TRAIN_COLOUR, "training"), ("val_", VAL_COLOUR, "validation")):
            values = [row.get(prefix + key, np.nan) for row in history]
            if not np.all(np.isnan(np.asarray(values, dtype=float))):
                ax.plot(x, values, marker="o", markersize=3, color=colour, label=f"{name} {label}")
        boundary = next((i for i, row in enumerate(history) if row.get("phase") == "finetune"), None)
        if boundary:
            ax.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=1, label="fine-tuning starts")
        ax.set_xlabel("epoch (all phases)")
        ax.set_title(label.capitalize())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure


def confusion(evaluation: Evaluation) -> Figure:
    """The confusion matrix as counts and as fractions of each true class."""
    n = len(evaluation.classes)
    size = max(4.0, 0.6 * n + 2)
    figure = _figure(2 * size, size)
    counts = evaluation.confusion
    rows = counts.sum(1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    for ax, values, title, fmt in zip(
        figure.subplots(1, 2), (counts, normalised), ("counts", "normalised by true class"), ("d", ".2f"), strict=True
    ):
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        names = [display(c) for c in evaluation.classes]
        ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8, parse_math=False)
        ax.set_yticks(range(n), names, fontsize=8, parse_math=False)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Confusion matrix ({title})")
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    format(values[i, j], fmt),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if normalised[i, j] > 0.5 else "black",
                )
    return figure


def feature_map_grid(rows: Sequence[Sequence[NDArray[np.float32]]], stage_names: Sequence[str]) -> Figure:
    """Intermediate feature maps: one row per stage, one column per channel (viridis)."""
    n_cols = max(len(r) for r in rows)
    figure = _figure(1.4 * n_cols, 1.5 * len(rows))
    axes = figure.subplots(len(rows), n_cols, squeeze=False)
    for r, (maps, name) in enumerate(zip(rows, stage_names, strict=True)):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c < len(maps):
                ax.imshow(maps[c], cmap="viridis")
                ax.set_title(f"{display(name)} ch {c}" if c == 0 else f"ch {c}", fontsize=7, parse_math=False)
    return figure


def png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_figure(figure: Figure, path: Path, dpi: int = 100) -> Path:
    """Render to PNG and write atomically."""
    return atomic_write_bytes(path, png_bytes(figure, dpi))


@dataclass(frozen=True)
class Section:
    """One part of the report: a heading, and HTML built from `table`, `figure` and `paragraph`."""

    title: str
    body: str


def _html(text: object) -> str:
    return html.escape(display(str(text)))


def paragraph(text: str) -> str:
    return f"<p>{_html(text)}</p>"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_html(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_html(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure_html(figure: Figure, caption: str, name: str) -> str:
    """The figure inlined as a base64 PNG, with alt text and a caption."""
    data = base64.b64encode(png_bytes(figure)).decode()
    alt = _html(caption)
    return f'<figure id="{name}"><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2rem auto;padding:0 1rem;color:#1f2328}
h1{font-size:1.6rem}h2{font-size:1.2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:right}
td:first-child,th:first-child{text-align:left}figure{margin:1rem 0}img{max-width:100%}
figcaption{color:#57606a;font-size:.9rem}.key{display:inline-block;padding:0 .4rem;color:white;border-radius:3px}
"""


def render_html(title: str, sections: Sequence[Section]) -> str:
    """A self-contained page: styles inline, images as data URLs."""
    parts = [f'<section id="{_html(s.title.lower().replace(" ", "-"))}"><h2>{_html(s.title)}</h2>{s.body}</section>' for s in sections]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_html(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{_html(title)}</h1>{''.join(parts)}</body></html>\n"
    )


def write_report(path: Path, title: str, sections: Sequence[Section]) -> Path:
    return atomic_write_bytes(path, render_html(title, sections).encode())


def build_report(model: Model, scores: Scores, out: Path, n_grid: int = 16, n_top: int = 8, n_cam: int = 3, seed: int = 0) -> Path:
    """Write `report.html` for `model` from its `scores` on labelled images (usually its validation split).

    Returns the path written.
    """
    from headstart.explain import grad_cam, overlay
    from headstart.transforms import preprocess, resize_and_crop

    s = model.summary
    kept, y_true, proba, evaluation = scores.records, scores.y_true, scores.proba, scores.evaluation
    y_pred = proba.argmax(1) if len(kept) else np.zeros(0, np.int64)
    losses = -np.log(np.clip(proba[np.arange(len(kept)), y_true], 1e-12, 1)) if len(kept) else np.zeros(0)
    cfg = model.backbone.data_config

    def view(i: int) -> Image.Image:
        return resize_and_crop(load_image(kept[i].path), cfg)

    def tile_title(i: int) -> tuple[str, str]:
        ok = y_pred[i] == y_true[i]
        mark = "✓" if ok else "✗"
        true, pred = display(kept[i].label), display(model.classes[y_pred[i]])
        return f"{mark} true {true}\npred {pred} ({proba[i, y_pred[i]]:.2f})", CORRECT if ok else WRONG

    sections = [Section("Summary", _summary_html(model, evaluation, len(kept)))]
    if s.get("history"):
        sections.append(
            Section("Training curves", figure_html(curves(s["history"]), "Loss and accuracy per epoch, training vs validation.", "curves"))
        )
    if len(kept):
        sections.append(
            Section(
                "Confusion matrix",
                figure_html(confusion(evaluation), "Confusion matrix: counts and normalised by true class.", "confusion"),
            )
        )
        sections.append(Section("Per-class scores", _per_class_html(evaluation)))
        rng = np.random.default_rng(seed)
        sample = sorted(rng.choice(len(kept), size=min(n_grid, len(kept)), replace=False).tolist())
        sections.append(
            Section(
                "Validation predictions",
                _legend()
                + figure_html(
                    _tiles(sample, view, tile_title, 4),
                    "A sample of validation images: true and predicted class, correct in green (✓), wrong in red (✗).",
                    "predictions",
                ),
            )
        )
        wrong = [int(i) for i in np.argsort(-losses, kind="stable") if y_pred[i] != y_true[i]][:n_top]
        top = (
            figure_html(
                _tiles(wrong, view, tile_title, 4),
                "Top losses: the most confidently wrong validation images. Mislabelled photos show up here first.",
                "top-losses",
            )
            if wrong
            else paragraph("No validation image was misclassified.")
        )
        sections.append(Section("Top losses", top))
        correct = [int(i) for i in np.argsort(losses, kind="stable") if y_pred[i] == y_true[i]][:n_cam]
        rows, titles, colours = [], [], []
        for i in correct + wrong[:n_cam]:
            batch = torch.from_numpy(preprocess(load_image(kept[i].path), cfg))[None]
            cam = grad_cam(model.backbone, batch, int(y_pred[i]), model.head.head_)
            title, colour = tile_title(i)
            rows.append([view(i), overlay(view(i), cam)])
            titles.append([title, f"Grad-CAM for '{display(model.classes[y_pred[i]])}'"])
            colours.append([colour, colour])
        cams = figure_html(
            image_grid(rows, titles, colours, cell_inches=2.4),
            "Grad-CAM: where the network looked for the predicted class (red = most), for correct and wrong validation images.",
            "gradcam",
        )
        sections.append(Section("Class activation maps", cams))
    return write_report(out, f"headstart report: {s.get('backbone', model.backbone.name)} on {s.get('data', 'data')}", sections)


def _tiles(indices: Sequence[int], view: Any, title: Any, n_cols: int) -> Figure:
    rows = [list(indices[k : k + n_cols]) for k in range(0, len(indices), n_cols)]
    labels = [[title(i) for i in row] for row in rows]
    return image_grid(
        [[view(i) for i in row] for row in rows], [[t for t, _ in row] for row in labels], [[c for _, c in row] for row in labels]
    )


def _legend() -> str:
    return f'<p><span class="key" style="background:{CORRECT}">✓ correct</span> <span class="key" style="background:{WRONG}">✗ wrong</span></p>'


def _summary_html(model: Model, evaluation: Evaluation, n_scored: int) -> str:
    s = model.summary
    strategy = s.get("strategy", "linear")
    facts = [
        ("backbone", f"{model.backbone.name}" + (f" (stage {model.backbone.layer} features)" if model.backbone.layer is not None else "")),
        ("strategy", strategy + (f" — {s['auto']['reason']}" if "auto" in s else "")),
        ("head", model.head.head),
        ("classes", ", ".join(model.classes)),
        ("scored images", n_scored),
        ("accuracy", f"{evaluation.accuracy:.4f}"),
    ]
    if "finetune" in s and s["finetune"].get("frozen_validation"):
        facts.append(("accuracy of the frozen-backbone head", f"{s['finetune']['frozen_validation']['accuracy']:.4f}"))
    if "seconds" in s:
        facts.append(("training time", f"{s['seconds']:.1f} s"))
    body = table(["", ""], facts)
    if s.get("n_train"):
        body += table(
            ["class", "training images", "validation images"], [(c, s["n_train"].get(c, 0), s["n_val"].get(c, 0)) for c in model.classes]
        )
    skipped = s.get("skipped", [])
    body += (
        table(["skipped file", "reason"], [(d["path"], d["reason"]) for d in skipped]) if skipped else paragraph("No files were skipped.")
    )
    return body


def _per_class_html(evaluation: Evaluation) -> str:
    rows = [
        (name, f"{p:.3f}", f"{r:.3f}", f"{f:.3f}", int(n))
        for name, p, r, f, n in zip(
            evaluation.classes, evaluation.precision, evaluation.recall, evaluation.f1, evaluation.support, strict=True
        )
    ]
    return table(["class", "precision", "recall", "F1", "images"], rows)
