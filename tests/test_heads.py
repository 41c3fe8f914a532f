"""Every head honours the estimator contract: fit, predict, clone, save and load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from sklearn.base import clone

from headstart.classifier import HeadClassifier
from headstart.errors import ConfigError, NotFittedError
from headstart.heads import HEAD_KINDS


def blobs(n_per_class: int = 10, n_features: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (2, n_features))
    X = np.concatenate([c + rng.normal(0, 1, (n_per_class, n_features)) for c in centres]).astype(np.float32)
    return X, np.array(["ant"] * n_per_class + ["bee"] * n_per_class)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_fit_save_load_gives_same_predictions(kind: str, tmp_path: Path) -> None:
    X, y = blobs()
    head = HeadClassifier(head=kind).fit(X, y)
    assert head.classes_.tolist() == ["ant", "bee"]
    assert (head.predict(X) == y).mean() == 1.0
    save_file(head.head_.state_dict(), tmp_path / "h.safetensors")
    restored = HeadClassifier.from_state(head.get_params(), ["ant", "bee"], load_file(tmp_path / "h.safetensors"))
    assert np.array_equal(restored.predict_proba(X), head.predict_proba(X))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_clone_and_params(kind: str) -> None:
    head = HeadClassifier(head=kind, lr=0.01, seed=7)
    copy = clone(head)
    assert copy.get_params() == head.get_params()
    assert not hasattr(copy, "head_")
    assert head.set_params(patience=3).patience == 3
    with pytest.raises(ConfigError, match="no parameter 'learning_rate'"):
        head.set_params(learning_rate=1)


def test_predict_before_fit_raises() -> None:
    with pytest.raises(NotFittedError, match="Call fit"):
        HeadClassifier().predict(np.zeros((1, 4), np.float32))


def test_early_stopping_keeps_best_validation_epoch() -> None:
    X, y = blobs(seed=1)
    Xv, yv = blobs(seed=2)
    head = HeadClassifier(head="mlp", max_epochs=200, patience=5).fit(X, y, Xv, yv)
    losses = [r["val_loss"] for r in head.history_]
    assert len(head.history_) < 200
    assert losses[head.best_epoch_ - 1] == min(losses)
    assert len(head.history_) == head.best_epoch_ + 5


def test_balanced_class_weight_favours_the_rare_class() -> None:
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (90, 8)), rng.normal(0.7, 1, (10, 8))]).astype(np.float32)
    y = np.array(["common"] * 90 + ["rare"] * 10)
    plain = HeadClassifier(max_epochs=60).fit(X, y)
    balanced = HeadClassifier(max_epochs=60, class_weight="balanced").fit(X, y)
    assert (balanced.predict(X) == "rare").sum() > (plain.predict(X) == "rare").sum()


def test_invalid_parameters_are_refused_at_fit() -> None:
    X, y = blobs()
    with pytest.raises(ConfigError, match="Unknown head 'svm'"):
        HeadClassifier(head="svm").fit(X, y)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least two classes"):
        HeadClassifier().fit(X, ["ant"] * len(X))
