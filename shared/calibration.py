"""Shrinkage toward the class prior, and the probability metrics used to judge it.

Crypto returns are close to random, so a forest's raw probabilities are often over-confident: worse than knowing
only the class prior. Mixing them with the prior, p = w * p_model + (1 - w) * prior, with w fitted by log loss on a
purged validation slice, is the simplest correct fix; w = 0 means the model adds nothing over the prior.
Both training and inference apply it through `shrink_to_prior`, so served and evaluated probabilities are the same.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-15


def shrink_to_prior(proba: np.ndarray, prior: np.ndarray, weight: float) -> np.ndarray:
    """Mix model probabilities (n, k) with the prior (k,) and renormalise rows to sum to 1."""
    p = weight * np.asarray(proba, dtype=np.float64) + (1.0 - weight) * np.asarray(prior, dtype=np.float64)
    return p / p.sum(axis=1, keepdims=True)


def log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log likelihood of the true classes (natural log), clipped at EPS."""
    p = np.clip(proba[np.arange(len(y)), y], EPS, 1.0)
    return float(-np.mean(np.log(p)))


def brier(proba: np.ndarray, y: np.ndarray) -> float:
    """Multiclass Brier score: mean over rows of the squared distance to the one-hot truth (0 is perfect, 2 worst)."""
    onehot = np.zeros_like(proba, dtype=np.float64)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((proba - onehot) ** 2, axis=1)))


def balanced_accuracy(proba: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """Mean per-class recall of the arg-max prediction, over classes present in y."""
    pred = np.argmax(proba, axis=1)
    recalls = [np.mean(pred[y == k] == k) for k in range(n_classes) if np.any(y == k)]
    return float(np.mean(recalls)) if recalls else float("nan")


def class_prior(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Class frequencies with add-one smoothing, so no class gets probability 0."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64) + 1.0
    return counts / counts.sum()


GRID_STEPS = 1000  # the fitted weight is a multiple of 1 / GRID_STEPS


def shrink_log_loss(weight: float, p_true: np.ndarray, prior_true: np.ndarray) -> float:
    """Log loss of the mixture at one weight, from the true-class probabilities of the model and the prior."""
    mixed = np.clip(weight * p_true + (1.0 - weight) * prior_true, EPS, 1.0)
    return float(-np.mean(np.log(mixed)))


def fit_shrink_weight(proba: np.ndarray, y: np.ndarray, prior: np.ndarray) -> float:
    """The weight in [0, 1], on a grid of 0.001 steps, that minimises log loss on (proba, y); deterministic.

    prior is one class distribution (k,) for every row, or one per row (n, k) when rows come from slices whose
    models were fitted with different priors.

    The loss is convex in the weight, so its minimiser is found by bisection on the derivative, and only the grid
    points next to it are scored: memory stays O(n) (a 1001 x n table of every grid point costs gigabytes on years
    of 1m candles), and the answer is the grid search's.
    """
    rows = np.arange(len(y))
    p_true = np.asarray(proba, dtype=np.float64)[rows, y]
    prior = np.asarray(prior, dtype=np.float64)
    prior_true = prior[rows, y] if prior.ndim == 2 else prior[y]
    # Rows sum to 1 before and after mixing, so the true-class probability is the mixture of the two.
    diff = p_true - prior_true

    def slope(w: float) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(-np.mean(diff / (w * p_true + (1.0 - w) * prior_true)))

    lo, hi = 0.0, 1.0
    if slope(0.0) >= 0.0:
        hi = 0.0
    else:
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if slope(mid) < 0.0:
                lo = mid
            else:
                hi = mid
    grid = np.linspace(0.0, 1.0, GRID_STEPS + 1)
    centre = round(hi * GRID_STEPS)
    candidates = grid[max(0, centre - 2): centre + 3]
    losses = [shrink_log_loss(float(w), p_true, prior_true) for w in candidates]
    return float(candidates[int(np.argmin(losses))])  # the first minimum, as a grid search from 0 upward finds it
