"""Every head fits, saves and loads (`Head`, NumPy only), and matches its torch module."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import headstart
from headstart.classifier import HeadClassifier
from headstart.config import HEAD_KINDS
from headstart.errors import ConfigError
from headstart.heads import STD_FLOOR, Head, compute_logits, fit_standardization, head_shapes


def blobs(n_per_class: int = 10, n_features: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (2, n_features))
    X = np.concatenate([c + rng.normal(0, 1, (n_per_class, n_features)) for c in centres]).astype(np.float32)
    return X, np.array(["ant"] * n_per_class + ["bee"] * n_per_class)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_fit_save_load_gives_same_predictions(kind: str, tmp_path: Path) -> None:
    X, y = blobs()
    clf = HeadClassifier(head=kind, hidden=16).fit(X, y)
    head = clf.head_
    assert clf.classes_.tolist() == head.classes.tolist() == ["ant", "bee"]
    assert clf.n_features_in_ == head.n_features == 32 and head.kind == kind and head.params == clf.get_params()
    assert (clf.predict(X) == y).mean() == 1.0
    assert {k: v.shape for k, v in head.weights.items()} == head_shapes(kind, 32, 2, 16)
    assert all(v.dtype == np.float32 for v in head.weights.values())
    save_file(head.weights, str(tmp_path / "h.safetensors"))
    restored = Head.from_state(head.params, ["ant", "bee"], load_file(str(tmp_path / "h.safetensors")))
    assert np.array_equal(restored.predict_proba(X), clf.predict_proba(X))
    proba = head.predict_proba(X)
    assert proba.dtype == np.float32 and proba.shape == (20, 2)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-6)
    logits = compute_logits(head.weights, X)
    np.testing.assert_allclose(head.logits(X), logits)
    np.testing.assert_allclose(clf.decision_function(X), logits[:, 1] - logits[:, 0], rtol=1e-6)  # binary: one score, as scikit-learn's


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_clone_and_params(kind: str) -> None:
    head = HeadClassifier(head=kind, lr=0.01, random_state=7, validation_fraction=0.2)
    copy = clone(head)
    assert copy.get_params() == head.get_params()
    assert copy.validation_fraction == 0.2
    assert not hasattr(copy, "head_")
    assert head.set_params(patience=3).patience == 3
    with pytest.raises(ValueError, match="Invalid parameter 'learning_rate'"):
        head.set_params(learning_rate=1)


def test_predict_before_fit_raises() -> None:
    for call in (HeadClassifier().predict, HeadClassifier().predict_proba, HeadClassifier().decision_function):
        with pytest.raises(NotFittedError, match="not fitted yet. Call 'fit'"):
            call(np.zeros((1, 4), np.float32))


def test_early_stopping_keeps_best_validation_epoch() -> None:
    X, y = blobs(seed=1)
    Xv, yv = blobs(seed=2)
    head = HeadClassifier(head="mlp", max_epochs=200, patience=5).fit(X, y, Xv, yv)
    losses = [r["val_loss"] for r in head.history_]
    assert len(head.history_) < 200
    assert losses[head.best_epoch_ - 1] == min(losses)
    assert len(head.history_) == head.best_epoch_ + 5
    assert set(head.history_[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}


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
    with pytest.raises(ValueError, match="only one class: 'ant'"):
        HeadClassifier().fit(X, ["ant"] * len(X))
    with pytest.raises(ConfigError, match=r"validation_fraction must be in \[0, 1\)"):
        HeadClassifier(validation_fraction=1.0).fit(X, y)
    with pytest.raises(ConfigError, match="validation_fraction must be a finite number"):
        HeadClassifier(validation_fraction=float("nan")).fit(X, y)
    with pytest.raises(ValueError, match="both X_val and y_val"):
        HeadClassifier().fit(X, y, X_val=X)
    with pytest.raises(ValueError, match="do not occur in the training labels"):
        HeadClassifier(solver="adamw").fit(X, y, X, ["wasp"] * len(X))
    with pytest.raises(ConfigError, match="C must be a finite number above 0"):
        HeadClassifier(C=0.0).fit(X, y)
    with pytest.raises(ConfigError, match="'lbfgs' \\(linear head only\\)"):
        HeadClassifier(head="mlp", solver="lbfgs").fit(X, y)
    with pytest.raises(ConfigError, match=r"random_state must be an integer from 0 to 4294967295 or None, got -1"):
        HeadClassifier(random_state=-1).fit(X, y)
    with pytest.raises(ConfigError, match="class_weight must be None, 'balanced' or a dict"):
        HeadClassifier(class_weight={"ant": -1.0}).fit(X, y)
    with pytest.raises(ConfigError, match=r"class_weight names classes that are not in the labels: \['wasp'\]"):
        HeadClassifier(class_weight={"ant": 2.0, "wasp": 1.0}).fit(X, y)
    with pytest.raises(ConfigError, match=r"Training the mlp head diverged at epoch 1 \(its loss is nan\); lower lr \(now 1e\+300\)"):
        HeadClassifier(head="mlp", hidden=8, lr=1e300).fit(X, y)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        HeadClassifier().fit(np.full_like(X, np.nan), y)
    fitted = HeadClassifier(max_epochs=2).fit(X, y)
    with pytest.raises(ValueError, match="X has 3 features, but HeadClassifier is expecting 32 features"):
        fitted.predict(X[:, :3])
    with pytest.raises(ConfigError, match="X has 3 features, but the head was fitted on 32"):
        fitted.head_.predict_proba(X[:, :3])
    with pytest.raises(ConfigError, match="X contains NaN"):
        fitted.head_.logits(np.full_like(X, np.nan))


def test_numpy_parameters_are_saved_as_plain_json_numbers() -> None:
    X, y = blobs()
    weights = {"ant": np.float32(2.0), "bee": np.float64(1.0)}
    clf = HeadClassifier(head="mlp", hidden=np.int64(8), C=np.float32(0.5), class_weight=weights, random_state=np.int64(3), max_epochs=2)
    params = clf.fit(X, y).head_.params
    assert json.loads(json.dumps(params)) == params == {**clf.get_params(), "class_weight": {"ant": 2.0, "bee": 1.0}}
    assert type(params["hidden"]) is int and type(params["C"]) is float and params["class_weight"] is not clf.class_weight


def test_the_parameters_headstart_knows_are_the_estimators() -> None:
    import inspect

    from headstart.config import HEAD_PARAMETERS

    assert tuple(inspect.signature(HeadClassifier).parameters) == HEAD_PARAMETERS


def test_fit_standardization_has_a_floor_and_uses_the_sample_std() -> None:
    rng = np.random.default_rng(0)
    X = np.c_[rng.normal(5, 2, (50, 3)), np.zeros((50, 1))].astype(np.float32)
    mean, scale = fit_standardization(X)
    std = X.astype(np.float64).std(0, ddof=1)
    assert mean.dtype == scale.dtype == np.float32
    np.testing.assert_allclose(mean, X.mean(0), rtol=1e-6)
    np.testing.assert_allclose(scale, std + STD_FLOOR * std.mean() + 1e-8, rtol=1e-6)
    assert scale[3] == pytest.approx(STD_FLOOR * std.mean())  # a constant feature is not blown up


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_numpy_forward_and_gradient_match_the_torch_module(kind: str) -> None:
    import torch

    X, y = blobs(n_features=12)
    X = np.concatenate([X, X + 1]).astype(np.float32)
    head = HeadClassifier(head=kind, hidden=24, max_epochs=5).fit(X, np.r_[y, y]).head_
    module = head.to_torch()
    assert not module.training
    assert list(module.state_dict()) == list(head.weights)
    inputs = torch.from_numpy(X).requires_grad_(True)
    logits = module(inputs)
    np.testing.assert_allclose(head.logits(X), logits.detach().numpy(), atol=1e-5)
    (gradient,) = torch.autograd.grad(logits[:, 1].sum(), inputs)
    np.testing.assert_allclose(head.logit_gradient(X, 1), gradient.numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_weights_from_a_torch_module_after_fine_tuning(kind: str) -> None:
    import torch

    X, y = blobs()
    head = HeadClassifier(head=kind, hidden=8, max_epochs=3).fit(X, y).head_
    module = head.to_torch()
    with torch.no_grad():
        module[1].bias.add_(1.0)
    tuned = head.with_weights_from(module)
    assert tuned.params == head.params and tuned.classes.tolist() == ["ant", "bee"]
    np.testing.assert_allclose(tuned.weights["1.bias"], head.weights["1.bias"] + 1, rtol=1e-6)
    np.testing.assert_allclose(tuned.logits(X), module(torch.from_numpy(X)).detach().numpy(), atol=1e-5)
    other = HeadClassifier(head=kind, hidden=8, max_epochs=3).fit(X[:, :5], y).head_.to_torch()
    with pytest.raises(ConfigError, match=r"0.mean: \(5,\) instead of \(32,\)"):
        head.with_weights_from(other)


def test_from_state_accepts_torch_tensors_and_old_parameters() -> None:
    import torch

    X, y = blobs()
    head = HeadClassifier(head="mlp", hidden=8, max_epochs=3).fit(X, y).head_
    old_params = {k: v for k, v in head.params.items() if k != "validation_fraction"}  # saved before it existed
    state = {k: torch.from_numpy(v.copy()) for k, v in head.weights.items()}
    restored = Head.from_state(old_params, ["ant", "bee"], state)
    assert HeadClassifier(**restored.params).validation_fraction == 0.1  # the default, when refitted
    assert np.array_equal(restored.predict_proba(X), head.predict_proba(X))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("1.bias"), r"1.bias: missing instead of \(8,\)"),
        (lambda s: s.update({"2.weight": np.zeros(3, np.float32)}), "unexpected 2.weight"),
        (lambda s: s.update({"4.weight": np.zeros((3, 8), np.float32)}), r"4.weight: \(3, 8\) instead of \(2, 8\)"),
        (lambda s: s.update({"1.weight": np.zeros((8, 31), np.float32)}), r"1.weight: \(8, 31\) instead of \(8, 32\)"),
        (lambda s: s.update({"0.mean": np.zeros((1, 32), np.float32)}), r"0.mean: \(1, 32\) instead of \(0,\)"),
        (lambda s: s.update({"4.bias": np.array([np.nan, 0], np.float32)}), "'4.bias' contains NaN"),
    ],
)
def test_from_state_refuses_a_state_that_does_not_match(change: Callable[[dict[str, np.ndarray]], object], message: str) -> None:
    X, y = blobs()
    head = HeadClassifier(head="mlp", hidden=8, max_epochs=2).fit(X, y).head_
    state = dict(head.weights)
    change(state)
    with pytest.raises(ConfigError, match=message):
        Head.from_state(head.params, ["ant", "bee"], state)


def test_from_state_refuses_other_parameters_before_allocating() -> None:
    X, y = blobs()
    head = HeadClassifier(head="linear", max_epochs=2).fit(X, y).head_
    with pytest.raises(ConfigError, match=r"mlp head of width 65536 for 2 classes: 1.weight: \(2, 32\) instead of \(65536, 32\)"):
        Head.from_state({**head.params, "head": "mlp", "hidden": 1 << 16}, ["ant", "bee"], head.weights)
    with pytest.raises(ConfigError, match=r"for 3 classes: 1.weight: \(2, 32\) instead of \(3, 32\)"):
        Head.from_state(head.params, ["ant", "bee", "cow"], head.weights)
    with pytest.raises(ConfigError, match=r"Unknown head parameters \['momentum'\]"):
        Head.from_state({**head.params, "momentum": 0.9}, ["ant", "bee"], head.weights)
    with pytest.raises(ConfigError, match="hidden must be an integer"):
        Head.from_state({**head.params, "hidden": 1 << 40}, ["ant", "bee"], head.weights)


def test_a_model_takes_the_fitted_head_not_the_estimator(tiny_model: headstart.Model) -> None:
    clf = HeadClassifier().fit(*blobs(n_features=1280))
    with pytest.raises(ConfigError, match="A Model takes a fitted Head, got HeadClassifier; pass a fitted HeadClassifier's head_"):
        headstart.Model(tiny_model.backbones, clf)  # type: ignore[arg-type]
    assert headstart.Model(tiny_model.backbones, clf.head_).classes == ["ant", "bee"]
