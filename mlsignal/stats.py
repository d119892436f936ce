"""Sharpe ratios that account for luck: the probabilistic (PSR) and the deflated (DSR) Sharpe ratio.

Every Sharpe ratio here is per period (per candle), not annualised: mean / sample standard deviation of the
per-period returns. Annualise for display only; the statistics below need the per-period value and the number of
periods T.

* **Probabilistic Sharpe ratio** (Bailey & López de Prado, "The Sharpe Ratio Efficient Frontier", Journal of Risk
  15(2), 2012): the probability that the true Sharpe ratio exceeds a benchmark SR*, given an estimate SR from T
  returns with skewness g3 and (non-excess) kurtosis g4::

      PSR(SR*) = Phi( (SR - SR*) * sqrt(T - 1) / sqrt(1 - g3 * SR + (g4 - 1) / 4 * SR^2) )

  Negative skewness and fat tails widen the estimate's error, short records too, so the same SR is less convincing.
* **Deflated Sharpe ratio** (Bailey & López de Prado, "The Deflated Sharpe Ratio: Correcting for Selection Bias,
  Backtest Overfitting and Non-Normality", Journal of Portfolio Management 40(5), 2014): the PSR against the Sharpe
  ratio the best of N trials would reach by luck alone::

      SR0 = sqrt(V[SR_n]) * ((1 - gamma) * Phi^-1(1 - 1/N) + gamma * Phi^-1(1 - 1/(N e)))
      DSR = PSR(SR0)

  where V[SR_n] is the variance of the N trials' Sharpe ratios and gamma is the Euler-Mascheroni constant. With one
  trial there is no selection to correct for: SR0 = 0 and DSR = PSR(0).

When the trials' own Sharpe ratios are not known (a registry knows which configurations were tried, not how each
one's rule scored), `null_sharpe_variance(T)` gives V[SR_n] under the null hypothesis that every trial is noise: the
variance of a Sharpe ratio estimated from T returns of a zero-Sharpe strategy, 1 / (T - 1), the same sampling variance
that the PSR's denominator uses at SR = 0.

Both ratios assume independent returns; overlapping positions make per-period returns autocorrelated, which these
formulas do not correct for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "EULER_GAMMA",
    "SharpeStats",
    "deflated_sharpe_ratio",
    "expected_max_sharpe",
    "null_sharpe_variance",
    "probabilistic_sharpe_ratio",
    "sharpe_stats",
]

EULER_GAMMA = 0.5772156649015329  # Euler-Mascheroni constant
# The standard normal distribution from the standard library (its inverse is Wichura's AS 241, accurate to about
# 1e-16), so the base install needs no scipy; the tests check both functions against scipy.stats.norm.
_NORMAL = NormalDist()


def _finite(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return v


def _count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def probabilistic_sharpe_ratio(sr: float, sr_benchmark: float, n_obs: int, skew: float = 0.0,
                               kurtosis: float = 3.0) -> float:
    """P(true Sharpe ratio > sr_benchmark) given the per-period estimate `sr` from `n_obs` returns.

    `kurtosis` is the plain (Pearson) kurtosis, 3 for normal returns, not the excess kurtosis.

    Example (mlfinlab's test of the 2012 formula: SR 1.14 against 1, 250 returns, normal)::

        >>> round(probabilistic_sharpe_ratio(1.14, 1.0, 250, 0.0, 3.0), 4)
        0.9573
    """
    sr = _finite("sr", sr)
    sr_benchmark = _finite("sr_benchmark", sr_benchmark)
    n = _count("n_obs", n_obs, 2)
    skew = _finite("skew", skew)
    kurtosis = _finite("kurtosis", kurtosis)
    spread = 1.0 - skew * sr + (kurtosis - 1.0) / 4.0 * sr * sr
    if not spread > 0:
        raise ValueError(f"1 - skew * sr + (kurtosis - 1) / 4 * sr^2 must be > 0 for the PSR, got {spread!r} "
                         f"(sr {sr}, skew {skew}, kurtosis {kurtosis})")
    z = (sr - sr_benchmark) * math.sqrt(n - 1) / math.sqrt(spread)
    return _NORMAL.cdf(z)


def expected_max_sharpe(n_trials: int, sr_variance: float, sr_mean: float = 0.0) -> float:
    """The expected maximum of `n_trials` Sharpe ratios with mean `sr_mean` and variance `sr_variance` (Bailey & López
    de Prado 2014, the false strategy theorem's approximation); `sr_mean` for one trial.

    Example (the 2014 paper's numbers: 100 trials, V[SR] = 1/2 annualised, 250 periods a year)::

        >>> round(expected_max_sharpe(100, 0.5 / 250), 4)     # per period; times sqrt(250): 1.7894 annualised
        0.1132
    """
    n = _count("n_trials", n_trials, 1)
    v = _finite("sr_variance", sr_variance)
    if v < 0:
        raise ValueError(f"sr_variance must be >= 0, got {sr_variance!r}")
    mean = _finite("sr_mean", sr_mean)
    if n == 1:
        return mean
    z = ((1.0 - EULER_GAMMA) * _NORMAL.inv_cdf(1.0 - 1.0 / n)
         + EULER_GAMMA * _NORMAL.inv_cdf(1.0 - 1.0 / (n * math.e)))
    return float(mean + math.sqrt(v) * z)


def deflated_sharpe_ratio(sr: float, n_trials: int, sr_variance: float, n_obs: int, skew: float = 0.0,
                          kurtosis: float = 3.0) -> float:
    """PSR of the per-period `sr` against the expected maximum Sharpe ratio of `n_trials` trials whose Sharpe ratios
    have variance `sr_variance` (per period, like `sr`).

    Example (the 2014 paper's worked example: SR 2.5 annualised, 1,250 daily returns, 100 trials, V[SR] = 1/2
    annualised, skewness -3, kurtosis 10)::

        >>> round(deflated_sharpe_ratio(2.5 / math.sqrt(250), 100, 0.5 / 250, 1250, -3.0, 10.0), 4)
        0.9004
    """
    sr0 = expected_max_sharpe(n_trials, sr_variance)
    return probabilistic_sharpe_ratio(sr, sr0, n_obs, skew, kurtosis)


def _moments(r: np.ndarray) -> tuple[float, float]:
    """Skewness and plain kurtosis of `r` from its central moments (population, as in the papers)."""
    d = r - r.mean()
    m2 = float(np.mean(d * d))
    return float(np.mean(d**3)) / m2**1.5, float(np.mean(d**4)) / m2**2


def null_sharpe_variance(n_obs: int) -> float:
    """Variance of a per-period Sharpe ratio estimated from `n_obs` returns of a zero-Sharpe strategy: 1 / (n_obs - 1).

    The V[SR_n] of trials that are all noise, for when the trials' own Sharpe ratios are not known.
    """
    n = _count("n_obs", n_obs, 2)
    return 1.0 / (n - 1)


@dataclass(frozen=True)
class SharpeStats:
    """The Sharpe ratio of one return series with its PSR (against 0) and DSR."""

    sharpe: float  # per period
    n_obs: int
    skew: float
    kurtosis: float  # plain (Pearson) kurtosis, 3 for normal returns
    psr: float  # P(true Sharpe > 0)
    trials: int
    sr_variance: float  # V[SR_n] used for the DSR, per period
    expected_max_sharpe: float  # SR0, per period
    dsr: float  # PSR(SR0)


def sharpe_stats(returns: Iterable[float], trials: int, trial_sharpes: Sequence[float] | None = None) -> SharpeStats:
    """Sharpe ratio, PSR and DSR of per-period `returns`, deflated for `trials` trials.

    V[SR_n] is the sample variance of `trial_sharpes` (per-period Sharpe ratios of the trials, at least two) when
    given, else `null_sharpe_variance(T)`. NaN statistics for a series without spread (a strategy that never traded):
    there is no Sharpe ratio to test.
    """
    r = np.asarray(list(returns) if not isinstance(returns, np.ndarray) else returns, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"returns must be one-dimensional, got shape {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError("returns must be finite in every period")
    n_trials = _count("trials", trials, 1)
    n = int(r.size)
    if trial_sharpes is not None:
        ts = np.asarray(trial_sharpes, dtype=np.float64)
        if ts.size < 2 or not np.isfinite(ts).all():
            raise ValueError("trial_sharpes must hold at least two finite Sharpe ratios")
        variance = float(np.var(ts, ddof=1))
    else:
        variance = null_sharpe_variance(n) if n >= 2 else math.nan
    sd = float(np.std(r, ddof=1)) if n >= 2 else math.nan
    if not sd > 0:
        nan = math.nan
        return SharpeStats(nan, n, nan, nan, nan, n_trials, variance, nan, nan)
    sr = float(np.mean(r) / sd)
    skew, kurt = _moments(r)
    sr0 = expected_max_sharpe(n_trials, variance)
    return SharpeStats(
        sharpe=sr, n_obs=n, skew=skew, kurtosis=kurt,
        psr=probabilistic_sharpe_ratio(sr, 0.0, n, skew, kurt),
        trials=n_trials, sr_variance=variance, expected_max_sharpe=sr0,
        dsr=probabilistic_sharpe_ratio(sr, sr0, n, skew, kurt),
    )  # fmt: skip
