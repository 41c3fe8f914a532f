"""Cross-validation of heads: stratified folds, the chosen C, out-of-fold logits and the refit."""

from __future__ import annotations

import numpy as np
import pytest

from headstart.calibration import negative_log_likelihood, softmax
from headstart.classifier import HeadClassifier
from headstart.errors import ConfigError
from headstart.selection import C_GRID, cross_validate, refit
from test_classifier import gaussians


def test_linear_cross_validation_chooses_the_c_with_the_lowest_out_of_fold_loss() -> None:
    X, y = gaussians(25, n_classes=3, n_features=40, spread=0.3, seed=6)
    cv = cross_validate(HeadClassifier(), X, y, n_folds=5, seed=0)
    assert set(cv.grid) == set(C_GRID) and cv.params == {"C": min(cv.grid, key=cv.grid.get)}  # type: ignore[arg-type]
    assert np.bincount(cv.folds).tolist() == [15] * 5  # stratified: 5 of each class per fold
    assert all(np.bincount(cv.y[cv.folds == k]).tolist() == [5, 5, 5] for k in range(5))
    assert cv.grid[cv.params["C"]] == pytest.approx(negative_log_likelihood(cv.logits, cv.y), rel=1e-6) == cv.log_loss
    # each row's logits come from a head fitted without it: refit that fold's head and compare
    k = 2
    fold_head = HeadClassifier(C=cv.params["C"]).fit(X[cv.folds != k], y[cv.folds != k])
    np.testing.assert_allclose(cv.logits[cv.folds == k], fold_head.head_.logits(X[cv.folds == k]), atol=1e-5)
    final = refit(HeadClassifier(), cv, X, y)
    assert cv.params["C"] == final.C and final.n_features_in_ == 40
    assert np.mean(cv.fold_accuracy) == pytest.approx(float((cv.logits.argmax(1) == cv.y).mean()))


def test_early_stopped_heads_refit_for_the_median_best_epoch() -> None:
    X, y = gaussians(20, n_classes=2, n_features=30, spread=0.2, seed=7)
    template = HeadClassifier(head="mlp", hidden=16, max_epochs=40, patience=3)
    cv = cross_validate(template, X, y, n_folds=4)
    assert cv.grid == {} and cv.params["validation_fraction"] == 0.0 and 1 <= cv.params["max_epochs"] <= 40
    final = refit(template, cv, X, y)
    assert len(final.history_) == cv.params["max_epochs"] and final.hidden == 16


def test_the_folds_are_seeded_and_shrink_to_the_smallest_class() -> None:
    X, y = gaussians(6, n_classes=2, n_features=5, seed=8)
    X, y = X[:9], y[:9]  # 6 and 3 rows
    a, b = (cross_validate(HeadClassifier(), X, y, n_folds=5, seed=1) for _ in range(2))
    assert a.n_folds == 3 and np.array_equal(a.folds, b.folds)
    with pytest.raises(ConfigError, match="2 images per class"):
        cross_validate(HeadClassifier(), X[:7], y[:7])  # one row of the second class
    np.testing.assert_allclose(softmax(np.array([[0.0, np.log(3.0)]], dtype=np.float32)), [[0.25, 0.75]], rtol=1e-6)
