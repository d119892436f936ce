"""The "beats the prior" check of the tests fails for a model shrunk fully to the prior."""

from __future__ import annotations

import numpy as np
import pytest

from prior_checks import require_beats_prior
from shared import calibration as cal


def _noise_model(seed: int):
    """Probabilities that carry no information about the labels, calibrated like a trained model."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=4000, p=[0.25, 0.5, 0.25])
    raw = rng.dirichlet([2.0, 2.0, 2.0], size=len(y))
    prior = cal.class_prior(y[:2000], 3)
    w = cal.fit_shrink_weight(raw[:2000], y[:2000], prior)
    served = cal.shrink_to_prior(raw[2000:], prior, w)
    yt = y[2000:]
    return cal.log_loss(served, yt), cal.log_loss(np.tile(prior, (len(yt), 1)), yt), w


def test_a_model_shrunk_fully_to_the_prior_beats_nothing():
    served, prior, w = _noise_model(0)
    assert w == 0.0 and served == prior  # the calibration shrinks noise to the prior itself
    assert served <= 1.01 * prior  # a bound alone would count it as good enough ...
    with pytest.raises(AssertionError, match=r"shrink weight 0\.0"):  # ... the weight check does not
        require_beats_prior(served, prior, w, bound=1.01)
    with pytest.raises(AssertionError, match="shrink weight"):
        require_beats_prior(served, prior, w)


def test_a_weighted_model_must_still_be_below_the_bound():
    with pytest.raises(AssertionError, match=r"1\.0100x the prior's"):
        require_beats_prior(1.01, 1.0, 0.5)
    with pytest.raises(AssertionError, match=r"not below 1\.005x"):
        require_beats_prior(1.006, 1.0, 0.5, bound=1.005)
    require_beats_prior(0.95, 1.0, 0.5)
    require_beats_prior(1.004, 1.0, 0.5, bound=1.005)
