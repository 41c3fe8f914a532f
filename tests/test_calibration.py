"""Temperature scaling, the expected calibration error and reliability bins, on synthetic and hand-computable cases."""

from __future__ import annotations

import numpy as np
import pytest

from headstart.calibration import (
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    softmax,
)
from headstart.errors import ConfigError


def _synthetic(temperature: float, n: int = 4000, n_classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / temperature): the true temperature is `temperature`."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, n_classes)).astype(np.float32)
    p = softmax(logits, temperature).astype(np.float64)
    y = np.array([rng.choice(n_classes, p=row / row.sum()) for row in p])
    return logits, y


@pytest.mark.parametrize("true_t", [0.5, 2.0, 4.0])
def test_fit_temperature_recovers_a_known_temperature_and_lowers_ece(true_t: float) -> None:
    logits, y = _synthetic(true_t)
    t = fit_temperature(logits, y)
    assert t == pytest.approx(true_t, rel=0.1)
    assert negative_log_likelihood(logits, y, t) <= negative_log_likelihood(logits, y, 1.0)
    before, after = expected_calibration_error(softmax(logits), y), expected_calibration_error(softmax(logits, t), y)
    assert after < before and after < 0.03


def test_ece_by_hand() -> None:
    # two rows at confidence 0.9 (one right, one wrong) and one at 0.6 (right):
    # bin (13/15, 14/15]: |0.5 - 0.9| * 2/3; bin (8/15, 9/15]: |1 - 0.6| * 1/3
    proba = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4]])
    y = np.array([0, 0, 0])
    assert expected_calibration_error(proba, y) == pytest.approx(0.4 * 2 / 3 + 0.4 / 3)
    bins = reliability_bins(proba, y)
    assert sum(bins.counts) == 3 and bins.counts[13] == 2 and bins.counts[8] == 1
    assert bins.accuracy[13] == 0.5 and bins.confidence[13] == pytest.approx(0.9)
    # perfectly confident and right: no error; confident and always wrong: error 1
    assert expected_calibration_error(np.array([[1.0, 0.0]] * 4), np.zeros(4, int)) == 0
    assert expected_calibration_error(np.array([[1.0, 0.0]] * 4), np.ones(4, int)) == 1
    assert expected_calibration_error(np.array([[0.5, 0.5]]), np.array([0]), n_bins=2) == pytest.approx(0.5)  # 0.5 falls in the first bin


def test_bad_input_is_refused() -> None:
    with pytest.raises(ConfigError, match="shape"):
        fit_temperature(np.zeros((3, 2)), np.zeros(2, int))
    with pytest.raises(ConfigError, match="NaN"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ConfigError, match="class indices"):
        expected_calibration_error(np.array([[0.5, 0.5]]), np.array([2]))
