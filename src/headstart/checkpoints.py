"""Fine-tuning checkpoints: a run's state after each epoch, written beside the model so an interrupted run can resume.

`.checkpoint/checkpoint.json` names the tensor file `checkpoint-N.safetensors`
it belongs to and is written after it, so the JSON is the commit point.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headstart.errors import ConfigError
from headstart.files import atomic_write_bytes, atomic_write_json, read_regular

if TYPE_CHECKING:
    import torch

CHECKPOINT_JSON = "checkpoint.json"
_OPTIMIZER_TENSOR = re.compile(r"optim\.\d{1,6}\..+")


@dataclass(frozen=True)
class Checkpoint:
    """A fine-tuning run's state after an epoch: trainable tensors now and at the best epoch, the optimizer, the history."""

    current: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    history: list[dict[str, float]]
    best_loss: float
    best_epoch: int


def save_checkpoint(directory: Path, checkpoint: Checkpoint, fingerprint: str) -> None:
    """Tensors to a new file, then the JSON that names it (the commit point), then old tensor files go."""
    from safetensors.torch import save as save_safetensors

    opt, history = checkpoint.optimizer, checkpoint.history
    tensors = {f"current.{k}": v for k, v in checkpoint.current.items()}
    tensors.update({f"best.{k}": v for k, v in checkpoint.best.items()})
    for index, state in opt["state"].items():
        tensors.update({f"optim.{index}.{k}": v for k, v in state.items()})
    name = f"checkpoint-{len(history)}.safetensors"
    atomic_write_bytes(directory / name, save_safetensors({k: v.contiguous() for k, v in tensors.items()}))
    atomic_write_json(
        directory / CHECKPOINT_JSON,
        {
            "fingerprint": fingerprint,
            "tensors": name,
            "history": history,
            "best_loss": checkpoint.best_loss,
            "best_epoch": checkpoint.best_epoch,
            "optimizer_groups": opt["param_groups"],
        },
    )
    for old in directory.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def remove_checkpoint(directory: Path) -> None:
    """Delete the checkpoint files in `directory` (and the folder, if nothing else is in it)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name == CHECKPOINT_JSON or _CHECKPOINT_TENSORS.fullmatch(entry.name) or _CHECKPOINT_LEFTOVER.fullmatch(entry.name):
            entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()


_CHECKPOINT_TENSORS = re.compile(r"checkpoint-\d{1,6}\.safetensors")
_CHECKPOINT_LEFTOVER = re.compile(r"\.(checkpoint\.json|checkpoint-\d{1,6}\.safetensors)\.[0-9a-f]{12}\.tmp")
MAX_CHECKPOINT_BYTES = 8 << 30


def load_checkpoint(directory: Path, fingerprint: str) -> Checkpoint:
    """The checkpoint in `directory`, if it was made by a run with this `fingerprint` (else ConfigError)."""
    from safetensors.torch import load as load_safetensors

    damaged = f"The checkpoint in {directory} is damaged; run without --resume to start afresh."
    try:
        meta = json.loads(read_regular(directory / CHECKPOINT_JSON, 64 << 20), parse_constant=lambda name: None)
    except (OSError, ValueError, RecursionError):
        raise ConfigError(damaged) from None
    fields_ok = (
        isinstance(meta, dict)
        and isinstance(meta.get("tensors"), str)
        and _CHECKPOINT_TENSORS.fullmatch(meta["tensors"]) is not None
        and isinstance(meta.get("history"), list)
        and all(isinstance(row, dict) and all(isinstance(v, int | float) for v in row.values()) for row in meta["history"])
        and isinstance(meta.get("best_loss"), int | float)
        and isinstance(meta.get("best_epoch"), int)
        and isinstance(meta.get("optimizer_groups"), list)
    )
    if not fields_ok:
        raise ConfigError(damaged)
    if meta.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"The checkpoint in {directory} was made with other data or settings; "
            "resume with the same command, or run without --resume to start afresh."
        )
    try:  # only a checkpoint-N.safetensors in this folder: the name was checked above
        tensors = load_safetensors(read_regular(directory / meta["tensors"], MAX_CHECKPOINT_BYTES))
    except Exception:
        raise ConfigError(damaged) from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            if not _OPTIMIZER_TENSOR.fullmatch(key):
                raise ConfigError(damaged)
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return Checkpoint(
        current={k.removeprefix("current."): v for k, v in tensors.items() if k.startswith("current.")},
        best={k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")},
        optimizer={"state": state, "param_groups": meta["optimizer_groups"]},
        history=meta["history"],
        best_loss=meta["best_loss"],
        best_epoch=meta["best_epoch"],
    )
