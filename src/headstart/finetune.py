"""Fine-tuning: the top blocks of the backbone trained together with the head.

Phase two of the recipe, run after the head has converged on frozen features.
The whole backbone stays in inference mode, so every BatchNorm layer keeps its
running statistics (the Keras fine-tuning advice); the unfrozen blocks' weights,
BatchNorm scales and shifts included, learn at lower rates than the head, with
AdamW, a linear warm-up and a cosine decay. Each epoch ends with a checkpoint,
written atomically, from which an interrupted run resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from headstart.augment import AUGMENT_PRESETS, AugmentConfig, augmented_input
from headstart.backbone import Backbone
from headstart.checkpoints import CHECKPOINT_JSON, Checkpoint, load_checkpoint, save_checkpoint
from headstart.config import Progress
from headstart.data import ImageRecord
from headstart.errors import ConfigError
from headstart.heads import Head
from headstart.pipeline import decode_input, load_batches
from headstart.transforms import normalize
from headstart.weights import hash_state_dict


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of the fine-tuning phase.

    Attributes:
        unfreeze: how many of the backbone's top blocks to train (timm's per-block
            groups; the last also holds the final 1x1 conv); None trains all of them.
        epochs: maximum passes over the training images.
        lr: peak learning rate of the head.
        backbone_lr: peak learning rate of the top unfrozen block.
        layer_decay: each block further down gets this factor times the rate above it.
        weight_decay: AdamW weight decay.
        warmup_epochs: epochs of linear warm-up before the cosine decay.
        patience: epochs without a lower validation loss before stopping.
        label_smoothing: of the training loss (validation loss is plain cross-entropy).
        batch_size: images per step.
        augment: what is done to the training images (never to validation images).
        seed: seed of shuffling, augmentation and dropout.
    """

    unfreeze: int | None = 2
    epochs: int = 8
    lr: float = 1e-3
    backbone_lr: float = 3e-4
    layer_decay: float = 0.8
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    patience: int = 3
    label_smoothing: float = 0.1
    batch_size: int = 32
    augment: AugmentConfig = field(default_factory=lambda: AUGMENT_PRESETS["strong"])
    seed: int = 0

    def __post_init__(self) -> None:
        if self.unfreeze is not None and self.unfreeze < 1:
            raise ConfigError(f"unfreeze must be at least 1 (or 'all'), got {self.unfreeze}.")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "augment": self.augment.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        return cls(**{**d, "augment": AugmentConfig.from_dict(d["augment"])})


@dataclass(frozen=True)
class FinetuneResult:
    """The best epoch's backbone and head, and one history row per epoch."""

    backbone: Backbone
    head: Head
    history: list[dict[str, float]]
    best_epoch: int
    val_proba: NDArray[np.float32]


class _Network(nn.Module):
    """Backbone features into the head, with gradients."""

    def __init__(self, backbone: Backbone, head: nn.Sequential) -> None:
        super().__init__()
        self.backbone = backbone
        self.trunk = backbone.module
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.backbone.pooled(x))
        return logits

    def train(self, mode: bool = True) -> _Network:
        """Only the head switches mode: the backbone (and its BatchNorm statistics) stays in inference mode."""
        super().train(mode)
        self.trunk.eval()
        return self


def finetune(
    backbone: Backbone,
    head: Head,
    train: Sequence[ImageRecord],
    val: Sequence[ImageRecord],
    config: FinetuneConfig,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    on_best: Callable[[FinetuneResult], None] | None = None,
) -> FinetuneResult:
    """Train the top `config.unfreeze` blocks of `backbone` together with a fitted `head`.

    Args:
        backbone: the pretrained backbone; not modified (a copy is tuned).
        head: a head already fitted on this backbone's frozen features.
        train, val: labelled images; labels must be among `head.classes`.
        config: see `FinetuneConfig`.
        checkpoint_dir: where the per-epoch checkpoint goes; None keeps none.
        resume: continue from the checkpoint in `checkpoint_dir`.
        progress: called per step with the running loss and accuracy.
        on_best: called with the best-so-far result whenever the validation loss improves.

    Returns:
        The backbone and head of the epoch with the lowest validation loss; when no
        epoch beats the frozen backbone (epoch 0), `backbone` and `head` unchanged.
    """
    classes = [str(c) for c in head.classes]
    net = _Network(backbone.with_module(copy.deepcopy(backbone.module)), head.to_torch())
    trainable = _unfreeze(net, config)
    param_groups = [{"params": params, "lr": lr} for params, lr in trainable]
    optimizer = torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)
    peak_lrs = [lr for _, lr in trainable]
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    fingerprint = _fingerprint(backbone, classes, train, val, config)

    y_train = {r.path: classes.index(r.label) for r in train}
    y_val = torch.as_tensor([classes.index(r.label) for r in val])
    history: list[dict[str, float]] = []
    start_epoch = 1

    def best_result() -> FinetuneResult:
        if best_epoch == 0:  # nothing beat the frozen backbone
            return FinetuneResult(backbone, head, list(history), 0, best_state["val_proba"].numpy())
        return _result(net, head, best_state, history, best_epoch)

    if not resume:  # epoch 0, the head on the frozen backbone, is the score to beat
        best_loss, _, val_proba = _validate(net, val, y_val, config, 0, progress)
        best_epoch, best_state = 0, {**_trainable_state(net), "val_proba": val_proba}
        if on_best:
            on_best(best_result())
    else:
        if checkpoint_dir is None or not (checkpoint_dir / CHECKPOINT_JSON).is_file():
            raise ConfigError(f"Nothing to resume: no checkpoint in {checkpoint_dir}. Run without --resume to start afresh.")
        saved = load_checkpoint(checkpoint_dir, fingerprint)
        try:
            net.load_state_dict(saved.current, strict=False)
            optimizer.load_state_dict(saved.optimizer)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"The checkpoint in {checkpoint_dir} does not fit this model ({str(e).splitlines()[0][:200]}); run without --resume."
            ) from None
        history, best_loss, best_epoch, best_state = saved.history, saved.best_loss, saved.best_epoch, saved.best
        start_epoch = len(history) + 1

    for epoch in range(start_epoch, config.epochs + 1):
        if epoch - best_epoch > config.patience:
            break
        started = time.perf_counter()
        loss, accuracy = _train_epoch(net, optimizer, peak_lrs, train, y_train, config, epoch, steps_per_epoch, progress)
        val_loss, val_accuracy, val_proba = _validate(net, val, y_val, config, epoch, progress)
        history.append(
            {
                "epoch": float(epoch),
                "loss": loss,
                "accuracy": accuracy,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "lr": optimizer.param_groups[-1]["lr"],
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        if val_loss < best_loss:
            best_loss, best_epoch, best_state = val_loss, epoch, {**_trainable_state(net), "val_proba": val_proba}
            if on_best:
                on_best(best_result())
        if checkpoint_dir is not None:
            state = Checkpoint(_trainable_state(net), best_state, optimizer.state_dict(), history, best_loss, best_epoch)
            save_checkpoint(checkpoint_dir, state, fingerprint)
    return best_result()


def _unfreeze(net: _Network, config: FinetuneConfig) -> list[tuple[list[nn.Parameter], float]]:
    """Freeze the backbone, unfreeze its top blocks; (parameters, peak lr) per group, top block first, head last."""
    groups = parameter_groups(net.backbone)
    chosen = groups if config.unfreeze is None else groups[-config.unfreeze :]
    for p in net.trunk.parameters():
        p.requires_grad_(False)
    trainable = []
    for depth, names in enumerate(reversed(chosen)):
        params = [net.trunk.get_parameter(n) for n in names]
        for p in params:
            p.requires_grad_(True)
        trainable.append((params, config.backbone_lr * config.layer_decay**depth))
    trainable.append((list(net.head.parameters()), config.lr))
    return trainable


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay towards 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train_epoch(
    net: _Network,
    optimizer: torch.optim.Optimizer,
    peak_lrs: list[float],
    train: Sequence[ImageRecord],
    labels: dict[Path, int],
    config: FinetuneConfig,
    epoch: int,
    steps_per_epoch: int,
    progress: Progress | None,
) -> tuple[float, float]:
    order = np.random.default_rng([config.seed, epoch]).permutation(len(train)).tolist()
    cfg = net.backbone.data_config

    def load(i: int) -> np.ndarray[Any, Any]:
        return augmented_input(train[i].path, config.augment, cfg, np.random.default_rng([config.seed, epoch, i]))

    total_steps = config.epochs * steps_per_epoch
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    step = (epoch - 1) * steps_per_epoch
    seen = correct = 0
    loss_sum = 0.0
    net.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 100_003 + epoch)  # dropout in the head
        for batch in load_batches(load, order, config.batch_size):
            for group, peak in zip(optimizer.param_groups, peak_lrs, strict=True):
                group["lr"] = peak * _schedule(step, total_steps, warmup)
            targets = torch.as_tensor([labels[train[i].path] for i in batch.indices])
            logits = net(torch.from_numpy(batch.arrays))
            loss = nn.functional.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            step += 1
            seen += len(targets)
            loss_sum += loss.item() * len(targets)
            correct += int((logits.argmax(1) == targets).sum())
            if progress:
                status = f"loss {loss_sum / seen:.3f} acc {correct / seen:.3f}"
                progress(f"Fine-tuning epoch {epoch}/{config.epochs}", seen, len(train), status)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _validate(
    net: _Network, val: Sequence[ImageRecord], labels: torch.Tensor, config: FinetuneConfig, epoch: int, progress: Progress | None
) -> tuple[float, float, torch.Tensor]:
    """Validation loss, accuracy and class probabilities (n_val, n_classes), without augmentation."""
    cfg = net.backbone.data_config
    net.eval()
    logits = []
    done = 0
    with torch.inference_mode():
        for batch in load_batches(lambda i: normalize(decode_input(val[i].path, cfg), cfg), range(len(val)), config.batch_size):
            logits.append(net(torch.from_numpy(batch.arrays)))
            done += len(batch.indices)
            if progress:
                progress(f"Validating epoch {epoch}/{config.epochs}", done, len(val))
    all_logits = torch.cat(logits)
    loss = float(nn.functional.cross_entropy(all_logits, labels))
    return loss, float((all_logits.argmax(1) == labels).float().mean()), all_logits.softmax(1)


def _trainable_state(net: _Network) -> dict[str, torch.Tensor]:
    """Copies of the tensors fine-tuning changes: trainable backbone parameters and the whole head."""
    state = {f"trunk.{n}": p.detach().clone() for n, p in net.trunk.named_parameters() if p.requires_grad}
    state.update({f"head.{n}": t.detach().clone() for n, t in net.head.state_dict().items()})
    return state


def _result(net: _Network, head: Head, best: dict[str, torch.Tensor], history: list[dict[str, float]], best_epoch: int) -> FinetuneResult:
    tuned = _Network(net.backbone.with_module(copy.deepcopy(net.trunk)), copy.deepcopy(net.head))
    tuned.load_state_dict({k: v for k, v in best.items() if k != "val_proba"}, strict=False)
    tuned.eval()
    for p in tuned.parameters():
        p.requires_grad_(False)
    backbone = tuned.backbone.with_module(
        tuned.trunk,
        weights_sha256=hash_state_dict(tuned.trunk.state_dict()),
        finetuned_from=net.backbone.finetuned_from or net.backbone.weights_sha256,
    )
    fitted = head.with_weights_from(tuned.head)
    return FinetuneResult(backbone, fitted, list(history), best_epoch, best["val_proba"].numpy())


def _fingerprint(
    backbone: Backbone, classes: list[str], train: Sequence[ImageRecord], val: Sequence[ImageRecord], config: FinetuneConfig
) -> str:
    """What a checkpoint must have been made with for a resume to continue it."""
    import hashlib

    identity = {
        "backbone": backbone.name,
        "weights": backbone.weights_sha256,
        "layer": backbone.layer,
        "classes": classes,
        "train": [str(r.path) for r in train],
        "val": [str(r.path) for r in val],
        "config": config.to_dict(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def parameter_groups(backbone: Backbone) -> list[list[str]]:
    """Parameter names of the backbone's blocks, bottom (stem) to top, ImageNet classifier left out.

    The grouping is timm's fine-grained `group_matcher` (one group per block), the
    one it uses for layer-wise learning-rate decay.
    """
    from timm.models import group_parameters

    model: Any = backbone.module
    classifier = {f"{model.default_cfg.get('classifier', 'classifier')}.{n}" for n, _ in model.get_classifier().named_parameters()}
    groups = group_parameters(model, model.group_matcher(coarse=False))
    named = [[n for n in names if n not in classifier] for _, names in sorted(groups.items())]
    return [names for names in named if names]
