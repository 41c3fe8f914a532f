"""HeadClassifier: a head trained in NumPy on cached features, with the scikit-learn estimator contract."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from headstart.config import is_finite_number, is_int
from headstart.errors import ConfigError, NotFittedError
from headstart.heads import (
    HEAD_KINDS,
    HeadState,
    compute_logits,
    create_torch_head,
    fit_standardization,
    head_shapes,
    init_head_state,
    read_torch_head,
)

if TYPE_CHECKING:
    from torch import nn

MAX_HIDDEN = 1 << 16

_BETAS = (0.9, 0.999)
_EPS = 1e-8


class HeadClassifier:
    """A linear or MLP head fitted on pooled features standardised with the training statistics.

    The linear head is L2-regularised softmax regression fitted to convergence by
    scikit-learn's L-BFGS (`solver="lbfgs"`, strength `C`; see `headstart.selection` for
    choosing `C` by cross-validation). The MLP, and the linear head with `solver="adamw"`,
    train in NumPy (float32): AdamW on mini-batches, softmax cross-entropy, torch's
    nn.Linear initialisation, and early stopping on validation loss.

    Args:
        head: "linear" (softmax regression) or "mlp" (Dense(hidden) + ReLU + Dropout + Dense).
        C: inverse L2 regularisation strength of the L-BFGS linear head, as scikit-learn's.
        solver: "lbfgs" (linear head only), "adamw", or "auto": L-BFGS for the linear head, AdamW for the MLP.
        hidden: width of the MLP's hidden layer.
        dropout: dropout rate of the MLP, in [0, 1).
        lr: AdamW learning rate.
        weight_decay: AdamW (decoupled) weight decay.
        batch_size: mini-batch size.
        max_epochs: upper bound on passes over the training features.
        patience: epochs without a lower validation loss before stopping.
        class_weight: None, or "balanced" to weight classes by n_samples / (n_classes * count).
        seed: seed for the validation hold-out, initialisation, shuffling and dropout.
        validation_fraction: share of the training rows, in [0, 1), held out (stratified, at
            least one row per class) for early stopping when `fit` gets no validation data.
            0, or a class with a single row, means no hold-out: all `max_epochs` run and the
            epoch with the lowest training loss is kept.

    Attributes:
        classes_: the class labels, sorted; column order of `predict_proba`.
        n_features_in_: the number of features `fit` saw.
        weights_: the head's float32 arrays by name (see `headstart.heads`).
        history_: one dict per epoch: epoch, loss, accuracy, and val_loss / val_accuracy with validation data.
        best_epoch_: the epoch whose weights were kept (1-based; 0 for L-BFGS and for a head loaded from a state).

    Examples:
        >>> import numpy as np
        >>> X = np.r_[np.zeros((5, 4)), np.ones((5, 4))].astype("float32")
        >>> y = ["a"] * 5 + ["b"] * 5
        >>> HeadClassifier(lr=0.01, max_epochs=50).fit(X, y).predict(X[[0, 9]]).tolist()
        ['a', 'b']
    """

    def __init__(
        self,
        head: Literal["linear", "mlp"] = "linear",
        C: float = 0.1,
        solver: Literal["auto", "lbfgs", "adamw"] = "auto",
        hidden: int = 512,
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 64,
        max_epochs: int = 100,
        patience: int = 10,
        class_weight: Literal["balanced"] | None = None,
        seed: int = 0,
        validation_fraction: float = 0.1,
    ) -> None:
        self.head = head
        self.C = C
        self.solver = solver
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.class_weight = class_weight
        self.seed = seed
        self.validation_fraction = validation_fraction

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

        The L-BFGS linear head is fitted on all of X, y to convergence (validation data unused).
        Other heads stop after `patience` epochs without a lower validation loss and keep the
        best epoch's weights; the validation data is `X_val`, `y_val` when given (an empty
        pair means none), else a `validation_fraction` hold-out of X, y.

        Raises:
            ConfigError: a parameter is out of range, or the arrays do not fit together.
        """
        self.check_params()
        features = _as_features(X, "X")
        labels = np.asarray(y)
        if labels.ndim != 1 or len(features) != len(labels) or features.size == 0:
            raise ConfigError(
                f"Expected X of shape (n_samples, n_features) and y of shape (n_samples,), got {features.shape} and {labels.shape}."
            )
        classes = np.unique(labels)
        if len(classes) < 2:
            raise ConfigError(f"Need at least two classes to fit, got {classes.tolist()}.")
        targets = np.searchsorted(classes, labels)
        if (X_val is None) != (y_val is None):
            raise ConfigError("Pass both X_val and y_val, or neither.")
        if self.uses_lbfgs():  # fitted to convergence: validation data is not needed
            self.classes_, self.n_features_in_ = classes, features.shape[1]
            self.weights_, self.history_, self.best_epoch_ = self._fit_lbfgs(features, targets, len(classes)), [], 0
            return self
        # independent streams: the hold-out, the initial weights, the batch order and dropout do not shift one another
        split_rng, init_rng, shuffle_rng, dropout_rng = np.random.default_rng(self.seed).spawn(4)
        val: tuple[NDArray[np.float32], NDArray[np.intp]] | None = None
        if X_val is None and y_val is None:
            held_out = _stratified_hold_out(targets, len(classes), self.validation_fraction, split_rng)
            if held_out.any():
                val = (features[held_out], targets[held_out])
                features, targets = features[~held_out], targets[~held_out]
        elif X_val is not None and y_val is not None:
            val_labels = np.asarray(y_val)
            if len(val_labels):
                val_features = _as_features(X_val, "X_val", features.shape[1])
                if val_labels.ndim != 1 or len(val_features) != len(val_labels):
                    raise ConfigError(f"X_val and y_val have different lengths: {val_features.shape} and {val_labels.shape}.")
                unknown = sorted(set(val_labels.tolist()) - set(classes.tolist()))
                if unknown:
                    raise ConfigError(f"Validation labels {unknown[:3]} do not occur in the training labels.")
                val = (val_features, np.searchsorted(classes, val_labels))
        weights, history, best_epoch = self._train(features, targets, val, len(classes), (init_rng, shuffle_rng, dropout_rng))
        self.classes_ = classes
        self.n_features_in_ = features.shape[1]
        self.weights_ = weights
        self.history_ = history
        self.best_epoch_ = best_epoch
        return self

    def uses_lbfgs(self) -> bool:
        """Whether `fit` runs L-BFGS (the linear head with solver "auto" or "lbfgs"), whose strength is `C`."""
        return self.head == "linear" and self.solver in ("auto", "lbfgs")

    def _fit_lbfgs(self, X: NDArray[np.float32], y: NDArray[np.intp], n_classes: int) -> HeadState:
        """Softmax regression on standardised features by scikit-learn's L-BFGS, as a linear head's state."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        mean, scale = fit_standardization(X)
        class_weight = "balanced" if self.class_weight == "balanced" else None
        lr = LogisticRegression(C=self.C, class_weight=class_weight, max_iter=self.max_epochs * 10, tol=1e-4)
        with warnings.catch_warnings():  # stopping at max_iter is a result, not a failure: the best weights found so far
            warnings.simplefilter("ignore", ConvergenceWarning)
            lr.fit((X - mean) / scale, y)
        weight, bias = lr.coef_.astype(np.float32), lr.intercept_.astype(np.float32)
        if n_classes == 2:  # one logit for the second class: as two, softmax gives the same probabilities
            weight, bias = np.r_[-weight, weight] / 2, np.r_[-bias, bias] / 2
        return {"0.mean": mean, "0.scale": scale, "1.weight": weight, "1.bias": bias}

    def _train(
        self,
        X: NDArray[np.float32],
        y: NDArray[np.intp],
        val: tuple[NDArray[np.float32], NDArray[np.intp]] | None,
        n_classes: int,
        rngs: tuple[np.random.Generator, np.random.Generator, np.random.Generator],
    ) -> tuple[HeadState, list[dict[str, float]], int]:
        init_rng, shuffle_rng, dropout_rng = rngs
        mean, scale = fit_standardization(X)
        state = init_head_state(self.head, mean, scale, n_classes, self.hidden, init_rng)
        names = [name for name in state if not name.startswith("0.")]
        params = [state[name] for name in names]
        X = (X - mean) / scale  # standardised once, rather than in every step
        if val is not None:
            val = ((val[0] - mean) / scale, val[1])
        counts = np.bincount(y, minlength=n_classes)
        class_weight = (len(y) / (n_classes * np.maximum(counts, 1))).astype(np.float32) if self.class_weight == "balanced" else None
        optimizer = _AdamW(params, self.lr, self.weight_decay)
        best = (math.inf, [p.copy() for p in params], 0)
        history: list[dict[str, float]] = []
        for epoch in range(1, self.max_epochs + 1):
            total = 0.0
            correct = 0
            order = shuffle_rng.permutation(len(y))
            for start in range(0, len(y), self.batch_size):
                batch = order[start : start + self.batch_size]
                logits, loss, grads = self._step(params, X[batch], y[batch], class_weight, dropout_rng)
                optimizer.step(grads)
                total += loss * len(batch)
                correct += int((logits.argmax(1) == y[batch]).sum())
            record = {"epoch": float(epoch), "loss": total / len(y), "accuracy": correct / len(y)}
            if val is not None:
                logits = _body_logits(params, val[0])
                record["val_loss"] = _cross_entropy(logits, val[1], class_weight)[0]
                record["val_accuracy"] = float((logits.argmax(1) == val[1]).mean())
            history.append(record)
            monitored = record.get("val_loss", record["loss"])
            if monitored < best[0]:
                best = (monitored, [p.copy() for p in params], epoch)
            elif val is not None and epoch - best[2] >= self.patience:
                break
        weights: HeadState = {"0.mean": mean, "0.scale": scale, **dict(zip(names, best[1], strict=True))}
        return weights, history, best[2]

    def _step(
        self,
        params: list[NDArray[np.float32]],
        X: NDArray[np.float32],
        y: NDArray[np.intp],
        class_weight: NDArray[np.float32] | None,
        rng: np.random.Generator,
    ) -> tuple[NDArray[np.float32], float, list[NDArray[np.float32]]]:
        """One mini-batch, in training mode: the logits, the loss, and its gradient for each of `params`."""
        if len(params) == 2:
            weight, bias = params
            logits = X @ weight.T + bias
            loss, grad = _cross_entropy(logits, y, class_weight)
            return logits, loss, [grad.T @ X, grad.sum(0)]
        w1, b1, w2, b2 = params
        hidden: NDArray[np.float32] = X @ w1.T + b1
        gate = (hidden > 0).astype(np.float32)  # ReLU, then inverted dropout, as one mask
        if self.dropout > 0:
            gate *= rng.random(hidden.shape, dtype=np.float32) >= self.dropout
            gate *= np.float32(1 / (1 - self.dropout))
        hidden *= gate
        logits = hidden @ w2.T + b2
        loss, grad = _cross_entropy(logits, y, class_weight)
        grad_hidden = (grad @ w2) * gate
        return logits, loss, [grad_hidden.T @ X, grad_hidden.sum(0), grad.T @ hidden, grad.sum(0)]

    def decision_function(self, X: ArrayLike) -> NDArray[np.float32]:
        """Logits, shape (n_samples, n_classes), columns in `classes_` order."""
        self._check_fitted()
        return compute_logits(self.weights_, _as_features(X, "X", self.n_features_in_))

    def predict_proba(self, X: ArrayLike) -> NDArray[np.float32]:
        """Class probabilities, float32 of shape (n_samples, n_classes), columns in `classes_` order."""
        logits = self.decision_function(X)
        logits -= logits.max(1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(1, keepdims=True)
        return logits

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        """The most probable class label for each row of X."""
        index = self.decision_function(X).argmax(1)
        return self.classes_[index]  # type: ignore[no-any-return]

    def logit_gradient(self, X: ArrayLike, class_index: int) -> NDArray[np.float32]:
        """Gradient of class `class_index`'s logit with respect to each row of X: float32, shape like X (n_samples, n_features).

        What Grad-CAM weights a feature map's channels by.
        """
        self._check_fitted()
        features = _as_features(X, "X", self.n_features_in_)
        if not is_int(class_index, 0, len(self.classes_) - 1):
            raise ConfigError(f"class_index must be an integer from 0 to {len(self.classes_) - 1}, got {class_index!r}.")
        w = self.weights_
        if "4.weight" not in w:
            return np.repeat((w["1.weight"][class_index] / w["0.scale"])[None], len(features), axis=0)
        hidden = ((features - w["0.mean"]) / w["0.scale"]) @ w["1.weight"].T + w["1.bias"]
        grad_hidden = (hidden > 0) * w["4.weight"][class_index]
        return (grad_hidden @ w["1.weight"]) / w["0.scale"]  # type: ignore[no-any-return]

    def to_torch(self) -> nn.Sequential:
        """The equivalent torch module, in eval mode; its state dict is named as `weights_`. Imports torch."""
        self._check_fitted()
        return create_torch_head(self.weights_, self.dropout).eval()

    def with_weights_from(self, module: nn.Module) -> HeadClassifier:
        """A fitted copy whose weights are read from a torch module shaped like `to_torch()` (e.g. after fine-tuning).

        Raises:
            ConfigError: the module's state dict has other names or shapes.
        """
        self._check_fitted()
        weights = read_torch_head(module)
        expected = {k: v.shape for k, v in self.weights_.items()}
        _check_shapes({k: v.shape for k, v in weights.items()}, expected, f"the fitted {self.head} head")
        fitted = HeadClassifier(**self.get_params())
        fitted.classes_, fitted.n_features_in_, fitted.weights_ = self.classes_, self.n_features_in_, weights
        fitted.history_, fitted.best_epoch_ = list(self.history_), self.best_epoch_
        return fitted

    def check_params(self) -> HeadClassifier:
        """Raise ConfigError for a parameter outside what it accepts; return self."""
        if self.head not in HEAD_KINDS:
            raise ConfigError(f"Unknown head '{self.head}'. Choose one of: {', '.join(HEAD_KINDS)}.")
        if self.solver not in ("auto", "lbfgs", "adamw") or (self.solver == "lbfgs" and self.head != "linear"):
            raise ConfigError(f"solver must be 'auto', 'lbfgs' (linear head only) or 'adamw', got {self.solver!r} for a {self.head} head.")
        if not is_finite_number(self.C) or not self.C > 0:
            raise ConfigError(f"C must be a finite number above 0, got {self.C!r}.")
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
        for name in ("dropout", "lr", "weight_decay", "validation_fraction"):
            value = getattr(self, name)
            if not is_finite_number(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number of at least 0, got {value!r}.")
        for name in ("dropout", "validation_fraction"):
            if not getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise NotFittedError("This HeadClassifier is not fitted yet. Call fit(features, labels) first.")

    @classmethod
    def from_state(cls, params: Mapping[str, Any], classes: Sequence[str], state: Mapping[str, Any]) -> HeadClassifier:
        """Rebuild a fitted head from its parameters, class labels and state (NumPy arrays or torch tensors).

        Parameters missing from `params` take their defaults. The state's names and shapes
        are checked against what the parameters call for before any array is copied.

        Raises:
            ConfigError: an unknown or invalid parameter, or a state that does not match the parameters and classes.
        """
        unknown = sorted(set(params) - set(inspect.signature(cls).parameters))
        if unknown:
            raise ConfigError(
                f"Unknown head parameters {unknown[:3]}; this version of headstart knows {sorted(inspect.signature(cls).parameters)}."
            )
        self = cls(**params).check_params()
        found = {k: tuple(int(d) for d in np.shape(v)) for k, v in state.items()}
        mean_shape = found.get("0.mean", ())
        n_features = mean_shape[0] if len(mean_shape) == 1 else 0
        expected = head_shapes(self.head, n_features, len(classes), self.hidden)
        kind = f"a {self.head} head" + (f" of width {self.hidden}" if self.head == "mlp" else "")
        _check_shapes(found, expected, f"{kind} for {len(classes)} classes")
        weights: HeadState = {}
        for name in expected:
            try:
                weights[name] = np.asarray(state[name]).astype(np.float32)  # a copy, also of a torch tensor
            except (TypeError, ValueError, RuntimeError) as e:
                raise ConfigError(f"Head weight '{name}' is not a float array: {e}") from None
            if not np.isfinite(weights[name]).all():
                raise ConfigError(f"Head weight '{name}' contains NaN or infinite values.")
        self.classes_, self.n_features_in_, self.weights_ = np.asarray(classes), n_features, weights
        self.best_epoch_, self.history_ = 0, []
        return self


class _AdamW:
    """torch's AdamW (decoupled weight decay, bias-corrected moments), updating the arrays in place.

    The moments are kept as m / (1 - beta1) and v / (1 - beta2), which saves two passes
    over the parameters per step; the constants are folded into the step instead.
    """

    def __init__(self, params: list[NDArray[np.float32]], lr: float, weight_decay: float) -> None:
        self.params = params
        self.lr = lr
        self.weight_decay = weight_decay
        self.moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
        self.scratch = [np.empty_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[NDArray[np.float32]]) -> None:
        self.t += 1
        beta1, beta2 = _BETAS
        # torch: p -= lr / (1 - beta1**t) * m / (sqrt(v / (1 - beta2**t)) + eps), with m, v as stored here times (1 - beta)
        v_scale = math.sqrt((1 - beta2) / (1 - beta2**self.t))
        eps = _EPS / v_scale
        step_size = self.lr * (1 - beta1) / (1 - beta1**self.t) / v_scale
        decay = 1 - self.lr * self.weight_decay
        for p, g, (m, v), tmp in zip(self.params, grads, self.moments, self.scratch, strict=True):
            np.multiply(g, g, out=tmp)
            v *= beta2
            v += tmp
            m *= beta1
            m += g
            np.sqrt(v, out=tmp)
            tmp += eps
            np.divide(m, tmp, out=tmp)
            tmp *= step_size
            p *= decay
            p -= tmp


def _as_features(X: ArrayLike, name: str, n_features: int | None = None) -> NDArray[np.float32]:
    """X as a finite float32 array of shape (n_samples, n_features)."""
    try:
        features = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be an array of numbers: {e}") from None
    if features.ndim != 2:
        raise ConfigError(f"Expected {name} of shape (n_samples, n_features), got {features.shape}; reshape a single row with X[None].")
    if n_features is not None and features.shape[1] != n_features:
        raise ConfigError(f"{name} has {features.shape[1]} features, but the head was fitted on {n_features}.")
    if not np.isfinite(features).all():
        raise ConfigError(f"{name} contains NaN or infinite values.")
    return features


def _stratified_hold_out(y: NDArray[np.intp], n_classes: int, fraction: float, rng: np.random.Generator) -> NDArray[np.bool_]:
    """A mask of about `fraction` of each class's rows (at least one, never all); none when a class has a single row."""
    held_out = np.zeros(len(y), dtype=bool)
    counts = np.bincount(y, minlength=n_classes)
    if fraction == 0 or counts.min() < 2:
        return held_out
    for label, count in enumerate(counts):
        rows = np.flatnonzero(y == label)
        held_out[rng.choice(rows, max(1, min(int(count) - 1, round(fraction * int(count)))), replace=False)] = True
    return held_out


def _check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise ConfigError naming every array whose name or shape differs from `expected`."""
    if dict(found) == dict(expected):
        return
    detail = "; ".join(f"{k}: {found.get(k, 'missing')} instead of {v}" for k, v in expected.items() if found.get(k) != v)
    detail += "".join(f"; unexpected {k}" for k in sorted(found.keys() - expected.keys()))
    raise ConfigError(f"Head weights do not match {what}: {detail.removeprefix('; ')[:300]}")


def _body_logits(params: list[NDArray[np.float32]], X: NDArray[np.float32]) -> NDArray[np.float32]:
    """Logits of standardised features, in eval mode (no dropout)."""
    logits = X @ params[0].T + params[1]
    if len(params) == 4:
        logits = np.maximum(logits, 0, out=logits) @ params[2].T + params[3]
    return logits


def _cross_entropy(
    logits: NDArray[np.float32], y: NDArray[np.intp], class_weight: NDArray[np.float32] | None
) -> tuple[float, NDArray[np.float32]]:
    """Softmax cross-entropy averaged as torch's CrossEntropyLoss(weight=...) does, and its gradient with respect to the logits."""
    rows = np.arange(len(y))
    shifted = logits - logits.max(1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(1))
    log_p = shifted[rows, y] - log_norm
    w = class_weight[y] if class_weight is not None else np.ones(len(y), dtype=np.float32)
    total = w.sum()
    loss = float(-(w * log_p).sum() / total)
    grad = np.exp(shifted - log_norm[:, None])
    grad[rows, y] -= 1
    grad *= (w / total)[:, None]
    return loss, grad
