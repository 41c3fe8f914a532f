"""Terminal output: the only module that imports rich."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from headstart.backbones import BackboneInfo
from headstart.config import Progress as ProgressCallback
from headstart.data import Skipped
from headstart.metrics import Evaluation
from headstart.model import Model, Predictions
from headstart.triage import PROBLEMS, Triage

console = Console()
err_console = Console(stderr=True)


@contextmanager
def progress_bar(out: Console | None = None) -> Iterator[ProgressCallback]:
    """A progress callback drawing one bar per description, on stderr when it is a terminal."""
    out = out or err_console
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=out,
        transient=True,
        disable=not out.is_terminal,  # piped or logged: no bar, and no stray blank line
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(description: str, done: int, total: int, status: str = "", /) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total, status=status)
            bar.update(tasks[description], completed=done, total=total, status=status)

        yield update


def error(message: str, out: Console | None = None) -> None:
    (out or err_console).print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)


def skipped(files: list[Skipped], out: Console | None = None, limit: int = 20) -> None:
    if not files:
        return
    out = out or console
    out.print(f"[yellow]Skipped {len(files)} file(s):[/]")
    for s in files[:limit]:
        out.print(f"  {s.path}: {s.reason}", highlight=False, soft_wrap=True)
    if len(files) > limit:
        out.print(f"  … and {len(files) - limit} more")


def triage(result: Triage, listing: Path, out: Console | None = None) -> None:
    out = out or console
    table = Table(title=f"{result.n_images} images in {result.source}")
    for name in ("problem", "what headstart does", "files", "fix"):
        table.add_column(name, justify="right" if name == "files" else "left", overflow="fold")
    for problem, action, count in result.counts():
        colour = {"blocks training": "red", "skipped": "yellow", "warning": "yellow"}.get(action, "default")
        table.add_row(problem, f"[{colour}]{action}[/]", str(count), PROBLEMS[problem].fix)
    if result.findings:
        out.print(table)
    else:
        out.print(f"No problems in {result.n_images} images.")
    usable = ", ".join(f"{name} {n}" for name, n in result.usable.items())
    out.print(f"Usable images per class: {usable or 'none'}.", highlight=False)
    if result.findings:
        out.print(f"Each problem with its file and fix: {listing}", highlight=False)
    if result.can_train:
        out.print("[green]Training can proceed[/] (unusable files are skipped).")
    else:
        blocking = next(f for f in result.findings if f.action == "blocks training")
        out.print(f"[red]Training cannot proceed:[/] {blocking.problem}: {blocking.detail}", highlight=False)


def info(directory: Path, description: dict[str, Any], out: Console | None = None) -> None:
    out = out or console
    config, metrics = description["config"], description["metrics"]
    backbone = config["backbone"]
    layer = f", stage {backbone['layer']}" if backbone.get("layer") is not None else ""
    tuned = " (fine-tuned)" if backbone.get("finetuned_from") else ""
    head = config["head"]
    n_parameters = sum(math.prod(shape) for shape in description["tensors"].values())
    lines = [
        f"[bold]{directory}[/]: headstart model, format {config['format_version']}, saved by headstart {config.get('headstart_version', '?')}",
        f"backbone: {backbone['name']}{layer}{tuned}, weights sha256 {backbone['weights_sha256'][:12]}…",
        f"classes ({len(config['classes'])}): {', '.join(config['classes'])}",
        f"head: {head.get('head')}"
        + (f", hidden {head.get('hidden')}, dropout {head.get('dropout')}" if head.get("head") == "mlp" else ""),
        f"input: {config['data_config']['input_size']} px (resize {config['data_config']['resize_size']}, {config['data_config']['interpolation']})",
        f"tensors: {len(description['tensors'])}, {n_parameters:,} values",
    ]
    if "accuracy" in metrics:
        lines.append(f"validation accuracy {metrics['accuracy']:.3f} on {metrics.get('n_images', '?')} images")
    lines.append("files: " + ", ".join(f"{name} ({size:,} B)" for name, size in description["files"].items()))
    for line in lines:
        out.print(line, highlight=False)


def training(model: Model, saved_to: Path, out: Console | None = None) -> None:
    out = out or console
    s = model.summary
    if "auto" in s:
        out.print(f"Strategy auto: {s['auto']['reason']}.", highlight=False)
    layer = f" (stage {s['layer']})" if s.get("layer") is not None else ""
    out.print(
        f"Trained a [bold]{s['head']}[/] head on [bold]{s['backbone']}[/] features{layer}: "
        f"{sum(s['n_train'].values())} training and {sum(s['n_val'].values())} validation images, "
        f"{len(model.classes)} classes; {s['n_extracted']} images run through the backbone, "
        f"{s['n_cached']} from the cache; best epoch {s['best_epoch']}."
    )
    if "finetune" in s:
        tune = s["finetune"]
        epochs = sum(row["phase"] == "finetune" for row in s["history"])
        blocks = "all blocks" if tune["config"]["unfreeze"] is None else f"the top {tune['config']['unfreeze']} blocks"
        kept = f"kept epoch {tune['best_epoch']}" if tune["best_epoch"] else "no epoch beat the frozen backbone, which was kept"
        frozen = tune["frozen_validation"]["accuracy"] if tune.get("frozen_validation") else float("nan")
        out.print(
            f"Fine-tuned {blocks} for {epochs} epoch(s), {kept}; validation accuracy {s['validation']['accuracy']:.3f} "
            f"(frozen backbone: {frozen:.3f})."
        )
    out.print(f"Took {s['seconds']:.1f} s.")
    skipped([Skipped(Path(d["path"]), d["reason"]) for d in s["skipped"]], out)
    if s.get("warnings"):
        counts = Counter(w["problem"] for w in s["warnings"])
        listed = ", ".join(f"{problem} ({n})" for problem, n in counts.items())
        out.print(f"[yellow]Warnings:[/] {listed}. `headstart check {s['data']}` lists each with its fix.", highlight=False)
    if "validation" in s:
        v = s["validation"]
        out.print(f"Validation accuracy [bold]{v['accuracy']:.3f}[/] on {v['n_images']} images.")
        table = Table()
        table.add_column("class")
        table.add_column("accuracy", justify="right")
        table.add_column("images", justify="right")
        for name, row in v["per_class"].items():
            table.add_row(name, f"{row['recall']:.3f}", str(row["support"]))
        out.print(table)
    out.print(f"Model saved to [bold]{saved_to}[/] (metrics in {saved_to / 'metrics.json'}).", highlight=False)


def evaluation(result: Evaluation, out: Console | None = None) -> None:
    out = out or console
    out.print(f"Accuracy [bold]{result.accuracy:.3f}[/] on {result.n_images} images (log loss {result.log_loss:.3f}).")
    table = Table()
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, p, r, f, n in zip(result.classes, result.precision, result.recall, result.f1, result.support):
        table.add_row(name, f"{p:.3f}", f"{r:.3f}", f"{f:.3f}", str(n))
    out.print(table)
    confusion = Table(title="Confusion matrix (rows: true, columns: predicted)")
    confusion.add_column("")
    for name in result.classes:
        confusion.add_column(name, justify="right")
    for name, row in zip(result.classes, result.confusion):
        confusion.add_row(name, *(str(v) for v in row))
    out.print(confusion)


def predictions(result: Predictions, out: Console | None = None) -> None:
    out = out or console
    table = Table()
    table.add_column("image", overflow="fold")
    table.add_column("prediction")
    table.add_column("next")
    for p in result.predictions:
        table.add_row(str(p.path), f"{p.label} ({p.probability:.3f})", ", ".join(f"{c} {v:.3f}" for c, v in p.top_k[1:]))
    out.print(table)
    skipped(result.skipped, out)


def backbones(infos: list[BackboneInfo], out: Console | None = None) -> None:
    table = Table()
    table.add_column("name")
    table.add_column("offline")
    table.add_column("description")
    for b in infos:
        table.add_row(b.name, "yes" if b.offline else "no", b.description)
    (out or console).print(table)


def message(text: str, out: Console | None = None) -> None:
    (out or console).print(text, highlight=False, soft_wrap=True)
