"""Model folders on disk: safetensors weights plus JSON, never pickle.

A bundle is a folder holding `bundle.json` (what the model is), `model.safetensors`
(its tensors) and `metrics.json` (how it scored). `bundle.json` is written last,
so a folder with a readable `bundle.json` is complete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from headstart.config import DataConfig
from headstart.errors import BundleError
from headstart.files import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
CONFIG_NAME = "bundle.json"
WEIGHTS_NAME = "model.safetensors"
METRICS_NAME = "metrics.json"
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npy", ".npz"})


def save_bundle(
    directory: Path,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    metrics: dict[str, Any],
    extras: dict[str, bytes] | None = None,
) -> Path:
    """Write a bundle; each file atomically, `bundle.json` last. Returns the folder.

    `extras` are further files (name -> bytes), such as the training history.
    """
    config = {"format_version": FORMAT_VERSION, **config}
    validate_config(config, directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / WEIGHTS_NAME, save_safetensors({k: v.contiguous() for k, v in tensors.items()}))
    atomic_write_json(directory / METRICS_NAME, metrics)
    for name, data in (extras or {}).items():
        atomic_write_bytes(directory / name, data)
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


def read_config(directory: Path) -> dict[str, Any]:
    """Read and validate `bundle.json` without touching the weights.

    Raises:
        BundleError: missing folder or file, a pickle inside, bad JSON or a bad field.
    """
    if not (directory / CONFIG_NAME).is_file():
        what = "no such folder" if not directory.exists() else f"no {CONFIG_NAME} in it"
        raise BundleError(f"{directory}: not a headstart model ({what}). Train one with `headstart train DATA --out {directory}`.")
    _refuse_pickles(directory)
    try:
        config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{directory / CONFIG_NAME}: not valid JSON ({e}). Re-save the model or retrain it.") from None
    validate_config(config, directory)
    return config  # type: ignore[no-any-return]


def read_bundle(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a bundle's validated config and its tensors. Nothing in it is executed."""
    config = read_config(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise BundleError(f"{path}: missing. The model folder is incomplete; re-save or retrain it.")
    data = path.read_bytes()
    try:
        tensors = load_safetensors(data)
    except Exception:
        kind = "a pickle" if _looks_pickled(data) else "not a safetensors file"
        raise BundleError(f"{path}: {kind}; refused. headstart loads weights only from safetensors (pickles can run code).") from None
    return config, tensors


def describe_bundle(directory: Path) -> dict[str, Any]:
    """A bundle's validated config, metrics, files and tensor shapes, read without loading any tensor data.

    Raises:
        BundleError: as `read_config`, or the weights file is missing or not safetensors.
    """
    config = read_config(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise BundleError(f"{path}: missing. The model folder is incomplete; re-save or retrain it.")
    try:
        with safe_open(path, framework="numpy") as f:
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception:
        raise BundleError(f"{path}: not a safetensors file; refused. Re-save or retrain the model.") from None
    try:
        metrics = json.loads((directory / METRICS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    return {"config": config, "metrics": metrics, "tensors": shapes, "files": files}


def validate_config(config: Any, directory: Path) -> None:
    """Check the fields and types of a bundle config; raise BundleError naming the first bad one."""
    where = directory / CONFIG_NAME

    def need(ok: bool, field: str, expected: str) -> None:
        if not ok:
            raise BundleError(
                f"{where}: field '{field}' must be {expected}. The file is damaged or was edited; re-save or retrain the model."
            )

    need(isinstance(config, dict), "(top level)", "a JSON object")
    version = config.get("format_version")
    need(isinstance(version, int), "format_version", "an integer")
    if version > FORMAT_VERSION:
        raise BundleError(f"{where}: format {version} is newer than this headstart reads ({FORMAT_VERSION}). Upgrade headstart.")
    backbone = config.get("backbone")
    need(isinstance(backbone, dict), "backbone", "an object")
    need(isinstance(backbone.get("name"), str), "backbone.name", "a string")
    need(
        isinstance(backbone.get("weights_sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", backbone["weights_sha256"]) is not None,
        "backbone.weights_sha256",
        "64 hex digits",
    )
    need(backbone.get("weights_file") is None or isinstance(backbone["weights_file"], str), "backbone.weights_file", "a string or null")
    layer = backbone.get("layer")
    need(layer is None or (isinstance(layer, int) and not isinstance(layer, bool)), "backbone.layer", "an integer or null")
    tuned = backbone.get("finetuned_from")
    need(
        tuned is None or (isinstance(tuned, str) and re.fullmatch(r"[0-9a-f]{64}", tuned) is not None),
        "backbone.finetuned_from",
        "null or 64 hex digits",
    )
    classes = config.get("classes")
    need(
        isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes) and len(set(classes)) == len(classes),
        "classes",
        "a list of at least two distinct strings",
    )
    need(isinstance(config.get("head"), dict), "head", "an object")
    try:
        DataConfig.from_dict(config.get("data_config"))
    except (TypeError, KeyError, ValueError, AttributeError):
        need(False, "data_config", "an object with input_size, resize_size, interpolation, mean and std")


def _refuse_pickles(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and (
            path.suffix.lower() in PICKLE_SUFFIXES or (path.suffix != ".safetensors" and _looks_pickled(_head_bytes(path)))
        ):
            raise BundleError(
                f"{path}: a pickle file inside the model folder; refused. headstart bundles hold only safetensors and JSON, "
                "and pickles can run code. Delete the file if you did not expect it."
            )


def _head_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(4)


def _looks_pickled(head: bytes) -> bool:
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(b"PK\x03\x04")
