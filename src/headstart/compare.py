"""A leaderboard of backbones, ensembles of them, heads and layers, by k-fold cross-validated accuracy on cached features.

Every row is scored on the same images (those every backbone could read) with the
same stratified folds (same seed), so rows differ only in features and head. Each
backbone's features at each layer are read from the feature cache (or extracted
once) and reused by every head and every ensemble that includes it; an ensemble's
features are its members' concatenated in member order.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import NDArray

from headstart.backbone import Backbone, at_layer, create_backbone
from headstart.cache import FeatureCache, extract_with_cache
from headstart.classifier import HeadClassifier
from headstart.config import Progress, default_cache_dir
from headstart.data import ImageRecord, Skipped, check_layout, read_source
from headstart.engine import create_engine
from headstart.errors import ConfigError, DataError
from headstart.files import atomic_write_bytes, csv_bytes, display
from headstart.selection import cross_validate

if TYPE_CHECKING:
    from headstart.model import Model, PathLike

HeadName = Literal["linear", "mlp"]
HEADS: tuple[HeadName, ...] = ("linear", "mlp")
LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
ENSEMBLE_SEPARATOR = "+"


@dataclass(frozen=True)
class Entry:
    """One row of the leaderboard: a backbone (or ensemble) at a layer with a head, scored by cross-validation.

    Attributes:
        backbone: a backbone name, or an ensemble's member names joined by "+" (e.g. "efficientnet_lite0+efficientnet_lite1").
        head: "linear" or "mlp".
        layer: None for the final features, else the earlier stage pooled (e.g. -2), the same for every member.
        n_features: width of the features the head saw (an ensemble's members' widths added).
        accuracy: mean accuracy over the folds' held-out images.
        std: standard deviation of the per-fold accuracies.
        fold_accuracy: accuracy on each fold's held-out images, in fold order.
        log_loss: mean out-of-fold log loss at the chosen settings.
        C: the linear head's regularisation chosen by cross-validation (None for the MLP).
        epochs: the MLP's epoch count chosen by cross-validation (None for the linear head).
        extraction_seconds: time spent getting the features of every member (cache reads, and extraction of the
            images the cache lacked); measured once per backbone and layer, and counted in every row that uses them.
        n_extracted: feature vectors computed by running a backbone, over every member.
        n_cached: feature vectors read from the cache, over every member.
        fit_seconds: time of the whole cross-validation (every fold and setting tried).
    """

    backbone: str
    head: HeadName
    layer: int | None
    n_features: int
    accuracy: float
    std: float
    fold_accuracy: tuple[float, ...]
    log_loss: float
    C: float | None
    epochs: int | None
    extraction_seconds: float
    n_extracted: int
    n_cached: int
    fit_seconds: float

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(self.backbone.split(ENSEMBLE_SEPARATOR))

    @property
    def label(self) -> str:
        """A short name for the row, e.g. "efficientnet_lite0 + mlp, layer -2"."""
        layer = f", layer {self.layer}" if self.layer is not None else ""
        return f"{self.backbone} + {self.head}{layer}"


@dataclass(frozen=True)
class Leaderboard:
    """Every row compared, best first (highest mean accuracy, then lowest log loss).

    Attributes:
        entries: the rows, best first.
        n_images: the images every row was scored on.
        classes: the class names, sorted.
        folds: the number of cross-validation folds.
        seed: the seed of the folds and of the heads.
        skipped: files left out (unreadable by some backbone, or by all).
    """

    entries: tuple[Entry, ...]
    n_images: int
    classes: tuple[str, ...]
    folds: int
    seed: int
    skipped: tuple[Skipped, ...] = ()

    @property
    def best(self) -> Entry:
        return self.entries[0]


@dataclass(frozen=True)
class Comparison:
    """What `headstart compare` did: the leaderboard, the files it wrote, and the winner trained when asked."""

    leaderboard: Leaderboard
    csv: Path | None = None
    html: Path | None = None
    model: Model | None = None
    model_dir: Path | None = None


@dataclass(frozen=True)
class _Features:
    """One backbone's features at one layer, over the found records, and what getting them cost."""

    rows: dict[int, NDArray[np.float32]]
    skipped: list[Skipped]
    seconds: float
    n_extracted: int
    n_cached: int


def compare(
    data: PathLike,
    backbones: Sequence[str] = LITE,
    ensembles: bool = True,
    heads: Sequence[HeadName] = HEADS,
    layers: Sequence[int | None] = (None,),
    folds: int = 5,
    seed: int = 0,
    cache_dir: PathLike | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> Leaderboard:
    """Cross-validate every backbone (and ensemble) x layer x head on the same images and folds.

    Args:
        data: a folder with one sub-folder per class (train/ and val/ splits are pooled), or a CSV of path,label.
        backbones: names from `headstart.backbones()`; "a+b" is the ensemble of a and b (features concatenated).
        ensembles: also score the ensemble of all the single backbones given (when there are two or more).
        heads: "linear" (C chosen by cross-validation) and/or "mlp" (epochs chosen by cross-validation).
        layers: None for the final features, or an earlier stage (e.g. -2); each applies to every backbone.
        folds: stratified folds; every class needs at least this many readable images.
        seed: seed of the folds and of the heads.
        cache_dir: the feature cache (default: `default_cache_dir()`).
        progress: called as progress(description, done, total, status).

    Returns:
        The `Leaderboard`, best row first.

    Raises:
        UnknownBackboneError: a backbone name is not known (the message names it).
        ConfigError: no backbone or head, an unknown head, fewer than 2 folds, a layer outside a backbone.
        DataError: unusable data, or a class with fewer readable images than `folds`.
    """
    specs = _specs(backbones, ensembles)
    heads = tuple(dict.fromkeys(heads))
    if not heads or any(h not in HEADS for h in heads):
        raise ConfigError(f"Heads must be among {', '.join(HEADS)}; got {', '.join(map(str, heads)) or 'none'}.")
    if folds < 2:
        raise ConfigError(f"Cross-validation needs at least 2 folds, got {folds}.")
    layers = tuple(dict.fromkeys(layers)) or (None,)
    root = Path(data).expanduser()
    records, presplit_val, skipped = read_source(root)
    records += presplit_val or []
    check_layout(root, records)
    _check_counts(root, np.asarray([r.label for r in records]), folds, "")  # before any extraction; again after it
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    members = list(dict.fromkeys(m for spec in specs for m in spec))
    nets = {m: create_backbone(m, cache_root=cache_root) for m in members}
    # every name and layer checked before any extraction starts
    at = {(m, layer): nets[m] if layer is None else at_layer(nets[m], layer) for layer in layers for m in members}
    got = {key: _features(net, key[1], records, cache_root, batch_size, progress) for key, net in at.items()}
    unusable = {s.path: s for f in got.values() for s in f.skipped}
    kept = [i for i in range(len(records)) if all(i in f.rows for f in got.values())]
    labels = np.asarray([records[i].label for i in kept])
    _check_counts(root, labels, folds, "readable ")
    entries = []
    for layer in layers:
        for spec in specs:
            parts = [got[m, layer] for m in spec]
            X = np.concatenate([np.stack([p.rows[i] for i in kept]) for p in parts], axis=1)
            for head in heads:
                entries.append(_score(spec, head, layer, X, labels, parts, folds, seed, progress))
    entries.sort(key=lambda e: (-e.accuracy, e.log_loss))
    return Leaderboard(
        tuple(entries), len(kept), tuple(sorted(set(labels.tolist()))), folds, seed, tuple(skipped + list(unusable.values()))
    )


def _specs(backbones: Sequence[str], ensembles: bool) -> list[tuple[str, ...]]:
    """Each row's members: the backbones as given ("a+b" split), then the ensemble of all single ones."""
    specs = []
    for spec in backbones:
        names = tuple(n.strip() for n in spec.split(ENSEMBLE_SEPARATOR))
        if not all(names):
            raise ConfigError(
                f"'{display(spec)}': an empty backbone name; give names like efficientnet_lite0 or efficientnet_lite0+efficientnet_lite1."
            )
        if len(set(names)) < len(names):
            raise ConfigError(f"'{display(spec)}' names a backbone twice; an ensemble's members must differ.")
        specs.append(names)
    singles = list(dict.fromkeys(s for s in specs if len(s) == 1))
    if ensembles and len(singles) >= 2:
        specs.append(tuple(s[0] for s in singles))
    first = {frozenset(s): s for s in reversed(specs)}  # the same members in another order make one row, as first given
    specs = list(dict.fromkeys(first[frozenset(s)] for s in specs))
    if not specs:
        raise ConfigError("Give at least one backbone to compare, e.g. --backbone efficientnet_lite0.")
    return specs


def _features(
    net: Backbone, layer: int | None, records: list[ImageRecord], root: Path, batch_size: int, progress: Progress | None
) -> _Features:
    started = time.perf_counter()
    where = net.name + (f" layer {layer}" if layer is not None else "")

    def report(description: str, done: int, total: int, status: str = "", /) -> None:
        if progress:
            progress(f"{description}: {where}", done, total, status)

    make_engine = partial(create_engine, cache_root=root)
    extraction = extract_with_cache(net, [r.path for r in records], FeatureCache(root, net), batch_size, report, make_engine)
    rows = dict(zip(extraction.kept.tolist(), extraction.features))
    seconds = time.perf_counter() - started
    return _Features(rows, extraction.skipped, seconds, extraction.n_extracted, extraction.n_cached)


def _check_counts(root: Path, labels: NDArray[np.str_], folds: int, readable: str) -> None:
    counts = Counter(labels.tolist())
    if len(counts) < 2:
        raise DataError(f"{display(root)}: fewer than two classes have readable images; a classifier needs at least two.")
    name, smallest = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    if smallest < folds:
        raise DataError(
            f"Class '{display(name)}' has {smallest} {readable}image(s), too few for {folds}-fold cross-validation: "
            f"add images to it, or use --folds {max(2, smallest)}" + ("." if smallest >= 2 else " after adding at least one.")
        )


def _score(
    spec: tuple[str, ...],
    head: HeadName,
    layer: int | None,
    X: NDArray[np.float32],
    y: NDArray[np.str_],
    parts: list[_Features],
    folds: int,
    seed: int,
    progress: Progress | None,
) -> Entry:
    name = ENSEMBLE_SEPARATOR.join(spec)
    where = f"{name} + {head}" + (f", layer {layer}" if layer is not None else "")

    def report(description: str, done: int, total: int, status: str = "", /) -> None:
        if progress:
            progress(f"{description}: {where}", done, total, status)

    started = time.perf_counter()
    cv = cross_validate(HeadClassifier(head=head, random_state=seed), X, y, folds, seed, report)
    fit_seconds = time.perf_counter() - started
    accuracy = np.asarray(cv.fold_accuracy)
    return Entry(
        backbone=name,
        head=head,
        layer=layer,
        n_features=X.shape[1],
        accuracy=float(accuracy.mean()),
        std=float(accuracy.std()),
        fold_accuracy=tuple(accuracy.tolist()),
        log_loss=cv.log_loss,
        C=float(cv.params["C"]) if "C" in cv.params else None,
        epochs=int(cv.params["max_epochs"]) if "max_epochs" in cv.params else None,
        extraction_seconds=sum(p.seconds for p in parts),
        n_extracted=sum(p.n_extracted for p in parts),
        n_cached=sum(p.n_cached for p in parts),
        fit_seconds=fit_seconds,
    )


def csv_table(board: Leaderboard) -> bytes:
    """Every row as CSV: rank, backbone, head, layer, n_features, accuracy, std, one column per fold, and the rest of `Entry`."""
    header = ["rank", "backbone", "head", "layer", "n_features", "accuracy", "std"]
    header += [f"fold_{k + 1}" for k in range(board.folds)]
    header += ["log_loss", "C", "epochs", "extraction_seconds", "n_extracted", "n_cached", "fit_seconds"]
    rows = [
        [
            rank,
            e.backbone,
            e.head,
            "final" if e.layer is None else e.layer,
            e.n_features,
            f"{e.accuracy:.6f}",
            f"{e.std:.6f}",
            *(f"{a:.6f}" for a in e.fold_accuracy),
            f"{e.log_loss:.6f}",
            "" if e.C is None else e.C,
            "" if e.epochs is None else e.epochs,
            f"{e.extraction_seconds:.3f}",
            e.n_extracted,
            e.n_cached,
            f"{e.fit_seconds:.3f}",
        ]
        for rank, e in enumerate(board.entries, start=1)
    ]
    return csv_bytes(header, rows)


def write_csv(board: Leaderboard, path: Path) -> Path:
    """Write `csv_table(board)` to `path` atomically; returns the path."""
    return atomic_write_bytes(path, csv_table(board))


def write_html(board: Leaderboard, path: Path, title: str = "headstart compare") -> Path:
    """One self-contained page: the accuracy of every row as bars with std error bars, and the table. Returns the path."""
    from headstart.html_report import Section, accuracy_bars, figure_html, paragraph, table, write_report

    entries = board.entries
    figure = accuracy_bars([e.label for e in entries], [e.accuracy for e in entries], [e.std for e in entries])
    caption = f"Mean accuracy over {board.folds} stratified folds (seed {board.seed}), error bars one standard deviation; best at the top."
    header = ["rank", "backbone", "head", "layer", "features", "accuracy", "std", "log loss", "C / epochs", "extraction s", "fit s"]
    rows = [
        [
            rank,
            e.backbone,
            e.head,
            "final" if e.layer is None else e.layer,
            e.n_features,
            f"{e.accuracy:.2%}",
            f"{e.std:.2%}",
            f"{e.log_loss:.3f}",
            f"C {e.C:g}" if e.C is not None else f"{e.epochs} epochs",
            f"{e.extraction_seconds:.1f} ({e.n_extracted} extracted, {e.n_cached} cached)",
            f"{e.fit_seconds:.1f}",
        ]
        for rank, e in enumerate(entries, start=1)
    ]
    about = (
        f"{board.n_images} images in {len(board.classes)} classes ({', '.join(board.classes)}); every row scored on the same "
        f"images and folds. Best: {board.best.label}, {board.best.accuracy:.2%} ± {board.best.std:.2%}."
    )
    sections = [Section("Leaderboard", paragraph(about) + figure_html(figure, caption, "accuracy") + table(header, rows))]
    return write_report(path, title, sections)
