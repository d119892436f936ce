"""Shrinkage toward the prior: the fitted weight, its memory bound, and the metrics it is judged by."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from shared.calibration import EPS, class_prior, fit_shrink_weight, log_loss, shrink_to_prior


def grid_search(proba: np.ndarray, y: np.ndarray, prior: np.ndarray) -> float:
    """The reference: score every weight of the 0.001 grid at once."""
    grid = np.linspace(0.0, 1.0, 1001)
    rows = np.arange(len(y))
    p_true = proba[rows, y]
    prior_true = prior[rows, y] if prior.ndim == 2 else prior[y]
    mixed = np.clip(grid[:, None] * p_true[None, :] + (1.0 - grid[:, None]) * prior_true[None, :], EPS, 1.0)
    return float(grid[int(np.argmin(-np.mean(np.log(mixed), axis=1)))])


@pytest.mark.parametrize("seed", range(40))
def test_fitted_weight_equals_the_full_grid_search(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 500))
    prior = rng.dirichlet(np.ones(3))
    y = rng.choice(3, size=n, p=prior)
    proba = rng.dirichlet(np.ones(3) * rng.uniform(0.1, 5.0), size=n)
    if seed % 2:
        proba = 0.6 * proba + 0.4 * np.eye(3)[y]  # informative: the weight moves away from 0
    if seed % 5 == 0:
        proba[0] = np.eye(3)[(y[0] + 1) % 3]  # a zero on the true class: the weight must stay below 1
    per_row = seed % 4 == 0
    priors = np.tile(prior, (n, 1)) if per_row else prior
    assert fit_shrink_weight(proba, y, priors) == grid_search(proba, y, priors)


def test_an_informative_model_keeps_weight_and_noise_gets_none():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 2000)
    prior = class_prior(y, 3)
    sharp = 0.5 * np.eye(3)[y] + 0.5 * prior
    assert fit_shrink_weight(sharp, y, prior) == 1.0
    noise = rng.dirichlet(np.ones(3) * 0.3, size=len(y))
    assert fit_shrink_weight(noise, y, prior) < 0.1
    w = fit_shrink_weight(noise, y, prior)
    assert log_loss(shrink_to_prior(noise, prior, w), y) <= log_loss(np.tile(prior, (len(y), 1)), y) + 1e-12


def test_fit_on_400k_rows_stays_under_a_memory_bound():
    """Two years of 1m candles: the old 1001 x n table needed ~3 GB per array; this must stay within a few copies
    of the input."""
    n = 400_000
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, n)
    proba = rng.dirichlet(np.ones(3), size=n)
    prior = class_prior(y, 3)
    tracemalloc.start()
    try:
        fit_shrink_weight(proba, y, prior)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    bound = 64 * 1024 * 1024  # 64 MiB: about 20 arrays of n float64, against ~3.2 GB for one grid table
    assert peak < bound, f"peak {peak / 2**20:.1f} MiB"


def test_class_prior_is_smoothed_and_sums_to_one():
    prior = class_prior(np.array([0, 0, 2]), 3)
    assert prior.tolist() == [3 / 6, 1 / 6, 2 / 6]
    assert class_prior(np.array([], dtype=int), 3).tolist() == [1 / 3] * 3
