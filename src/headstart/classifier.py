"""HeadClassifier: the scikit-learn estimator that fits a head on cached features (NumPy, or scikit-learn's L-BFGS)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from headstart.config import check_head_params, uses_lbfgs
from headstart.errors import ConfigError
from headstart.heads import Head, HeadState, fit_standardization, init_head_state

_BETAS = (0.9, 0.999)
_EPS = 1e-8


class HeadClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]  # scikit-learn has no type hints
    """A linear or MLP head fitted on pooled features standardised with the training statistics.

    A scikit-learn estimator: it clones, cross-validates and grid-searches as any other
    (`sklearn.utils.estimator_checks` passes), and pickles; headstart itself saves the
    fitted `head_` in a bundle, as safetensors and JSON. The ensemble's head is this one,
    on its members' features concatenated.

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
        max_epochs: upper bound on passes over the training features (L-BFGS: 10 iterations each).
        patience: epochs without a lower validation loss before stopping.
        class_weight: None, "balanced" (weights n_samples / (n_classes * count)), or a dict of class label: weight.
        random_state: seed (an int) of the validation hold-out, initialisation, shuffling and dropout;
            None draws a fresh one at every `fit`.
        validation_fraction: share of the training rows, in [0, 1), held out (stratified, at
            least one row per class) for early stopping when `fit` gets no validation data.
            0, or a class with a single row, means no hold-out: all `max_epochs` run and the
            epoch with the lowest training loss is kept.

    Attributes:
        classes_: the class labels, sorted; column order of `predict_proba`.
        n_features_in_: the number of features `fit` saw.
        head_: the fitted `Head`: what a `Model` predicts with and saves.
        history_: one dict per epoch: epoch, loss, accuracy, and val_loss / val_accuracy with validation data (empty for L-BFGS).
        best_epoch_: the epoch whose weights were kept (1-based; 0 for L-BFGS).
        n_iter_: the epochs run (L-BFGS: its iterations); below `max_epochs` when early stopping stopped it.

    Examples:
        >>> import numpy as np
        >>> X = np.r_[np.zeros((5, 4)), np.ones((5, 4))].astype("float32")
        >>> y = ["a"] * 5 + ["b"] * 5
        >>> HeadClassifier().fit(X, y).predict(X[[0, 9]]).tolist()
        ['a', 'b']
        >>> from sklearn.model_selection import cross_val_score
        >>> float(cross_val_score(HeadClassifier(head="mlp", hidden=16), X, y, cv=5).mean())
        1.0
    """

    classes_: NDArray[Any]
    n_features_in_: int
    head_: Head
    history_: list[dict[str, float]]
    best_epoch_: int
    n_iter_: int

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
        class_weight: Literal["balanced"] | dict[Any, float] | None = None,
        random_state: int | None = 0,
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
        self.random_state = random_state
        self.validation_fraction = validation_fraction

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
            ConfigError: a parameter is out of range.
            ValueError: the arrays are not finite features and class labels that fit together, or hold a single class.
        """
        params = _plain(self.get_params())
        check_head_params(params)
        features, labels = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(labels)
        classes, targets = np.unique(labels, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                f"HeadClassifier needs samples of at least 2 classes; the data contains only one class: {classes[0].item()!r}."
            )
        if (X_val is None) != (y_val is None):
            raise ValueError("Pass both X_val and y_val, or neither.")
        class_weight = None
        if self.class_weight is not None:
            if isinstance(self.class_weight, dict) and not set(self.class_weight) <= set(classes.tolist()):
                unknown = sorted(map(str, set(self.class_weight) - set(classes.tolist())))
                raise ConfigError(
                    f"class_weight names classes that are not in the labels: {unknown[:3]}; the labels' classes are {classes.tolist()[:5]}."
                )
            class_weight = compute_class_weight(self.class_weight, classes=classes, y=labels).astype(np.float32)
        self.classes_ = classes
        if uses_lbfgs(params):  # fitted to convergence: validation data is not needed
            weights, self.n_iter_ = self._fit_lbfgs(features, targets, class_weight)
            self.head_, self.history_, self.best_epoch_ = Head(params, classes, weights), [], 0
            return self
        # independent streams: the hold-out, the initial weights, the batch order and dropout do not shift one another
        split_rng, init_rng, shuffle_rng, dropout_rng = np.random.default_rng(self.random_state).spawn(4)
        val: tuple[NDArray[np.float32], NDArray[np.intp]] | None = None
        if X_val is None:
            held_out = _stratified_hold_out(targets, len(classes), self.validation_fraction, split_rng)
            if held_out.any():
                val = (features[held_out], targets[held_out])
                features, targets = features[~held_out], targets[~held_out]
        elif len(np.asarray(y_val)):
            val_features, val_labels = validate_data(self, X_val, y_val, dtype=np.float32, reset=False)
            unknown = sorted(set(val_labels.tolist()) - set(classes.tolist()))
            if unknown:
                raise ValueError(f"Validation labels {unknown[:3]} do not occur in the training labels.")
            val = (val_features, np.searchsorted(classes, val_labels))
        rngs = (init_rng, shuffle_rng, dropout_rng)
        weights, self.history_, self.best_epoch_ = self._train(features, targets, val, len(classes), class_weight, rngs)
        self.head_, self.n_iter_ = Head(params, classes, weights), len(self.history_)
        return self

    def uses_lbfgs(self) -> bool:
        """Whether `fit` runs L-BFGS (the linear head with solver "auto" or "lbfgs"), whose strength is `C`."""
        return uses_lbfgs(self.get_params())

    def decision_function(self, X: ArrayLike) -> NDArray[np.float32]:
        """Logits, shape (n_samples, n_classes), columns in `classes_` order; for two classes, as scikit-learn's
        binary classifiers, the second class's logit minus the first's, shape (n_samples,)."""
        features = self._validated(X)
        logits = self.head_.logits(features)
        return logits[:, 1] - logits[:, 0] if len(self.classes_) == 2 else logits

    def predict_proba(self, X: ArrayLike) -> NDArray[np.float32]:
        """Class probabilities, float32 of shape (n_samples, n_classes), columns in `classes_` order."""
        features = self._validated(X)
        return self.head_.predict_proba(features)

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        """The most probable class label for each row of X."""
        features = self._validated(X)
        return self.classes_[self.head_.logits(features).argmax(1)]  # type: ignore[no-any-return]

    def _validated(self, X: ArrayLike) -> NDArray[np.float32]:
        check_is_fitted(self)
        features: NDArray[np.float32] = validate_data(self, X, dtype=np.float32, reset=False)
        return features

    def _fit_lbfgs(self, X: NDArray[np.float32], y: NDArray[np.intp], class_weight: NDArray[np.float32] | None) -> tuple[HeadState, int]:
        """Softmax regression on standardised features by scikit-learn's L-BFGS, as a linear head's state; and its iterations."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        mean, scale = fit_standardization(X)
        weights = dict(enumerate(class_weight.tolist())) if class_weight is not None else None
        lr = LogisticRegression(C=self.C, class_weight=weights, max_iter=self.max_epochs * 10, tol=1e-4)
        # Stopping at max_iter is a result, not a failure: the best weights found so far. On CI's machine the invalid-value
        # flag came up inside this fit on finite float32 inputs (not reproduced here; BLAS kernels have done so, as in
        # numpy/numpy#24067): the fitted weights are checked instead.
        with warnings.catch_warnings(), np.errstate(invalid="ignore"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            lr.fit((X - mean) / scale, y)
        weight, bias = lr.coef_.astype(np.float32), lr.intercept_.astype(np.float32)
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise ConfigError(f"The linear head's weights are not finite after fitting (C={self.C}); try a smaller C.")
        if len(lr.classes_) == 2:  # one logit for the second class: as two, softmax gives the same probabilities
            weight, bias = np.r_[-weight, weight] / 2, np.r_[-bias, bias] / 2
        return {"0.mean": mean, "0.scale": scale, "1.weight": weight, "1.bias": bias}, int(lr.n_iter_.max())

    @np.errstate(over="ignore", invalid="ignore")  # a diverging run shows as a non-finite loss, refused in one line
    def _train(
        self,
        X: NDArray[np.float32],
        y: NDArray[np.intp],
        val: tuple[NDArray[np.float32], NDArray[np.intp]] | None,
        n_classes: int,
        class_weight: NDArray[np.float32] | None,
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
            if not math.isfinite(monitored):
                raise ConfigError(
                    f"Training the {self.head} head diverged at epoch {epoch} (its loss is {monitored}); "
                    f"lower lr (now {self.lr:g}) or weight_decay (now {self.weight_decay:g})."
                )
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


def _plain(value: Any) -> Any:
    """`value` with NumPy scalars as Python numbers, in fresh dicts: parameters as `bundle.json` stores them."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value.item() if isinstance(value, np.generic) else value


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
