"""HeadClassifier: a head trained on cached features, with the scikit-learn estimator contract."""

from __future__ import annotations

import copy
import inspect
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import nn

from headstart.config import is_finite_number, is_int
from headstart.errors import ConfigError, NotFittedError
from headstart.heads import HEAD_KINDS, build_head, standardizer

MAX_HIDDEN = 1 << 16


class HeadClassifier:
    """A linear or MLP head fitted on pooled features, with early stopping on validation loss.

    Args:
        head: "linear" (softmax regression) or "mlp" (Dense(hidden) + ReLU + Dropout + Dense).
        hidden: width of the MLP's hidden layer.
        dropout: dropout rate of the MLP.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: mini-batch size.
        max_epochs: upper bound on passes over the training features.
        patience: epochs without a better validation loss before stopping.
        class_weight: None, or "balanced" to weight classes by n_samples / (n_classes * count).
        seed: seed for initialisation, shuffling and dropout.

    Attributes:
        classes_: the class labels, sorted; column order of `predict_proba`.
        head_: the fitted torch module.
        history_: one dict per epoch: loss, and val_loss / val_accuracy when validation data was given.
        best_epoch_: the epoch whose weights were kept (1-based).

    Examples:
        >>> import numpy as np
        >>> X = np.r_[np.zeros((5, 4)), np.ones((5, 4))].astype("float32")
        >>> y = ["a"] * 5 + ["b"] * 5
        >>> HeadClassifier(max_epochs=50).fit(X, y).predict(X[[0, 9]]).tolist()
        ['a', 'b']
    """

    def __init__(
        self,
        head: Literal["linear", "mlp"] = "linear",
        hidden: int = 512,
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 64,
        max_epochs: int = 100,
        patience: int = 10,
        class_weight: Literal["balanced"] | None = None,
        seed: int = 0,
    ) -> None:
        self.head = head
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.class_weight = class_weight
        self.seed = seed

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, as scikit-learn's `clone` expects."""
        return {name: getattr(self, name) for name in inspect.signature(type(self)).parameters}

    def set_params(self, **params: Any) -> HeadClassifier:
        for name, value in params.items():
            if name not in self.get_params():
                raise ConfigError(f"HeadClassifier has no parameter '{name}'.")
            setattr(self, name, value)
        return self

    def fit(
        self,
        X: ArrayLike,
        y: ArrayLike,
        X_val: ArrayLike | None = None,
        y_val: ArrayLike | None = None,
    ) -> HeadClassifier:
        """Fit on features X of shape (n_samples, n_features) and labels y of shape (n_samples,).

        With validation data, training stops after `patience` epochs without a lower
        validation loss and the best epoch's weights are kept.
        """
        self.check_params()
        features = torch.as_tensor(np.asarray(X, dtype=np.float32))
        labels = np.asarray(y)
        if features.ndim != 2 or len(features) != len(labels) or len(features) == 0:
            raise ConfigError(
                f"Expected X of shape (n_samples, n_features) and y of shape (n_samples,), got {tuple(features.shape)} and {labels.shape}."
            )
        self.classes_ = np.unique(labels)
        if len(self.classes_) < 2:
            raise ConfigError(f"Need at least two classes to fit, got {self.classes_.tolist()}.")
        targets = torch.as_tensor(np.searchsorted(self.classes_, labels))
        val = None
        if X_val is not None and y_val is not None and len(np.asarray(y_val)):
            val = (torch.as_tensor(np.asarray(X_val, dtype=np.float32)), torch.as_tensor(self._encode(np.asarray(y_val))))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._fit(features, targets, val)
        return self

    def _fit(self, X: torch.Tensor, y: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        n_classes = len(self.classes_)
        head = build_head(self.head, X.shape[1], n_classes, self.hidden, self.dropout)
        standardize = standardizer(head).fit(X)
        body = head[1:]  # trained on features standardised once, rather than again in every step
        X = standardize(X)
        if val is not None:
            val = (standardize(val[0]), val[1])
        counts = torch.bincount(y, minlength=n_classes).float()
        weight = len(y) / (n_classes * counts) if self.class_weight == "balanced" else None
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        optimizer = torch.optim.AdamW(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        generator = torch.Generator().manual_seed(self.seed)
        best = (float("inf"), copy.deepcopy(head.state_dict()), 0)
        self.history_: list[dict[str, float]] = []
        for epoch in range(1, self.max_epochs + 1):
            head.train()
            total = 0.0
            correct = 0
            for batch in torch.split(torch.randperm(len(y), generator=generator), self.batch_size):
                optimizer.zero_grad()
                logits = body(X[batch])
                loss = loss_fn(logits, y[batch])
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
                correct += int((logits.argmax(1) == y[batch]).sum())
            record = {"epoch": float(epoch), "loss": total / len(y), "accuracy": correct / len(y)}
            head.eval()
            if val is not None:
                with torch.no_grad():
                    logits = body(val[0])
                    record["val_loss"] = float(nn.functional.cross_entropy(logits, val[1], weight=weight))
                    record["val_accuracy"] = float((logits.argmax(1) == val[1]).float().mean())
            self.history_.append(record)
            monitored = record.get("val_loss", record["loss"])
            if monitored < best[0]:
                best = (monitored, copy.deepcopy(head.state_dict()), epoch)
            elif val is not None and epoch - best[2] >= self.patience:
                break
        head.load_state_dict(best[1])
        head.eval()
        self.head_ = head
        self.best_epoch_ = best[2]

    def predict_proba(self, X: ArrayLike) -> NDArray[np.float32]:
        """Class probabilities, shape (n_samples, n_classes), columns in `classes_` order."""
        self._check_fitted()
        with torch.no_grad():
            logits = self.head_(torch.as_tensor(np.asarray(X, dtype=np.float32)))
        return np.asarray(logits.softmax(1).numpy(), dtype=np.float32)

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        """The most probable class label for each row of X."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]  # type: ignore[no-any-return]

    def _encode(self, labels: NDArray[Any]) -> NDArray[np.int64]:
        unknown = sorted(set(labels.tolist()) - set(self.classes_.tolist()))
        if unknown:
            raise ConfigError(f"Validation labels {unknown[:3]} do not occur in the training labels.")
        return np.searchsorted(self.classes_, labels).astype(np.int64)

    def check_params(self) -> HeadClassifier:
        """Raise ConfigError for a parameter outside what it accepts; return self."""
        if self.head not in HEAD_KINDS:
            raise ConfigError(f"Unknown head '{self.head}'. Choose one of: {', '.join(HEAD_KINDS)}.")
        if self.class_weight not in (None, "balanced"):
            raise ConfigError(f"class_weight must be None or 'balanced', got {self.class_weight!r}.")
        for name, high in (
            ("hidden", MAX_HIDDEN),
            ("batch_size", 1 << 20),
            ("max_epochs", 1 << 20),
            ("patience", 1 << 20),
            ("seed", (1 << 32) - 1),
        ):
            value = getattr(self, name)
            if not is_int(value, int(name != "seed"), high):
                raise ConfigError(f"{name} must be an integer from {int(name != 'seed')} to {high}, got {value!r}.")
        for name in ("dropout", "lr", "weight_decay"):
            value = getattr(self, name)
            if not is_finite_number(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number of at least 0, got {value!r}.")
        if not self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "head_"):
            raise NotFittedError("This HeadClassifier is not fitted yet. Call fit(features, labels) first.")

    @classmethod
    def from_state(cls, params: dict[str, Any], classes: list[str], state: dict[str, torch.Tensor]) -> HeadClassifier:
        """Rebuild a fitted head from its parameters, class labels and state dict.

        Raises:
            ConfigError: the state dict does not match the parameters and classes.
        """
        self = cls(**params).check_params()
        n_features = int(state["0.mean"].shape[0]) if "0.mean" in state and state["0.mean"].ndim == 1 else 0
        with torch.device("meta"):  # the shapes the parameters call for, without allocating them
            expected = {
                k: list(v.shape) for k, v in build_head(self.head, n_features, len(classes), self.hidden, self.dropout).state_dict().items()
            }
        found = {k: list(v.shape) for k, v in state.items()}
        if found != expected:
            detail = "; ".join(f"{k}: {found.get(k, 'missing')} instead of {v}" for k, v in expected.items() if found.get(k) != v)
            detail += "".join(f"; unexpected {k}" for k in found.keys() - expected.keys())
            raise ConfigError(f"Head weights do not match a {self.head} head for {len(classes)} classes: {detail[:300]}")
        head = build_head(self.head, n_features, len(classes), self.hidden, self.dropout)
        head.load_state_dict(state, strict=True)
        head.eval()
        self.head_, self.classes_, self.best_epoch_, self.history_ = head, np.asarray(classes), 0, []
        return self
