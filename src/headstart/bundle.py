"""Model folders on disk: safetensors weights plus JSON, never pickle, switched as a whole.

A bundle is a folder holding `bundle.json` (what the model is, and the size and
sha256 of every other file of the model), `model.safetensors` (its tensors),
`metrics.json`, `history.json` and `history.csv`; training adds `report.html`,
and an unfinished fine-tuning run its `.checkpoint/`. A backbone made from a
weights file (`--weights`) keeps a copy of its tensors in `backbone.safetensors`,
so loading never reads a file the model names outside its folder. A save builds
the new folder beside the old one and swaps the two in one rename, so a reader,
or a run killed at any moment, finds the old model or the new one, never a mix.
headstart writes only into an empty or new folder or a model folder, and
replaces only the model's own files: anything else in it is kept. Loading reads
only the files `bundle.json` lists, each checked against its size and hash
before it is parsed, and validates every field before anything is allocated:
`model.safetensors` is refused unread when larger than the tensors `bundle.json`
describes take, and `read_bundle(load_weights=False)` (`info`) reads its header
alone. `bundle.json` itself is not hashed: the photos its summary records are
accepted only as image files outside /proc, /sys and /dev (a bundle recording
anything else is refused, see `summary`), and read as photos, nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headstart.backbone import ENSEMBLE_SEPARATOR, MAX_MEMBERS
from headstart.config import DataConfig, check_head_params, is_finite_number, is_int
from headstart.errors import BundleError, ConfigError, FileRefusedError
from headstart.files import MODEL_MARKER, atomic_write_folder, display, json_bytes, open_regular, read_bounded, read_regular
from headstart.summary import TrainingSummary

if TYPE_CHECKING:  # NumPy is imported only to read or write tensors: `info` reads a safetensors header alone
    import numpy as np
    from numpy.typing import NDArray

FORMAT_VERSION = 7  # 2: `files` lists the size and sha256 of every file of the model; 3: every summary field present; 4: test split, refit;
# 5: test_tta; `backbones`, a list of members (an ensemble, or one backbone) each with its own `data_config`, replaces `backbone` and `data_config`;
# 6: the head's `seed` is named `random_state`, as scikit-learn names it; 7: a backbone's weights file is `backbone.safetensors`, in the folder
SUMMARY_ADDED = {4: ("scored_on", "refit", "test_split", "n_test", "test_images", "test", "calibration"), 5: ("test_tta",)}
"""Summary fields each format added: a bundle of an earlier format lacks them (they take their defaults)."""
CONFIG_NAME = MODEL_MARKER  # "bundle.json", whose presence makes a folder a model folder
WEIGHTS_NAME = "model.safetensors"
METRICS_NAME = "metrics.json"
HISTORY_NAME = "history.json"
HISTORY_CSV_NAME = "history.csv"
REPORT_NAME = "report.html"
BACKBONE_WEIGHTS_NAME = "backbone.safetensors"
CHECKPOINT_DIR = ".checkpoint"
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, METRICS_NAME, HISTORY_NAME, HISTORY_CSV_NAME, REPORT_NAME, BACKBONE_WEIGHTS_NAME)
"""The files a save replaces; everything else in a model folder is left as it is."""
MAX_JSON_BYTES = 64 << 20
MAX_WEIGHTS_BYTES = 4 << 30
MAX_HEADER_BYTES = 16 << 20
"""A safetensors header's bound: a fine-tuned backbone's thousand tensors take some 100 KB."""
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class BackboneRecord:
    """A backbone a model was trained on: enough to rebuild it and check it is the same one.

    Attributes:
        name: its name, e.g. "efficientnet_lite0" or "timm:resnet50".
        weights_sha256: the hash of its weights (see `Backbone.weights_sha256`).
        data_config: its preprocessing.
        n_features: the width of its features (None in models saved before format 2 that lack it).
        layer: the stage pooled (None: the final features).
        weights_file: `BACKBONE_WEIGHTS_NAME` for a backbone made from a weights file (a copy of its tensors, in the
            model folder); in models saved before format 7, the path of that file as given when training.
        finetuned_from: for fine-tuned weights (saved in `model.safetensors`), the hash of the pretrained ones.
    """

    name: str
    weights_sha256: str
    data_config: DataConfig
    n_features: int | None = None
    layer: int | None = None
    weights_file: str | None = None
    finetuned_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "n_features": self.n_features,
            "layer": self.layer,
            "weights_file": self.weights_file,
            "finetuned_from": self.finetuned_from,
            "data_config": self.data_config.to_dict(),
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any], data_config: DataConfig) -> BackboneRecord:
        """From a record `validate_config` accepted; `data_config` is its own (format 5) or the bundle's (formats 1 to 4)."""
        return cls(
            name=record["name"],
            weights_sha256=record["weights_sha256"],
            data_config=data_config,
            n_features=record.get("n_features"),
            layer=record.get("layer"),
            weights_file=record.get("weights_file"),
            finetuned_from=record.get("finetuned_from"),
        )


@dataclass(frozen=True)
class BundleConfig:
    """`bundle.json`: what a model is.

    Attributes:
        backbones: the backbone, or an ensemble's backbones in the order their features are concatenated
            (fine-tuned weights, for a single backbone, are in `model.safetensors`).
        head: the `HeadClassifier` parameters.
        classes: the class names, in output order.
        summary: what training did.
        files: each further model file's size and sha256 (empty for format 1).
    """

    backbones: tuple[BackboneRecord, ...]
    head: dict[str, Any]
    classes: tuple[str, ...]
    summary: TrainingSummary
    headstart_version: str = ""
    format_version: int = FORMAT_VERSION
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def backbone_name(self) -> str:
        """The backbones' names joined by '+' (one backbone: its name)."""
        return ENSEMBLE_SEPARATOR.join(b.name for b in self.backbones)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "headstart_version": self.headstart_version,
            "backbones": [b.to_dict() for b in self.backbones],
            "head": self.head,
            "classes": list(self.classes),
            "summary": self.summary.to_dict(),
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, config: Any, directory: Path) -> BundleConfig:
        """Validate every field of a parsed `bundle.json` (formats 1 to `FORMAT_VERSION`).

        Raises:
            BundleError: names the first field of the wrong type or out of range.
        """
        validate_config(config, directory)
        if config["format_version"] >= 5:
            backbones = tuple(BackboneRecord.from_dict(b, DataConfig.from_dict(b["data_config"])) for b in config["backbones"])
        else:
            backbones = (BackboneRecord.from_dict(config["backbone"], DataConfig.from_dict(config["data_config"])),)
        try:
            summary = TrainingSummary.from_dict(config.get("summary", {}))
        except ValueError as e:
            field_name = str(e).replace("field '", "field 'summary.", 1)
            raise BundleError(
                f"{directory / CONFIG_NAME}: {field_name}. The file is damaged or was edited; re-save or retrain the model."
            ) from None
        head = dict(config["head"])
        if config["format_version"] < 6 and "seed" in head and "random_state" not in head:  # format 6 renamed it
            head["random_state"] = head.pop("seed")
        try:
            check_head_params(head)
            unknown = set(head["class_weight"]) - set(config["classes"]) if isinstance(head.get("class_weight"), dict) else set()
            if unknown:
                raise ConfigError(f"class_weight names classes the model does not have: {sorted(map(str, unknown))[:3]}.")
        except ConfigError as e:
            raise BundleError(
                f"{directory / CONFIG_NAME}: head: {e} The file is damaged or was edited; re-save or retrain the model."
            ) from None
        return cls(
            backbones=backbones,
            head=head,
            classes=tuple(config["classes"]),
            summary=summary,
            headstart_version=str(config.get("headstart_version", "")),
            format_version=config["format_version"],
            files=(config.get("files") or {}) if config["format_version"] >= 2 else {},
        )


@dataclass(frozen=True)
class BundleContents:
    """What a model folder holds, read and validated.

    Attributes:
        config: `bundle.json`, its summary's history filled in from `history.json`.
        shapes: each tensor's shape, from the safetensors header.
        tensors: the tensors themselves (empty when read without weights).
        metrics: `metrics.json` (validation scores).
        history: `history.json` (one row per epoch).
        files: the model's files and their sizes in bytes.
    """

    config: BundleConfig
    shapes: dict[str, list[int]]
    tensors: dict[str, NDArray[np.float32]]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    files: dict[str, int]


def check_output_folder(directory: Path, force: bool = False) -> None:
    """Raise BundleError unless `directory` is new, empty or a headstart model (or `force`): never mix a model into a user's own files."""
    try:
        directory.resolve(strict=False)
    except (RuntimeError, OSError):
        raise BundleError(f"{directory}: a symbolic link loop. Choose another --out.") from None
    if directory.exists() and not directory.is_dir():
        raise BundleError(f"{directory}: exists and is not a folder. Choose another --out.")
    if force or not directory.exists() or is_model_folder(directory):
        return
    entries = sorted(e.name for e in os.scandir(directory))
    if entries:
        raise BundleError(
            f"{directory}: not empty and not a headstart model (it holds '{entries[0]}'"
            + (f" and {len(entries) - 1} more" if len(entries) > 1 else "")
            + "). Choose a new folder for --out, or pass --force to add the model's files to it (nothing else in it is touched)."
        )


def is_model_folder(directory: Path) -> bool:
    """Whether `directory` holds a `bundle.json` that headstart wrote (its fields are not checked)."""
    try:
        config = _parse_json(read_regular(directory / CONFIG_NAME, MAX_JSON_BYTES), directory / CONFIG_NAME)
    except (OSError, BundleError):
        return False
    return (
        isinstance(config, dict)
        and isinstance(config.get("format_version"), int)
        and (isinstance(config.get("backbone"), dict) or isinstance(config.get("backbones"), list))
    )


def save_bundle(
    directory: Path,
    config: BundleConfig,
    tensors: dict[str, NDArray[np.float32]],
    metrics: dict[str, Any],
    extras: dict[str, bytes] | None = None,
    force: bool = False,
) -> Path:
    """Write a bundle as one atomic switch of the whole folder. Returns the folder.

    `extras` are further model files (name -> bytes) among `MODEL_FILES`, such as the training history.

    Raises:
        BundleError: the folder holds other files and is not a model (see `check_output_folder`).
    """
    if directory.is_symlink():
        directory = directory.resolve()
    check_output_folder(directory, force)
    import numpy as np
    from safetensors.numpy import save as save_safetensors

    files = {WEIGHTS_NAME: save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}), METRICS_NAME: json_bytes(metrics)}
    files.update(extras or {})
    if not set(files) < set(MODEL_FILES):
        raise ValueError(f"Not a model file: {sorted(set(files) - set(MODEL_FILES))}")
    manifest = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    record = dataclasses.replace(config, format_version=FORMAT_VERSION, files=manifest).to_dict()
    validate_config(record, directory)
    return atomic_write_folder(directory, {**files, CONFIG_NAME: json_bytes(record)}, replaced=MODEL_FILES)


def read_bundle(directory: Path, load_weights: bool = True) -> BundleContents:
    """Read and validate a model folder. Nothing in it is executed, and only the files `bundle.json` lists are read.

    Without `load_weights`, no tensor is read: `model.safetensors` gives its header (the shapes), and it and
    `backbone.safetensors` are checked against their recorded sizes, not hashed.

    The files are read through one handle on the folder, so a save that swaps the
    folder meanwhile cannot mix two models; the read is retried if the folder vanished.

    Raises:
        BundleError: not a model folder, or a file missing, damaged, edited, from another save, or not safetensors/JSON.
    """
    for attempt in range(3):
        try:
            fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise BundleError(
                f"{directory}: not a headstart model (no such folder). Train one with `headstart train DATA --out {directory}`."
            ) from None
        try:
            return _read(directory, fd, load_weights)
        except FileNotFoundError as e:  # a file of the model is gone: retried if a save swapped the folder meanwhile
            if attempt == 2 or not _replaced_meanwhile(directory, fd):
                raise BundleError(f"{e.filename}: missing. The model folder is incomplete; re-save or retrain it.") from None
        finally:
            os.close(fd)
    raise AssertionError("unreachable")


def _replaced_meanwhile(directory: Path, fd: int) -> bool:
    try:
        return os.stat(directory).st_ino != os.fstat(fd).st_ino
    except OSError:
        return True


def _read(directory: Path, fd: int, load_weights: bool) -> BundleContents:
    try:
        raw = read_regular(directory / CONFIG_NAME, MAX_JSON_BYTES, fd)
    except FileNotFoundError:
        if _replaced_meanwhile(directory, fd):
            raise
        raise BundleError(
            f"{directory}: not a headstart model (no {CONFIG_NAME} in it). Train one with `headstart train DATA --out {directory}`."
        ) from None
    config = BundleConfig.from_dict(_parse_json(raw, directory / CONFIG_NAME), directory)
    listed: dict[str, Any] = dict(config.files)
    if not listed:  # format 1: no sizes or hashes
        listed = {WEIGHTS_NAME: None, METRICS_NAME: None, HISTORY_NAME: None}
    shapes, weights, weights_size = _read_weights(directory, fd, listed[WEIGHTS_NAME], config, load_weights)
    contents = {name: _read_listed(directory, fd, name, record, load_weights) for name, record in listed.items() if name != WEIGHTS_NAME}
    tensors = load_safetensors(weights) if weights is not None else {}
    metrics = _json_file(contents.get(METRICS_NAME), directory / METRICS_NAME, dict)
    history = _json_file(contents.get(HISTORY_NAME), directory / HISTORY_NAME, list)
    _need(all(isinstance(row, dict) for row in history), directory / HISTORY_NAME, "(rows)", "a list of objects")
    _need(is_finite_number(metrics.get("accuracy", 0.0)), directory / METRICS_NAME, "accuracy", "a number")
    sizes = {WEIGHTS_NAME: weights_size, **{name: len(data) for name, data in contents.items() if data is not None}}
    if BACKBONE_WEIGHTS_NAME in listed:  # checked, not kept: the backbone reads it if its network is ever built
        sizes[BACKBONE_WEIGHTS_NAME] = listed[BACKBONE_WEIGHTS_NAME]["size"]
    files = {CONFIG_NAME: len(raw), **{name: sizes[name] for name in listed if name in sizes}}
    try:
        config = dataclasses.replace(config, summary=config.summary.with_history(history))
    except ValueError:
        _need(False, directory / HISTORY_NAME, "(rows)", "a list of objects of numbers (and a phase name)")
    return BundleContents(config, shapes, tensors, metrics, history, files)


def _read_weights(
    directory: Path, fd: int, record: dict[str, Any] | None, config: BundleConfig, load_weights: bool
) -> tuple[dict[str, list[int]], bytes | None, int]:
    """`model.safetensors`: its tensors' shapes (from its header), its bytes (None without `load_weights`: only the
    header is read) and its size. Its size is checked against its record, then against what `config` implies
    (`_max_tensor_bytes`), before any tensor is read.
    """
    path = directory / WEIGHTS_NAME
    refused = BundleError(f"{path}: not a safetensors file; refused. Re-save or retrain the model.")
    try:
        with open_regular(path, MAX_WEIGHTS_BYTES, fd) as f:
            start = f.read(8)
            if _looks_pickled(start):
                raise BundleError(f"{path}: a pickle; refused. headstart loads weights only from safetensors (pickles can run code).")
            size = os.fstat(f.fileno()).st_size
            if record is not None and size != record["size"]:
                raise _differs(path)
            (n,) = struct.unpack("<Q", start) if len(start) == 8 else (size,)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise refused
            shapes = _safetensors_shapes(f.read(n), size - 8 - n, path)
            _check_head_width(config, shapes, directory / CONFIG_NAME)
            if not load_weights:
                return shapes, None, size
            bound = 8 + n + _max_tensor_bytes(config, shapes, directory / CONFIG_NAME)
            if size > bound:
                raise BundleError(
                    f"{path}: {size:,} bytes, more than the {bound:,} that the tensors {CONFIG_NAME} describes take at most: "
                    f"it holds data {CONFIG_NAME} does not describe. The model folder is damaged or was edited; re-save or retrain it."
                )
            f.seek(0)
            data = read_bounded(f, bound, path, size)
    except FileNotFoundError as e:
        e.filename = str(path)
        raise
    except FileRefusedError as e:
        raise BundleError(f"{e}. The model folder is damaged or was edited; re-save or retrain it.") from None
    if record is not None and hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise _differs(path)
    return shapes, data, size


def _max_tensor_bytes(config: BundleConfig, shapes: dict[str, list[int]], where: Path) -> int:
    """The most bytes the tensors of `model.safetensors` take for `config`: its head's and its unknown detector's, each
    shaped as the config and the head's width in the header say (a detector's free sizes, as `unknown.tensor_shapes`
    bounds them), at 8 bytes a value (the widest safetensors type). A fine-tuned backbone's tensors, which
    `bundle.json` does not describe, are bounded by `MAX_WEIGHTS_BYTES` alone.

    Raises:
        BundleError: the config names an unknown detector, whose tensors it cannot size.
    """
    if any(b.finetuned_from is not None for b in config.backbones):
        return MAX_WEIGHTS_BYTES
    from headstart.heads import head_shapes
    from headstart.unknown import SCORE_KINDS, tensor_shapes

    width = shapes.get("head.0.mean", [])
    n_features, n_classes = width[0] if len(width) == 1 else 0, len(config.classes)
    expected = list(head_shapes(config.head.get("head", "linear"), n_features, n_classes, config.head.get("hidden", 512)).values())
    detector = config.summary.calibration
    if detector is not None and detector.score is not None:
        if detector.score not in SCORE_KINDS:
            raise BundleError(
                f"{where}: Unknown score kind {detector.score!r} in summary.calibration; expected one of {', '.join(SCORE_KINDS)}. "
                "The file is damaged or was edited; re-save or retrain the model."
            )
        found = {k.removeprefix("unknown."): tuple(v) for k, v in shapes.items() if k.startswith("unknown.")}
        expected += tensor_shapes(detector.score, n_features, n_classes, found).values()
    return 8 * sum(max(0, math.prod(shape)) for shape in expected)


def _read_listed(directory: Path, fd: int, name: str, record: dict[str, Any] | None, hashed: bool) -> bytes | None:
    """A JSON model file's bytes, or None for one that format 1 lists and the folder lacks, checked against its
    manifest record (size and sha256) when there is one.

    The backbone's weights file is checked as it streams by, and not kept (None); without `hashed`, only its size.
    """
    path = directory / name
    tensors = name == BACKBONE_WEIGHTS_NAME
    limit = MAX_WEIGHTS_BYTES if tensors else MAX_JSON_BYTES
    try:
        with open_regular(path, limit, fd) as f:
            if tensors and _looks_pickled(f.read(4)):
                raise BundleError(f"{path}: a pickle; refused. headstart loads weights only from safetensors (pickles can run code).")
            size = os.fstat(f.fileno()).st_size
            if record is not None and size != record["size"]:
                raise _differs(path)
            f.seek(0)
            if tensors:
                if not hashed:
                    return None
                streamed = hashlib.sha256()
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    streamed.update(chunk)
                digest = streamed.hexdigest()
                data = None
            else:
                data = read_bounded(f, limit, path, size)
                digest = hashlib.sha256(data).hexdigest()
    except FileNotFoundError as e:
        if record is not None:
            e.filename = str(path)
            raise
        return None
    except FileRefusedError as e:
        raise BundleError(f"{e}. The model folder is damaged or was edited; re-save or retrain it.") from None
    if record is not None and (digest != record["sha256"] or (data is not None and len(data) != record["size"])):
        raise _differs(path)
    return data


def _differs(path: Path) -> BundleError:
    return BundleError(
        f"{path}: differs from the file {CONFIG_NAME} records (size or sha256): the folder mixes files of different saves, "
        "or the file was damaged or edited. Re-save or retrain the model."
    )


def backbone_weights_files(directory: Path, config: BundleConfig) -> list[Path | None]:
    """Each backbone's weights file in the model folder, in member order (None: its weights come with its name, or are
    fine-tuned ones in `model.safetensors`). `read_bundle` has checked `backbone.safetensors` against its recorded hash.

    Raises:
        BundleError: a model saved before format 7 names a weights file outside its folder (only its path was kept then):
            headstart reads no file a model names outside the folder the user gave.
    """
    paths: list[Path | None] = []
    for backbone in config.backbones:
        if backbone.weights_file is None or backbone.finetuned_from is not None:
            paths.append(None)
            continue
        path = directory / backbone.weights_file  # an absolute path stays as it is, and is then outside
        try:
            inside = path.resolve().is_relative_to(directory.resolve())
        except (OSError, RuntimeError):  # a symbolic link loop
            inside = False
        if not inside:
            raise BundleError(
                f"{directory / CONFIG_NAME}: backbone '{backbone.name}' names the weights file '{display(backbone.weights_file)}', "
                "outside the model folder, and headstart reads no file a model names outside its folder. Give the file yourself "
                "(headstart.load(MODEL, weights=FILE)) and save the model again: it then keeps a copy in its folder."
            )
        paths.append(path)
    return paths


def load_safetensors(data: bytes) -> dict[str, NDArray[np.float32]]:
    """The tensors of a safetensors file's bytes, as NumPy arrays."""
    from safetensors.numpy import load

    tensors: dict[str, NDArray[np.float32]] = load(data)
    return tensors


def _safetensors_shapes(header: bytes, n_data: int, path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, after checking that its tensors end where the file's `n_data` bytes of data do."""
    refused = BundleError(f"{path}: not a safetensors file; refused. Re-save or retrain the model.")
    try:
        parsed = json.loads(header)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise refused
    parsed.pop("__metadata__", None)
    shapes: dict[str, list[int]] = {}
    end = 0
    for key, entry in parsed.items():
        shape: Any = entry.get("shape") if isinstance(entry, dict) else None
        offsets: Any = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (_ints(shape) and _ints(offsets) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
            raise refused
        shapes[key] = list(shape)
        end = max(end, offsets[1])
    if end != n_data:
        raise refused
    return shapes


def _parse_json(data: bytes, path: Path) -> Any:
    """JSON without NaN or Infinity (Python's json module accepts them) and without unbounded nesting."""

    def refuse_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(data.decode("utf-8"), parse_constant=refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise BundleError(f"{path}: not valid JSON ({reason}). Re-save the model or retrain it.") from None


def _json_file(data: bytes | None, path: Path, kind: type) -> Any:
    if data is None:
        return kind()
    value = _parse_json(data, path)
    _need(isinstance(value, kind), path, "(top level)", "a JSON " + ("object" if kind is dict else "list"))
    return value


def _need(ok: bool, where: Path, field: str, expected: str) -> None:
    if not ok:
        raise BundleError(f"{where}: field '{field}' must be {expected}. The file is damaged or was edited; re-save or retrain the model.")


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(is_int(v) for v in value)


def validate_config(config: Any, directory: Path) -> None:
    """Check the fields, types and bounds of a bundle config; raise BundleError naming the first bad one."""
    where = directory / CONFIG_NAME

    def need(ok: bool, field: str, expected: str) -> None:
        _need(ok, where, field, expected)

    need(isinstance(config, dict), "(top level)", "a JSON object")
    version = config.get("format_version")
    need(is_int(version), "format_version", "an integer")
    if version > FORMAT_VERSION:
        raise BundleError(f"{where}: format {version} is newer than this headstart reads ({FORMAT_VERSION}). Upgrade headstart.")
    if version >= 5:
        members = config.get("backbones")
        need(
            isinstance(members, list) and 1 <= len(members) <= MAX_MEMBERS,
            "backbones",
            f"a list of 1 to {MAX_MEMBERS} backbone records",
        )
        for k, member in enumerate(members):
            _validate_backbone(need, member, f"backbones[{k}]", ensemble=len(members) > 1)
    else:
        _validate_backbone(need, config.get("backbone"), "backbone", ensemble=False)
    classes = config.get("classes")
    need(
        isinstance(classes, list)
        and 2 <= len(classes) <= 100_000
        and all(isinstance(c, str) for c in classes)
        and len(set(classes)) == len(classes),
        "classes",
        "a list of at least two distinct strings",
    )
    need(isinstance(config.get("head"), dict), "head", "an object")
    summary = config.get("summary", {})
    need(isinstance(summary, dict), "summary", "an object")
    if version >= 3:
        optional = ("history",) + tuple(name for since, names in SUMMARY_ADDED.items() if version < since for name in names)
        missing = [f.name for f in dataclasses.fields(TrainingSummary) if f.name not in optional and f.name not in summary]
        need(not missing, f"summary.{missing[0] if missing else ''}", "present")
    if version < 5:
        _validate_data_config(need, config.get("data_config"), "data_config")
    if version >= 2:
        files = config.get("files")
        need(
            isinstance(files, dict) and WEIGHTS_NAME in files and METRICS_NAME in files,
            "files",
            f"an object listing {WEIGHTS_NAME} and {METRICS_NAME}",
        )
        for name, record in files.items():
            need(name in MODEL_FILES and name != CONFIG_NAME, f"files.{name}", "one of " + ", ".join(MODEL_FILES[1:]))
            ok = isinstance(record, dict) and is_int(record.get("size")) and _HEX64.fullmatch(str(record.get("sha256"))) is not None
            need(ok, f"files.{name}", "an object with size and sha256")
    if version >= 7:  # a backbone's weights file is the folder's own copy, never a path elsewhere
        named = [k for k, member in enumerate(config["backbones"]) if member.get("weights_file") is not None]
        need(
            len(named) <= 1 and all(config["backbones"][k]["weights_file"] == BACKBONE_WEIGHTS_NAME for k in named),
            f"backbones[{named[-1] if named else 0}].weights_file",
            f"null, or '{BACKBONE_WEIGHTS_NAME}' for one backbone",
        )
        need(not named or BACKBONE_WEIGHTS_NAME in config["files"], "files", f"an object listing {BACKBONE_WEIGHTS_NAME}")


def _validate_backbone(need: Callable[[bool, str, str], None], backbone: Any, where: str, ensemble: bool) -> None:
    """Check one backbone record: `bundle.json`'s `backbone` (formats 1 to 4) or a member of its `backbones` (format 5)."""
    need(isinstance(backbone, dict), where, "an object")
    name = backbone.get("name")
    need(isinstance(name, str) and bool(name) and ENSEMBLE_SEPARATOR not in name, f"{where}.name", "a backbone name (no '+')")
    need(isinstance(backbone.get("weights_sha256"), str) and _HEX64.fullmatch(backbone["weights_sha256"]) is not None,
         f"{where}.weights_sha256", "64 hex digits")  # fmt: skip
    need(backbone.get("weights_file") is None or isinstance(backbone["weights_file"], str), f"{where}.weights_file", "a string or null")
    if where == "backbone":  # formats 1 to 4 may lack it
        need(backbone.get("n_features") is None or is_int(backbone["n_features"], 1, 1 << 20), f"{where}.n_features", "a positive integer")
    else:
        need(is_int(backbone.get("n_features"), 1, 1 << 20), f"{where}.n_features", "a positive integer")
    need(backbone.get("layer") is None or is_int(backbone["layer"], -64, 64), f"{where}.layer", "an integer from -64 to 64, or null")
    tuned = backbone.get("finetuned_from")
    need(
        tuned is None or (isinstance(tuned, str) and _HEX64.fullmatch(tuned) is not None and not ensemble),
        f"{where}.finetuned_from",
        "null (an ensemble's backbones are not fine-tuned)" if ensemble else "null or 64 hex digits",
    )
    if where != "backbone":
        _validate_data_config(need, backbone.get("data_config"), f"{where}.data_config")


def _validate_data_config(need: Callable[[bool, str, str], None], value: Any, where: str) -> None:
    try:
        DataConfig.from_dict(value)
    except (TypeError, KeyError, ValueError, AttributeError, OverflowError):
        need(False, where, "an object with input_size (16 to 2048), resize_size, interpolation, mean and std")


def _check_head_width(config: BundleConfig, shapes: dict[str, list[int]], where: Path) -> None:
    """The head's input width (from the safetensors header) against the features its backbones give, when all are recorded."""
    widths = [b.n_features for b in config.backbones]
    if any(w is None for w in widths):
        return
    total = sum(w for w in widths if w is not None)
    width = shapes.get("head.0.mean")
    if width != [total]:
        given = " + ".join(f"{w} ({b.name})" for w, b in zip(widths, config.backbones, strict=True)) if len(widths) > 1 else str(total)
        raise BundleError(
            f"{where}: the backbones' n_features, {given}, do not match the head's {width} inputs. "
            "The file is damaged or was edited; re-save or retrain the model."
        )


def _looks_pickled(head: bytes) -> bool:
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(b"PK\x03\x04")
