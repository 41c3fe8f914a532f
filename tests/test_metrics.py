"""Metrics on a hand-checked example."""

from __future__ import annotations

import numpy as np
import pytest

from headstart.metrics import evaluate_probabilities


def test_scores_from_a_known_confusion_matrix() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    proba = np.eye(3, dtype=np.float32)[[0, 0, 1, 1, 2, 2]] * 0.8 + 0.2 / 3
    ev = evaluate_probabilities(y_true, proba, ["a", "b", "c"])
    assert ev.confusion == ((2, 1, 0), (0, 1, 1), (0, 0, 1))
    assert ev.accuracy == pytest.approx(4 / 6)
    assert ev.recall == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert ev.precision == pytest.approx([1.0, 1 / 2, 1 / 2])
    assert ev.f1[0] == pytest.approx(0.8)
    p_true = np.array([0.8667, 0.8667, 0.0667, 0.8667, 0.0667, 0.8667])
    assert ev.log_loss == pytest.approx(-np.log(p_true).mean(), abs=1e-3)
    assert ev.to_dict()["per_class"]["c"]["support"] == 1


def test_class_never_predicted_gets_zero_precision_not_nan() -> None:
    ev = evaluate_probabilities(np.array([0, 1]), np.array([[0.9, 0.1], [0.6, 0.4]], np.float32), ["x", "y"])
    assert ev.precision == [0.5, 0.0] and ev.f1[1] == 0.0
