"""HeadClassifier's training: early stopping on a held-out share, accuracy, gradients, and no torch on import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.base import clone

from headstart.classifier import HeadClassifier
from headstart.config import HEAD_KINDS


def gaussians(
    n_per_class: int, n_classes: int = 4, n_features: int = 64, spread: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Classes around random centres, `spread` times the noise apart on average."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread / np.sqrt(n_features), (n_classes, n_features)) * np.sqrt(n_features)
    X = np.concatenate([c + rng.normal(0, 1, (n_per_class, n_features)) for c in centres]).astype(np.float32)
    y = np.repeat([f"class {i}" for i in range(n_classes)], n_per_class)
    return X, y


def test_importing_the_classifier_does_not_import_torch() -> None:
    code = "import headstart.classifier, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_accuracy_on_a_separable_problem(kind: str) -> None:
    X, y = gaussians(200, spread=0.4)  # about 4 noise sd between centres
    head = HeadClassifier(head=kind, hidden=64).fit(X[::2], y[::2])
    assert (head.predict(X[1::2]) == y[1::2]).mean() >= 0.93


def test_clone_keeps_early_stopping_on_a_held_out_share() -> None:
    X, y = gaussians(30, n_classes=3, n_features=200, spread=0.1, seed=3)  # few overlapping rows, many features: overfits fast
    template = HeadClassifier(head="mlp", hidden=64, max_epochs=300, patience=5, validation_fraction=0.2)
    head = clone(template).fit(X, y)
    assert head.validation_fraction == 0.2
    assert head.best_epoch_ < 300 and len(head.history_) == head.best_epoch_ + 5
    losses = [r["val_loss"] for r in head.history_]
    assert losses[head.best_epoch_ - 1] == min(losses)
    assert head.history_[0]["val_accuracy"] in {i / 18 for i in range(19)}  # 6 of each class's 30 rows held out


@pytest.mark.parametrize("params", [{"validation_fraction": 0.0}, {}])
def test_without_a_hold_out_all_epochs_run_and_the_lowest_training_loss_is_kept(params: dict[str, float]) -> None:
    X, y = gaussians(5, n_classes=2, n_features=8, seed=1)
    if not params:  # a class with a single row: nothing can be held out
        X, y = X[:6], y[:6]
    head = HeadClassifier(solver="adamw", max_epochs=12, patience=2, **params).fit(X, y)  # type: ignore[arg-type]
    assert len(head.history_) == 12 and "val_loss" not in head.history_[0]
    losses = [r["loss"] for r in head.history_]
    assert losses[head.best_epoch_ - 1] == min(losses)


def test_empty_explicit_validation_means_no_hold_out() -> None:
    X, y = gaussians(10, n_classes=2, n_features=8)
    head = HeadClassifier(solver="adamw", max_epochs=4).fit(X, y, X[:0], y[:0])
    assert len(head.history_) == 4 and "val_loss" not in head.history_[0]


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_the_same_random_state_gives_the_same_head(kind: str) -> None:
    X, y = gaussians(20, n_features=16)
    a, b, c = (HeadClassifier(head=kind, solver="adamw", hidden=16, max_epochs=5, random_state=s).fit(X, y) for s in (3, 3, 4))
    assert a.history_ == b.history_
    assert all(np.array_equal(a.head_.weights[k], b.head_.weights[k]) for k in a.head_.weights)
    assert not np.array_equal(a.head_.weights["1.weight"], c.head_.weights["1.weight"])


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_logit_gradient_matches_finite_differences(kind: str) -> None:
    X, y = gaussians(20, n_classes=3, n_features=6, seed=2)
    head = HeadClassifier(head=kind, hidden=16, max_epochs=20).fit(X, y).head_
    x = X[:3].astype(np.float64)
    gradient = head.logit_gradient(x, 2)
    assert gradient.shape == x.shape and gradient.dtype == np.float32
    step = 1e-2
    for j in range(x.shape[1]):
        shift = np.zeros_like(x)
        shift[:, j] = step
        numeric = (head.logits(x + shift)[:, 2] - head.logits(x - shift)[:, 2]) / (2 * step)
        np.testing.assert_allclose(gradient[:, j], numeric, rtol=1e-2, atol=2e-3)


def test_the_lbfgs_linear_head_matches_scikit_learns_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    from headstart.heads import fit_standardization

    X, y = gaussians(30, n_classes=3, n_features=10, spread=0.5, seed=4)
    head = HeadClassifier(C=0.5).fit(X, y)
    mean, scale = fit_standardization(X)
    reference = LogisticRegression(C=0.5, max_iter=1000, tol=1e-4).fit((X - mean) / scale, y)
    np.testing.assert_allclose(head.predict_proba(X), reference.predict_proba((X - mean) / scale), atol=1e-4)
    assert head.history_ == [] and head.best_epoch_ == 0 and 0 < head.n_iter_ <= reference.n_iter_[0] + 5
    weaker = HeadClassifier(C=0.001).fit(X, y)
    assert np.abs(weaker.head_.weights["1.weight"]).sum() < np.abs(head.head_.weights["1.weight"]).sum()  # C is the regularisation


def test_a_two_class_lbfgs_head_gives_two_logits_with_scikit_learns_probabilities() -> None:
    from sklearn.linear_model import LogisticRegression

    X, y = gaussians(20, n_classes=2, n_features=6, seed=5)
    head = HeadClassifier(C=1.0).fit(X, y)
    weights = head.head_.weights
    assert weights["1.weight"].shape == (2, 6)
    z = (X - weights["0.mean"]) / weights["0.scale"]
    np.testing.assert_allclose(head.predict_proba(X), LogisticRegression(C=1.0, max_iter=1000).fit(z, y).predict_proba(z), atol=1e-4)


def test_a_spurious_invalid_value_flag_inside_lbfgs_is_not_a_failure_but_non_finite_weights_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """Some OpenBLAS kernels set the invalid-value flag on finite float32 products (numpy/numpy#24067); CI met one."""
    from sklearn.linear_model import LogisticRegression

    from headstart.errors import ConfigError

    fit = LogisticRegression.fit

    def fit_raising_the_flag(self: LogisticRegression, X: np.ndarray, y: np.ndarray) -> LogisticRegression:
        np.float32(np.inf) - np.float32(np.inf)  # sets the flag as the BLAS kernel did: a RuntimeWarning unless silenced
        return fit(self, X, y)

    X, y = gaussians(6, n_classes=2, n_features=5, seed=8)
    monkeypatch.setattr(LogisticRegression, "fit", fit_raising_the_flag)
    assert HeadClassifier().fit(X, y).score(X, y) > 0.5  # pytest turns any warning into an error

    def fit_diverging(self: LogisticRegression, X: np.ndarray, y: np.ndarray) -> LogisticRegression:
        fit(self, X, y).coef_[:] = np.nan
        return self

    monkeypatch.setattr(LogisticRegression, "fit", fit_diverging)
    with pytest.raises(ConfigError, match="not finite"):
        HeadClassifier().fit(X, y)
