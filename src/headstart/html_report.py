"""The HTML report, and the matplotlib figures that commands save as PNG.

Everything here is a function of values (histories, evaluations, images) that
returns a Figure or a string; only `save_figure`, `write_report` and `build_report`
touch the disk. The report draws images as HTML: JPEG thumbnails with HTML captions,
the confusion matrix as a shaded table; only the training curves are a matplotlib
figure, and matplotlib is imported inside the functions that draw; Grad-CAM comes from `gradcam`.
Names are data: file and class names pass through `files.display` and `html.escape`
on the page, and figures draw text with mathtext off (`$` stays a dollar sign).
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
from numpy.typing import NDArray
from PIL import Image

from headstart.config import DataConfig
from headstart.data import decode_image, load_image
from headstart.files import atomic_write_bytes, display
from headstart.metrics import Evaluation
from headstart.transforms import resize_and_crop

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from headstart.calibration import ReliabilityBins
    from headstart.model import Model, Scores
    from headstart.suspects import SuspectLabel

CORRECT = "#1a7f37"  # green
WRONG = "#cf222e"  # red
TRAIN_COLOUR = "#0969da"
VAL_COLOUR = "#bc4c00"
# matplotlib's "Blues" at 0, 1/8, ..., 1: the confusion table's shading.
_BLUES = np.array(
    [
        (247, 251, 255),
        (222, 235, 247),
        (198, 219, 239),
        (157, 202, 225),
        (106, 174, 214),
        (65, 145, 198),
        (32, 112, 180),
        (8, 80, 155),
        (8, 48, 107),
    ],
    dtype=float,
)


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
    """Loss and accuracy per epoch, training vs validation, for each training phase.

    Margins are fixed rather than laid out (constrained layout costs more than the drawing):
    the labels are short and fixed, so they always fit.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6))
    figure.subplots_adjust(left=0.06, right=0.985, bottom=0.14, top=0.9, wspace=0.18)
    loss_ax, acc_ax = figure.subplots(1, 2)
    x = np.arange(1, len(history) + 1)
    for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        for prefix, colour, name in (("", TRAIN_COLOUR, "training"), ("val_", VAL_COLOUR, "validation")):
            values = [row.get(prefix + key, np.nan) for row in history]
            if not np.all(np.isnan(np.asarray(values, dtype=float))):
                ax.plot(x, values, marker="o", markersize=3, color=colour, label=f"{name} {key}")
        boundary = next((i for i, row in enumerate(history) if row.get("phase") == "finetune"), None)
        if boundary:
            ax.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=1, label="fine-tuning starts")
        ax.set_xlabel("epoch (all phases)")
        ax.set_title(key.capitalize(), parse_math=False)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure


def reliability_diagram(before: ReliabilityBins, after: ReliabilityBins) -> Figure:
    """Accuracy against confidence per bin, before and after temperature scaling; the diagonal is perfect calibration."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6))
    figure.subplots_adjust(left=0.06, right=0.985, bottom=0.14, top=0.9, wspace=0.18)
    for ax, bins, name in zip(figure.subplots(1, 2), (before, after), ("Before (temperature 1)", "After temperature scaling")):
        edges = np.asarray(bins.edges)
        filled = np.asarray(bins.counts) > 0
        ax.bar(edges[:-1][filled], np.asarray(bins.accuracy)[filled], width=np.diff(edges)[filled], align="edge",
               color=VAL_COLOUR, edgecolor="white", alpha=0.85, label="accuracy")  # fmt: skip
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        ax.plot(
            np.asarray(bins.confidence)[filled],
            np.asarray(bins.accuracy)[filled],
            "o",
            color=TRAIN_COLOUR,
            markersize=3,
            label="accuracy at the mean confidence",
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_title(f"{name}: ECE {bins.ece:.3f}", parse_math=False)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
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


def accuracy_bars(labels: Sequence[str], means: Sequence[float], stds: Sequence[float]) -> Figure:
    """Horizontal bars of accuracy (as %) with standard-deviation error bars, the first label at the top; labels as plain text."""
    figure = _figure(9, 0.8 + 0.32 * len(labels))
    ax = figure.subplots()
    y = np.arange(len(labels))
    ax.barh(y, 100 * np.asarray(means), xerr=100 * np.asarray(stds), color=TRAIN_COLOUR, capsize=3)
    ax.set_yticks(y, [display(label) for label in labels], fontsize=8)
    for tick in ax.get_yticklabels():
        tick.set_parse_math(False)
    ax.invert_yaxis()
    low = 100 * min((m - s for m, s in zip(means, stds)), default=0)
    ax.set_xlim(max(0.0, low - 5), 100)
    ax.set_xlabel("accuracy, % (mean ± std over folds)")
    ax.grid(axis="x", alpha=0.3)
    return figure


def png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": "headstart"})  # the mark `output_file` looks for
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
    """An HTML table of plain-text cells (escaped here); a header of empty strings is left out."""
    head = f"<thead><tr>{''.join(f'<th>{_html(h)}</th>' for h in header)}</tr></thead>" if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{_html(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def figure_html(figure: Figure, caption: str, name: str) -> str:
    """The figure inlined as a base64 PNG, with alt text and a caption."""
    data = base64.b64encode(png_bytes(figure)).decode()
    alt = _html(caption)
    return f'<figure id="{name}"><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


def jpeg_url(image: Image.Image, quality: int = 85) -> str:
    """The image as a `data:image/jpeg;base64,...` URL."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_tile(image: Image.Image, lines: Sequence[str], alt: str, correct: bool | None = None, note: str | None = None) -> str:
    """One image as an HTML `<figure>`: a JPEG thumbnail captioned with `lines` of plain text (escaped here).

    `correct` frames it in green and starts the caption with ✓ (True), or in red with ✗ (False);
    `note` (e.g. the file name) is a last, smaller line.
    """
    kind, mark = ("", "") if correct is None else ("ok", "✓") if correct else ("wrong", "✗")
    caption = "<br>".join(_html(line) for line in lines)
    if mark:
        caption = f'<span class="mark" role="img" aria-label="{"correct" if correct else "wrong"}">{mark}</span> {caption}'
    if note is not None:
        caption += f'<br><small title="{_html(note)}">{_html(note)}</small>'
    return (
        f'<figure class="{f"tile {kind}" if kind else "tile"}"><img src="{jpeg_url(image)}" alt="{_html(alt)}" width="{image.width}" height="{image.height}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def tiles_html(tiles: Sequence[str], caption: str, name: str) -> str:
    """Tiles from `image_tile` (or groups of them) wrapped in a `<figure>` with id `name` and a caption."""
    return f'<figure id="{name}"><div class="tiles">{"".join(tiles)}</div><figcaption>{_html(caption)}</figcaption></figure>'


def _shades(fractions: NDArray[np.float64]) -> tuple[NDArray[np.str_], NDArray[np.str_]]:
    """For each fraction (0 to 1): its background on the Blues scale as #rrggbb, and the text colour,
    white or near-black (#1f2328), whichever contrasts more with it (WCAG relative luminance)."""
    stops = np.linspace(0, 1, len(_BLUES))
    rgb = np.stack([np.interp(fractions, stops, _BLUES[:, k]) for k in range(3)], axis=-1)
    linear = np.where(rgb / 255 <= 0.04045, rgb / 255 / 12.92, ((rgb / 255 + 0.055) / 1.055) ** 2.4)
    luminance = linear @ np.array([0.2126, 0.7152, 0.0722])
    dark = 0.0165  # the relative luminance of #1f2328
    white_text = 1.05 / (luminance + 0.05) > (luminance + 0.05) / (dark + 0.05)
    channels = np.round(rgb).astype(int)
    backgrounds = np.vectorize(lambda r, g, b: f"#{r:02x}{g:02x}{b:02x}")(channels[..., 0], channels[..., 1], channels[..., 2])
    return backgrounds, np.where(white_text, "#ffffff", "#1f2328")


def confusion_table(evaluation: Evaluation) -> str:
    """The confusion matrix as an HTML table: a row per true class, a column per predicted class.

    Each cell holds the number of images and, below it, that number as a fraction of its row
    (of the true class), which also sets the cell's shade of blue.
    """
    counts = np.asarray(evaluation.confusion, dtype=np.int64).reshape(len(evaluation.classes), len(evaluation.classes))
    totals = counts.sum(1)
    fractions = np.divide(counts, totals[:, None], out=np.zeros(counts.shape), where=totals[:, None] > 0)
    backgrounds, colours = _shades(fractions)
    names = [_html(c) for c in evaluation.classes]
    columns = "".join(f'<th scope="col">{name}</th>' for name in names)
    head = f'<tr><td></td><th scope="colgroup" colspan="{len(names)}">predicted</th></tr><tr><th scope="col">true</th>{columns}</tr>'
    rows = []
    for i, true in enumerate(names):
        cells = []
        for j, predicted in enumerate(names):
            n, fraction = int(counts[i, j]), float(fractions[i, j])
            hint = f"true {true}, predicted {predicted}: {n} of {int(totals[i])}"
            hit = ' class="hit"' if i == j else ""
            cells.append(
                f'<td{hit} style="background:{backgrounds[i, j]};color:{colours[i, j]}" title="{hint}">'
                f'<span class="n">{n}</span><span class="f">{fraction:.2f}</span></td>'
            )
        rows.append(f'<tr><th scope="row">{true}</th>{"".join(cells)}</tr>')
    caption = "Rows are true classes, columns predicted ones; each cell: the number of images and, below, its fraction of the row."
    return (
        f'<div class="scroll"><table id="confusion" class="confusion"><caption>{caption}</caption>'
        f"<thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


_STYLE = f"""
body{{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2rem auto;padding:0 1rem;color:#1f2328}}
h1{{font-size:1.6rem}}h2{{font-size:1.2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2rem}}
table{{border-collapse:collapse;margin:.5rem 0}}td,th{{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:right}}
td:first-child,th:first-child{{text-align:left}}figure{{margin:1rem 0}}img{{max-width:100%}}
figcaption{{color:#57606a;font-size:.9rem}}.key{{display:inline-block;padding:0 .4rem;color:white;border-radius:3px}}
.scroll{{overflow-x:auto}}.confusion caption{{caption-side:bottom;text-align:left;color:#57606a;font-size:.9rem;padding-top:.3rem}}
.confusion th{{max-width:9rem;overflow-wrap:anywhere}}.confusion thead th,.confusion td{{text-align:center}}
.confusion td{{min-width:3.5rem}}.confusion .hit .n{{font-weight:700}}.confusion .f{{display:block;font-size:.75rem}}
.tiles{{display:flex;flex-wrap:wrap;gap:.75rem;align-items:flex-start}}.pair{{display:flex;gap:.4rem}}
.tile{{margin:0;width:224px;border:4px solid #d0d7de;border-radius:4px;background:#fff}}
.tile img{{display:block;width:100%;height:auto}}.tile figcaption{{padding:.2rem .35rem;font-size:.8rem;overflow-wrap:anywhere}}
.tile small{{color:#57606a}}.ok{{border-color:{CORRECT}}}.ok figcaption{{color:{CORRECT}}}
.wrong{{border-color:{WRONG}}}.wrong figcaption{{color:{WRONG}}}.mark{{font-weight:700}}.tiles+figcaption{{margin-top:.5rem}}
"""


def render_html(title: str, sections: Sequence[Section]) -> str:
    """A self-contained page: styles inline, images as data URLs."""
    parts = [f'<section id="{_html(s.title.lower().replace(" ", "-"))}"><h2>{_html(s.title)}</h2>{s.body}</section>' for s in sections]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="generator" content="headstart"><title>{_html(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{_html(title)}</h1>{''.join(parts)}</body></html>\n"
    )


def write_report(path: Path, title: str, sections: Sequence[Section]) -> Path:
    return atomic_write_bytes(path, render_html(title, sections).encode())


def build_report(
    model: Model,
    scores: Scores,
    out: Path,
    scored_on: str,
    n_grid: int = 16,
    n_top: int = 8,
    n_cam: int = 3,
    seed: int = 0,
    suspects: Sequence[SuspectLabel] | None = None,
) -> Path:
    """Write `report.html` for `model` from its `scores` on labelled images; `scored_on` says which images and predictions those are.

    With `suspects` (from `headstart.suspects`), a "Suspect labels" section shows the first of them.

    Returns the path written.
    """
    from headstart.gradcam import grad_cam_overlays

    s = model.summary
    kept, y_true, proba, evaluation = scores.records, scores.y_true, scores.proba, scores.evaluation
    y_pred = proba.argmax(1) if len(kept) else np.zeros(0, np.int64)
    losses = -np.log(np.clip(proba[np.arange(len(kept)), y_true], 1e-12, 1)) if len(kept) else np.zeros(0)
    cfg = model.data_configs[0]

    def tile(i: int, view: Image.Image | None = None) -> str:
        if view is None:  # a thumbnail needs no full-size decode
            view = decode_image(kept[i].path, lambda image: resize_and_crop(image, cfg), min_size=cfg.resize_size)
        predicted = model.classes[y_pred[i]]
        lines = [f"true {kept[i].label}", f"pred {predicted} ({proba[i, y_pred[i]]:.2f})"]
        name = kept[i].path.name
        return image_tile(view, lines, f"{name}: true {kept[i].label}, predicted {predicted}", bool(y_pred[i] == y_true[i]), note=name)

    sections = [Section("Summary", _summary_html(model, evaluation, len(kept), scored_on))]
    if s.history:
        sections.append(
            Section("Training curves", figure_html(curves(s.history), "Loss and accuracy per epoch, training vs validation.", "curves"))
        )
    if len(kept):
        sections.append(Section("Confusion matrix", confusion_table(evaluation)))
        sections.append(Section("Per-class scores", _per_class_html(evaluation)))
        if s.calibration is not None:
            sections.append(Section("Calibration", _calibration_html(model, proba, y_true)))
        rng = np.random.default_rng(seed)
        sample = sorted(rng.choice(len(kept), size=min(n_grid, len(kept)), replace=False).tolist())
        caption = "A sample of validation images: true and predicted class, correct in green (✓), wrong in red (✗)."
        sections.append(Section("Validation predictions", _legend() + tiles_html([tile(i) for i in sample], caption, "predictions")))
        wrong = [int(i) for i in np.argsort(-losses, kind="stable") if y_pred[i] != y_true[i]][:n_top]
        caption = "Top losses: the most confidently wrong validation images. Mislabelled photos show up here first."
        top = tiles_html([tile(i) for i in wrong], caption, "top-losses") if wrong else paragraph("No validation image was misclassified.")
        sections.append(Section("Top losses", top))
        correct = [int(i) for i in np.argsort(losses, kind="stable") if y_pred[i] == y_true[i]][:n_cam]
        chosen = correct + wrong[:n_cam]
        images = [load_image(kept[i].path) for i in chosen]
        pairs = []
        for i, image, cams in zip(chosen, images, grad_cam_overlays(model, images, [int(y_pred[i]) for i in chosen]), strict=True):
            predicted = model.classes[y_pred[i]]
            heatmaps = "".join(
                image_tile(
                    cam, [f"Grad-CAM{by} for '{predicted}'"], f"Grad-CAM heatmap{by} for '{predicted}'", bool(y_pred[i] == y_true[i])
                )
                for cam, by in zip(cams, [""] if len(cams) == 1 else [f" ({b.name})" for b in model.backbones], strict=True)
            )
            pairs.append(f'<div class="pair">{tile(i, resize_and_crop(image, cfg))}{heatmaps}</div>')
        caption = "Grad-CAM: where the network looked for the predicted class (red = most), for correct and wrong validation images."
        sections.append(Section("Class activation maps", tiles_html(pairs, caption, "gradcam")))
    if suspects is not None:
        sections.append(suspects_section(suspects, cfg))
    return write_report(out, f"headstart report: {s.backbone or model.backbone_name} on {s.data or 'data'}", sections)


def _calibration_html(model: Model, proba: NDArray[np.float32], y_true: NDArray[np.int64]) -> str:
    """The reliability diagram of these images before and after temperature scaling, and what training measured."""
    from headstart.calibration import reliability_bins, softmax

    record = model.summary.calibration
    assert record is not None
    before = softmax(np.log(np.clip(proba, 1e-30, 1)) * record.temperature)  # the probabilities at temperature 1
    lines = [
        f"Temperature {record.temperature:.3f}, fitted on {record.n_heldout} held-out images: "
        f"expected calibration error (15 bins) {record.ece_before:.4f} before, {record.ece_after:.4f} after."
    ]
    if record.score is not None and record.threshold is not None:
        rate = f"{record.heldout_unknown_rate:.1%}" if record.heldout_unknown_rate is not None else "?"
        lines.append(
            f"Unknown detection: '{record.score}' score, threshold {record.threshold:.4g}; {rate} of the held-out images are past it "
            "(an image past it is called unknown: it looks like none of the classes)."
        )
    caption = "Reliability: accuracy against confidence in 15 bins, before and after temperature scaling, on these images."
    figure = reliability_diagram(reliability_bins(before, y_true), reliability_bins(proba, y_true))
    return "".join(paragraph(line) for line in lines) + figure_html(figure, caption, "reliability")


def suspects_section(suspects: Sequence[SuspectLabel], data_config: DataConfig | None = None, n_shown: int = 16) -> Section:
    """The "Suspect labels" section: thumbnails of the first `n_shown` suspects, given vs suggested label.

    Images that cannot be read any more are left out of the grid.
    """
    from headstart.errors import UnreadableImageError

    if not suspects:
        return Section("Suspect labels", paragraph("No image's label is suspect: the out-of-fold predictions agree with every label."))
    cfg = data_config or DataConfig()
    tiles = []
    for s in suspects[:n_shown]:
        try:
            view = decode_image(s.path, lambda image: resize_and_crop(image, cfg), min_size=cfg.resize_size)
        except UnreadableImageError:
            continue
        lines = [f"#{s.rank} given {s.given} ({s.p_given:.2f})", f"suggested {s.suggested} ({s.p_suggested:.2f})"]
        tiles.append(image_tile(view, lines, f"{s.path.name}: given {s.given}, suggested {s.suggested}", note=s.path.name))
    caption = (
        f"The {len(tiles)} most suspect of {len(suspects)} suspect labels: images whose given label a head that never saw them "
        "finds least likely (out-of-fold, confident learning). Check each; relabel or remove the wrong ones."
    )
    return Section("Suspect labels", tiles_html(tiles, caption, "suspects"))


def _legend() -> str:
    return f'<p><span class="key" style="background:{CORRECT}">✓ correct</span> <span class="key" style="background:{WRONG}">✗ wrong</span></p>'


def _summary_html(model: Model, evaluation: Evaluation, n_scored: int, scored_on: str) -> str:
    s = model.summary
    facts: list[tuple[str, object]] = [
        ("backbone", _backbone_fact(model)),
        ("strategy", s.strategy + (f" — {s.auto.reason}" if s.auto is not None else "")),
        ("head", model.head.kind),
        ("classes", ", ".join(model.classes)),
        ("scored images", n_scored),
        ("scored on", scored_on),
        ("accuracy", f"{evaluation.accuracy:.4f}"),
    ]
    if s.test is not None:
        facts.append((f"test accuracy ({s.test.n_images} images held out first, used for nothing else)", f"{s.test.accuracy:.4f}"))
    if s.finetune is not None and s.finetune.frozen_test is not None:
        facts.append(("test accuracy of the frozen-backbone head", f"{s.finetune.frozen_test.accuracy:.4f}"))
    if s.finetune is not None and s.finetune.frozen_validation is not None:
        facts.append(("accuracy of the frozen-backbone head", f"{s.finetune.frozen_validation.accuracy:.4f}"))
    if s.seconds:
        facts.append(("training time", f"{s.seconds:.1f} s"))
    body = table(["", ""], facts)
    if s.n_train and s.refit:
        body += table(
            ["class", "images (cross-validated, then all fitted on)", "test images"],
            [(c, s.n_train.get(c, 0) + s.n_val.get(c, 0), s.n_test.get(c, 0)) for c in model.classes],
        )
    elif s.n_train:
        body += table(
            ["class", "training images", "validation images", "test images"],
            [(c, s.n_train.get(c, 0), s.n_val.get(c, 0), s.n_test.get(c, 0)) for c in model.classes],
        )
    body += table(["skipped file", "reason"], [(d.path, d.reason) for d in s.skipped]) if s.skipped else paragraph("No files were skipped.")
    return body


def _backbone_fact(model: Model) -> str:
    if len(model.backbones) > 1:
        layer = model.backbones[0].layer
        stage = f", each at stage {layer}" if layer is not None else ""
        return f"{model.backbone_name} (an ensemble: the {len(model.backbones)} backbones' features concatenated{stage})"
    backbone = model.backbones[0]
    return backbone.name + (f" (stage {backbone.layer} features)" if backbone.layer is not None else "")


def _per_class_html(evaluation: Evaluation) -> str:
    rows = [
        (name, f"{p:.3f}", f"{r:.3f}", f"{f:.3f}", int(n))
        for name, p, r, f, n in zip(
            evaluation.classes, evaluation.precision, evaluation.recall, evaluation.f1, evaluation.support, strict=True
        )
    ]
    return table(["class", "precision", "recall", "F1", "images"], rows)
