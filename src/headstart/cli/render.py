"""Terminal output: the only module that imports rich.

File names, class names and messages are data: each is shown through `files.display` as plain
`Text` (never parsed as Rich markup or emoji codes), so a name prints as itself on one line.
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from headstart.config import Progress as ProgressCallback
from headstart.config import uses_lbfgs
from headstart.data import Skipped
from headstart.files import display
from headstart.triage import PROBLEMS

if TYPE_CHECKING:
    from headstart.backbone import BackboneInfo
    from headstart.bundle import BundleContents
    from headstart.cache import ExtractSummary
    from headstart.compare import Leaderboard
    from headstart.gradcam import Explanations
    from headstart.metrics import Evaluation
    from headstart.model import Model, Predictions
    from headstart.model_export import ExportResult
    from headstart.suspects import SuspectSearch
    from headstart.triage import Triage

UNWRAPPED_WIDTH = 100_000  # piped or logged output: tables at their natural width, never squeezed into 80 columns


def _console(stderr: bool = False) -> Console:
    """A console as wide as the terminal; when the output is no terminal (a pipe, a log, a notebook's `!headstart`) and
    COLUMNS is not set, wide enough that no path or number is broken over lines."""
    stream = sys.stderr if stderr else sys.stdout
    wide = "COLUMNS" not in os.environ and not (hasattr(stream, "isatty") and stream.isatty())
    return Console(stderr=stderr, width=UNWRAPPED_WIDTH if wide else None)


console = _console()
err_console = _console(stderr=True)
N_FINDINGS_SHOWN = 20
N_SUSPECTS_SHOWN = 20


def _text(*parts: str | tuple[str, str]) -> Text:
    """One line from plain pieces and (piece, style) pairs; every piece is shown as is (display-safe, no markup)."""
    return Text.assemble(*(display(p) if isinstance(p, str) else (display(p[0]), p[1]) for p in parts))


@contextmanager
def progress_bar(out: Console | None = None) -> Iterator[ProgressCallback]:
    """A progress callback drawing one bar per description, on stderr when it is a terminal."""
    out = out or err_console
    with Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}", markup=False),
        console=out,
        transient=True,
        disable=not out.is_terminal,  # piped or logged: no bar, and no stray blank line
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(description: str, done: int, total: int, status: str = "", /) -> None:
            description, status = display(description), display(status)
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total, status=status)
            bar.update(tasks[description], completed=done, total=total, status=status)

        yield update


def error(message: str, out: Console | None = None) -> None:
    (out or err_console).print(_text(("Error:", "bold red"), " ", message), soft_wrap=True)


def skipped(files: list[Skipped], out: Console | None = None, limit: int = 20) -> None:
    if not files:
        return
    out = out or console
    out.print(_text((f"Skipped {len(files)} file(s):", "yellow")))
    for s in files[:limit]:
        out.print(_text(f"  {s.path}: {s.reason}"), soft_wrap=True)
    if len(files) > limit:
        out.print(f"  … and {len(files) - limit} more")


def triage(result: Triage, out: Console | None = None) -> None:
    """The counts per problem, the first findings and the usable images per class."""
    out = out or console
    if not result.findings:
        out.print(_text(f"No problems in {result.n_images} images in {result.source}."), soft_wrap=True)
    else:
        table = Table(title=_text(f"{result.n_images} images in {result.source}"))
        for name in ("problem", "what headstart does", "files", "fix"):
            table.add_column(name, justify="right" if name == "files" else "left", overflow="fold")
        for problem, action, count in result.counts():
            colour = {"blocks training": "red", "skipped": "yellow", "warning": "yellow"}.get(action, "default")
            table.add_row(_text(problem), _text((action, colour)), str(count), _text(PROBLEMS[problem].fix))
        out.print(table)
        shown = Table(title=f"First {min(len(result.findings), N_FINDINGS_SHOWN)} of {len(result.findings)} problem(s)")
        for name in ("file", "problem", "detail"):
            shown.add_column(name, overflow="fold")
        for f in result.findings[:N_FINDINGS_SHOWN]:
            shown.add_row(_text(str(f.path)), _text(f.problem), _text(f.detail))
        out.print(shown)
    usable = ", ".join(f"{name} {n}" for name, n in result.usable.items())
    out.print(_text(f"Usable images per class: {usable or 'none'}."), soft_wrap=True)


def triage_verdict(result: Triage, listing: Path | None, out: Console | None = None) -> None:
    """Where the full list went (or how to get it), and whether training can proceed."""
    out = out or console
    if listing is not None:
        out.print(_text(f"Wrote {len(result.findings)} problem(s), each with its file and fix, to {listing}."), soft_wrap=True)
    elif result.findings:
        out.print("`--csv FILE` writes every problem with its file, detail and fix.", markup=False, highlight=False)
    if result.can_train:
        out.print(_text(("Training can proceed", "green"), " (unusable files are skipped)."))
    else:
        blocking = next(f for f in result.findings if f.action == "blocks training")
        out.print(_text(("Training cannot proceed:", "red"), f" {blocking.problem}: {blocking.detail}"), soft_wrap=True)


def suspects(result: SuspectSearch, listing: Path | None, out: Console | None = None) -> None:
    """The most suspect labels first, and where the full list went."""
    out = out or console
    found = result.suspects
    summary = f"{len(found)} suspect label(s) among {result.n_images} images (out-of-fold accuracy {result.accuracy:.3f})"
    if not found:
        out.print(_text(f"No suspect labels among {result.n_images} images (out-of-fold accuracy {result.accuracy:.3f})."), soft_wrap=True)
    else:
        table = Table(title=_text(summary + (f"; the first {N_SUSPECTS_SHOWN}" if len(found) > N_SUSPECTS_SHOWN else "")))
        for name in ("rank", "file", "given", "suggested", "p(given)", "p(suggested)"):
            table.add_column(name, justify="right" if name.startswith(("rank", "p(")) else "left", overflow="fold")
        for s in found[:N_SUSPECTS_SHOWN]:
            table.add_row(str(s.rank), _text(str(s.path)), _text(s.given), _text(s.suggested), f"{s.p_given:.3f}", f"{s.p_suggested:.3f}")
        out.print(table)
    if listing is not None:
        out.print(_text(f"Wrote {len(found)} suspect label(s) to {listing}."), soft_wrap=True)
    elif len(found) > N_SUSPECTS_SHOWN:
        out.print("`--labels-csv FILE` writes every suspect label.", markup=False, highlight=False)


def leaderboard(board: Leaderboard, out: Console | None = None) -> None:
    """The rows best first, the best in bold green (an ensemble's members one per line); what was compared on what."""
    out = out or console
    title = f"{board.n_images} images, {len(board.classes)} classes, {board.folds}-fold cross-validation (seed {board.seed})"
    table = Table(title=_text(title), padding=(0, 1))
    layers = any(e.layer is not None for e in board.entries)
    columns = ["#", "backbone", "head", *(["layer"] if layers else []), "features", "accuracy %", "log loss", "C / epochs"]
    widest = max(len(display(m)) for e in board.entries for m in e.members) + 2
    for name in [*columns, "extract s", "new / cached", "fit s"]:
        table.add_column(
            name,
            justify="left" if name in ("backbone", "head", "layer") else "right",
            overflow="fold",
            no_wrap=name == "accuracy %",
            min_width=min(widest, 40) if name == "backbone" else None,
        )
    for rank, e in enumerate(board.entries, start=1):
        table.add_row(
            str(rank),
            Text(" +\n").join(_text(m) for m in e.members),
            e.head,
            *(["final" if e.layer is None else str(e.layer)] if layers else []),
            str(e.n_features),
            f"{100 * e.accuracy:.2f} ± {100 * e.std:.2f}",
            f"{e.log_loss:.3f}",
            f"C {e.C:g}" if e.C is not None else f"{e.epochs} epochs",
            f"{e.extraction_seconds:.1f}",
            f"{e.n_extracted} / {e.n_cached}",
            f"{e.fit_seconds:.1f}",
            style="bold green" if rank == 1 else None,
        )
    out.print(table)
    best = board.best
    out.print(_text("Best: ", (best.label, "bold"), f", {best.accuracy:.2%} ± {best.std:.2%}."), soft_wrap=True)
    skipped(list(board.skipped), out)


def info(directory: Path, contents: BundleContents, out: Console | None = None) -> None:
    out = out or console
    config, metrics = contents.config, contents.metrics
    head = config.head
    n_parameters = sum(math.prod(shape) for shape in contents.shapes.values())
    lines = [
        _text(
            (str(directory), "bold"),
            f": headstart model, format {config.format_version}, saved by headstart {config.headstart_version or '?'}",
        )
    ]
    if len(config.backbones) == 1:
        (backbone,) = config.backbones
        layer = f", stage {backbone.layer}" if backbone.layer is not None else ""
        tuned = " (fine-tuned)" if backbone.finetuned_from else ""
        lines.append(_text(f"backbone: {backbone.name}{layer}{tuned}, weights sha256 {backbone.weights_sha256[:12]}…"))
    else:
        lines.append(_text(f"backbones: an ensemble of {len(config.backbones)}, features concatenated in this order:"))
        for b in config.backbones:
            d = b.data_config
            lines.append(
                _text(
                    f"  {b.name}{f', stage {b.layer}' if b.layer is not None else ''}: {b.n_features} features, "
                    f"input {d.input_size} px (resize {d.resize_size}, {d.interpolation}), "
                    f"weights sha256 {b.weights_sha256[:12]}…"
                )
            )
    lines += [
        _text(f"classes ({len(config.classes)}): {', '.join(config.classes)}"),
        _text(
            f"head: {head.get('head')}"
            + (f", hidden {head.get('hidden')}, dropout {head.get('dropout')}" if head.get("head") == "mlp" else "")
        ),
    ]
    if len(config.backbones) == 1:
        data = config.backbones[0].data_config
        lines.append(_text(f"input: {data.input_size} px (resize {data.resize_size}, {data.interpolation})"))
    lines.append(_text(f"tensors: {len(contents.shapes)}, {n_parameters:,} values"))
    if "accuracy" in metrics:
        lines.append(_text(f"validation accuracy {metrics['accuracy']:.3f} on {metrics.get('n_images', '?')} images"))
    lines.append(_text("files: " + ", ".join(f"{name} ({size:,} B)" for name, size in contents.files.items())))
    for line in lines:
        out.print(line, soft_wrap=True)


def training(model: Model, saved_to: Path, out: Console | None = None) -> None:
    out = out or console
    s = model.summary
    if s.auto:
        out.print(_text(f"Strategy auto: {s.auto.reason}."), soft_wrap=True)
    layer = f" (stage {s.layer})" if s.layer is not None else ""
    n_train, n_val, n_test = sum(s.n_train.values()), sum(s.n_val.values()), sum(s.n_test.values())
    images = f"all {n_train + n_val} labelled images" if s.refit else f"{n_train} training and {n_val} validation images"
    params = model.head.params
    epochs = sum(row.get("phase") == "head" for row in s.history)
    how = (f"C={params['C']:g}" if uses_lbfgs(params) else f"{epochs} epochs") + (f" chosen by {s.scored_on}" if s.refit else "")
    how += f", best epoch {s.best_epoch}" if s.best_epoch else ""
    out.print(
        _text(
            "Trained a ",
            (s.head, "bold"),
            " head on ",
            (s.backbone, "bold"),
            f" features{layer}: {images}" + (f" ({n_test} more held out as the test split)" if n_test else ""),
            f", {len(model.classes)} classes ({how}); {s.n_extracted} images run through the backbone, {s.n_cached} from the cache.",
        ),
        soft_wrap=True,
    )
    if s.finetune and s.validation:
        tune = s.finetune
        epochs = sum(row.get("phase") == "finetune" for row in s.history)
        blocks = "all blocks" if tune.config.get("unfreeze") is None else f"the top {tune.config['unfreeze']} blocks"
        kept = f"kept epoch {tune.best_epoch}" if tune.best_epoch else "no epoch beat the frozen backbone, which was kept"
        frozen = tune.frozen_validation.accuracy if tune.frozen_validation else float("nan")
        out.print(
            f"Fine-tuned {blocks} for {epochs} epoch(s), {kept}; validation accuracy {s.validation.accuracy:.3f} (frozen backbone: {frozen:.3f})."
        )
    out.print(f"Took {s.seconds:.1f} s.")
    skipped(list(s.skipped), out)
    if s.warnings:
        listed = ", ".join(f"{problem} ({n})" for problem, n in Counter(w.problem for w in s.warnings).items())
        out.print(_text(("Warnings:", "yellow"), f" {listed}. `headstart check {s.data}` lists each with its fix."), soft_wrap=True)
    if s.validation:
        v = s.validation
        where = f"out-of-fold predictions of {s.scored_on}, C or epochs chosen on the same folds" if s.refit else s.scored_on
        out.print(_text("Validation accuracy ", (f"{v.accuracy:.3f}", "bold"), f" on {v.n_images} images ({where})."))
        table = Table()
        table.add_column("class")
        table.add_column("accuracy", justify="right")
        table.add_column("images", justify="right")
        for name, recall, support in zip(v.classes, v.recall, v.support):
            table.add_row(_text(name), f"{recall:.3f}", str(support))
        out.print(table)
    if s.test:
        tuned = s.finetune
        versus = f" (frozen backbone: {tuned.frozen_test.accuracy:.3f})" if tuned and tuned.frozen_test else ""
        out.print(
            _text("Test accuracy ", (f"{s.test.accuracy:.3f}", "bold"), f" on {s.test.n_images} images used for nothing else{versus}."),
            soft_wrap=True,
        )
    if s.test_tta:
        versus = f" (frozen backbone: {s.finetune.frozen_test_tta.accuracy:.3f})" if s.finetune and s.finetune.frozen_test_tta else ""
        out.print(_text("With test-time augmentation (mirror images): ", (f"{s.test_tta.accuracy:.3f}", "bold"), f"{versus}."))
    out.print(_text("Model saved to ", (str(saved_to), "bold"), f" (metrics in {saved_to / 'metrics.json'})."), soft_wrap=True)


def evaluation(result: Evaluation, out: Console | None = None) -> None:
    out = out or console
    out.print(_text("Accuracy ", (f"{result.accuracy:.3f}", "bold"), f" on {result.n_images} images (log loss {result.log_loss:.3f})."))
    table = Table()
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, p, r, f, n in zip(result.classes, result.precision, result.recall, result.f1, result.support):
        table.add_row(_text(name), f"{p:.3f}", f"{r:.3f}", f"{f:.3f}", str(n))
    out.print(table)
    confusion = Table(title="Confusion matrix (rows: true, columns: predicted)")
    confusion.add_column("")
    for name in result.classes:
        confusion.add_column(_text(name), justify="right")
    for name, row in zip(result.classes, result.confusion):
        confusion.add_row(_text(name), *(str(v) for v in row))
    out.print(confusion)


def predictions(result: Predictions, out: Console | None = None) -> None:
    out = out or console
    table = Table()
    table.add_column("image", overflow="fold")
    table.add_column("prediction")
    table.add_column("next")
    scored = any(p.unknown_score is not None for p in result.predictions)
    if scored:
        table.add_column("unknown score")
    for p in result.predictions:
        label = f"unknown (closest: {p.label} {p.probability:.3f})" if p.unknown else f"{p.label} ({p.probability:.3f})"
        cells = [_text(str(p.path)), _text(label), _text(", ".join(f"{c} {v:.3f}" for c, v in p.top_k[1:]))]
        if scored:
            cells.append(_text("" if p.unknown_score is None else f"{p.unknown_score:.3f}"))
        table.add_row(*cells)
    out.print(table)
    n_unknown = sum(p.unknown for p in result.predictions)
    if n_unknown:
        out.print(
            _text(f"{n_unknown} of {len(result.predictions)} image(s) look like none of the model's classes (unknown)."), soft_wrap=True
        )
    skipped(result.skipped, out)


def explanations(result: Explanations, folder: Path, out: Console | None = None) -> None:
    out = out or console
    out.print(_text(f"Wrote {len(result.written)} heatmap(s) to {folder}."), soft_wrap=True)
    skipped(result.skipped, out)


def exported(result: ExportResult, out: Console | None = None) -> None:
    """The file written, its size, and how it compares with its reference on the validation photos."""
    out = out or console
    kind = f"{'int8' if result.int8 else 'fp32'} {'ONNX' if result.format == 'onnx' else 'TFLite'}"
    size = f"{result.size_bytes / 1e6:.1f} MB"
    if result.int8 and result.reference_size_bytes:
        size += f", {result.reference_size_bytes / result.size_bytes:.1f}x smaller than fp32 ONNX"
    out.print(_text(f"Wrote {result.path} ({kind}, {size})."), soft_wrap=True)
    check = result.check
    if check is None:
        out.print(_text("Not checked: none of the model's validation photos could be read here."), soft_wrap=True)
        return
    fitted = result.checked_on == "training"  # no accuracy on photos the head was fitted on: it would flatter the model
    photos = "training photos (the head was fitted on them: agreement only)" if fitted else f"{result.checked_on} photos"
    table = Table(title=f"Checked on {check.n_images} {photos} against the {result.reference}")
    for column in ("", "this file", result.reference):
        table.add_column(column, justify="right")
    if not fitted:
        table.add_row("accuracy", f"{check.accuracy:.2%}", f"{check.reference_accuracy:.2%}")
    table.add_row("images/s", f"{check.images_per_second:.1f}", f"{check.reference_images_per_second:.1f}")
    table.add_row("same top-1 class", f"{check.agreement:.2%}", "")
    table.add_row("largest probability difference", f"{check.max_difference:.2g}", "")
    out.print(table)


def backbones(infos: list[BackboneInfo], out: Console | None = None) -> None:
    table = Table()
    table.add_column("name")
    table.add_column("offline")
    table.add_column("description")
    for b in infos:
        table.add_row(_text(b.name), "yes" if b.offline else "no", _text(b.description))
    (out or console).print(table)


def extracted(result: ExtractSummary, out: Console | None = None) -> None:
    """What `extract` did: images found, extracted and already cached, where, and the files skipped."""
    out = out or console
    where = f"on Ray ({result.n_cpus} CPUs)" if result.ray else f"on this machine ({result.n_cpus} CPUs)"
    out.print(
        _text(
            f"{result.n_images} images, {result.backbone}: {result.n_extracted} extracted {where}, "
            f"{result.n_cached} already cached, {len(result.skipped)} skipped, in {result.seconds:.1f} s."
            + (f" {result.n_copies} were copies of another image (the same bytes), extracted once." if result.n_copies else "")
        ),
        soft_wrap=True,
    )
    for directory in result.directories:
        out.print(_text(f"Features in {directory}"), soft_wrap=True)
    skipped(result.skipped, out)


def message(text: str, out: Console | None = None) -> None:
    """One line of plain text (names in it are shown safely)."""
    (out or console).print(_text(text), soft_wrap=True)
