"""The live test between a challenger and the model it would replace: promote, reject, or keep watching.

A SHADOW model is served beside its market's SERVING model and both are scored on every candle whose label has
realised. Per paired candle, d = baseline loss - challenger loss (positive: the challenger is better). When the two
label specs differ, their losses are not on one scale (another horizon or threshold is another question), so each
model's gain over its own class prior is compared instead. The same test runs between the serving model (baseline) and
its class prior (challenger): d = loss - prior_loss.

Why sequential. The registry looks after every journal flush: at unplanned times, possibly one new pair per look. A
fixed-sample z-test read at every look promotes a shadow that is no better far more often than its nominal level (the
simulation in tests/unit/test_sequential_test.py measures it), and alpha spending needs the looks, or at least the
information at each look, planned in advance. An always-valid test needs neither: its guarantee holds over all sample
sizes at once, so it may be read as often and whenever one likes.

The test: a one-sided normal-mixture sequential probability ratio test (mSPRT; Robbins 1970; Johari, Pekelis and
Walsh 2017, "Always valid inference") on S_n = d_1 + ... + d_n, in units of the long-run standard deviation sigma of d
(overlapping labels make neighbouring d correlated; counted as independent they would pass for more evidence than
they are). With S_n / sigma close to a Gaussian random walk, the likelihood ratio of "mean theta" against "mean 0",
mixed over a half-normal prior on theta > 0 with variance tau^2,

    Lambda_n = 2 / sqrt(1 + x) * exp(r z^2 / 2) * Phi(z sqrt(r)),    z = S_n / (sigma sqrt(n)),
    x = n tau^2,  r = x / (1 + x),

is a non-negative supermartingale with expectation at most 1 whenever the true mean is <= 0 (the challenger is no
better). Ville's inequality then gives P(Lambda_n >= 1 / alpha for some n) <= alpha: over every n, hence over any
looks. Lambda_n increases with z, so the test is a boundary on the usual z statistic: promote when z >= b_n, where
Lambda_n(b_n) = 1 / alpha. Reject is the mirror image, z <= -b_n (the same guarantee against rejecting a challenger that
is no worse), or max_scored pairs without either. tau^2 makes b_n smallest at n* = sqrt(min_scored * max_scored),
1,581 pairs with the defaults, where it is 2.77 (a single fixed-sample look: 1.645); it is flat around there: 2.91 at
500 pairs, 2.78 at 1,000, 2.79 at 3,000, 2.84 at 5,000.

sigma is not known; two things keep its estimate from eating the guarantee, both measured by the simulation in
bench.shadow_power (24-candle labels, a look every 1 to 50 pairs from 500 to 5,000):

- the variance: Newey-West at lag horizon_bars - 1 leaves out a third of the long-run variance of labels whose every
  overlap counts, and with it the test promotes a no-better shadow 8 to 9 % of the time at alpha 5 %.
  long_run_variance takes the larger of Newey-West and Hansen-Hodrick (unit weights up to the same lag: unbiased when
  the dependence ends there, as that of h-candle labels does at h - 1).
- the boundary: the estimate is noisy while few labels have realised (500 pairs of 24-candle labels are about 20
  independent labels), so z is compared with the mixture boundary moved to the same tail of a Student t with n /
  (2 lag + 1) degrees of freedom: 3.72 at 500 pairs, 3.10 at 1,000, 2.95 at 1,581, 2.89 at 3,000, 2.90 at 5,000 for
  lag 23; within 0.02 of the mixture boundary for lag 0. Below MIN_DF degrees of freedom nothing is decided.

Together: 2 to 3 % false promotions at alpha 5 % with full, half or no overlap. The decision uses the first
max_scored pairs only, so once made it is reproducible.

numpy and the standard library only: inference reports the test too, and its install has no scipy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PROMOTE = "promote"
REJECT = "reject"
UNDECIDED = "undecided"

# A long-run variance below this (a standard deviation of 1e-9 nats) is rounding: two models that agree on every
# candle. Flooring it keeps the statistic finite, and such a pair never crosses a boundary.
VARIANCE_FLOOR = 1e-18

# Fewer degrees of freedom than this (about ten independent labels' worth of pairs): no boundary, no decision. The
# long-run variance estimate is too poor to stand on, and it is where the t expansion in `boundary` stops being exact
# to 0.2 %.
MIN_DF = 5.0

_ERFC = np.frompyfunc(math.erfc, 1, 1)


@dataclass(frozen=True)
class Comparison:
    """One look of the live test; field names follow the LiveComparison message (difference: baseline - model)."""

    paired: int
    mean_log_loss_difference: float
    standard_error: float  # sqrt(long-run variance / paired)
    statistic: float  # mean / standard_error
    boundary: float  # promote at statistic >= boundary, reject at <= -boundary
    decision: str  # PROMOTE | REJECT | UNDECIDED
    reason: str  # one line with the numbers, for stage_reason


def _sorted_unique(times: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
    t = np.asarray(times, dtype=np.int64).ravel()
    vs = [np.asarray(v, dtype=np.float64).ravel() for v in values]
    if any(len(v) != len(t) for v in vs):
        raise ValueError(f"times and values differ in length: {len(t)} vs {[len(v) for v in vs]}")
    order = np.argsort(t, kind="stable")
    t = t[order]
    if len(t) > 1 and np.any(t[1:] == t[:-1]):
        raise ValueError("a candle open time appears twice: one model has at most one score per candle")
    return (t, *(v[order] for v in vs))


def paired_differences(
    base_times: np.ndarray,
    base_loss: np.ndarray,
    base_prior_loss: np.ndarray,
    model_times: np.ndarray,
    model_loss: np.ndarray,
    model_prior_loss: np.ndarray,
    same_label: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-candle differences on the candles both models have scored (inner join on open time, ms), oldest first.

    Same label spec: d = base_loss - model_loss. Different specs: d = (base_loss - base_prior_loss) -
    (model_loss - model_prior_loss), each model's gain over its own prior, the only scale the two share. Positive d:
    the model (the challenger) is better."""
    bt, bl, bp = _sorted_unique(base_times, base_loss, base_prior_loss)
    mt, ml, mp = _sorted_unique(model_times, model_loss, model_prior_loss)
    times, bi, mi = np.intersect1d(bt, mt, assume_unique=True, return_indices=True)
    d = bl[bi] - ml[mi] if same_label else (bl[bi] - bp[bi]) - (ml[mi] - mp[mi])
    return times, d


def differences_against_prior(
    times: np.ndarray, loss: np.ndarray, prior_loss: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The class prior as the challenger of a model: d = loss - prior_loss (positive: the prior is better)."""
    t, loss_, prior_ = _sorted_unique(times, loss, prior_loss)
    return t, loss_ - prior_


def _autocovariances(d: np.ndarray, lag: int) -> np.ndarray:
    """gamma_0 .. gamma_lag of d (lag capped at n - 1), each the sum over available pairs divided by n."""
    x = np.asarray(d, dtype=np.float64).ravel()
    n = len(x)
    if n == 0:
        raise ValueError("no differences")
    if lag < 0:
        raise ValueError(f"lag must be >= 0, got {lag}")
    e = x - x.mean()
    return np.array([float(e[j:] @ e[:n - j]) / n for j in range(min(int(lag), n - 1) + 1)])


def newey_west_variance(d: np.ndarray, lag: int) -> float:
    """Long-run variance of d with Bartlett weights 1 - j / (lag + 1) on the autocovariances up to `lag` (Newey and
    West 1987): never negative, but it leaves out part of a dependence that runs the whole `lag` (a third of it for
    the equal overlap of h-candle labels at lag h - 1). lag 0 is the plain variance (divided by n); `lag` is capped at
    n - 1. Floored at VARIANCE_FLOOR."""
    g = _autocovariances(d, lag)
    w = 1.0 - np.arange(len(g)) / len(g)
    return max(float(g[0] + 2.0 * (w[1:] @ g[1:])), VARIANCE_FLOOR)


def hansen_hodrick_variance(d: np.ndarray, lag: int) -> float:
    """Long-run variance of d with unit weights on the autocovariances up to `lag` (Hansen and Hodrick 1980): unbiased
    for any dependence that ends at `lag`, as that of h-candle labels ends at h - 1, but noisier, and it can come out
    negative. Not floored."""
    g = _autocovariances(d, lag)
    return float(g[0] + 2.0 * g[1:].sum())


def long_run_variance(d: np.ndarray, lag: int) -> float:
    """The variance the test uses: the larger of Hansen-Hodrick and Newey-West at `lag` (horizon_bars - 1).

    Newey-West alone, at lag h - 1, misses a third of the long-run variance of fully overlapping labels and the test
    then promotes a no-better shadow about 9 % of the time at alpha 5 % (bench.shadow_power); Hansen-Hodrick alone is
    unbiased but can fall far below the truth (or below 0) by chance when d is nearly independent. The larger of the
    two has neither failure; it is >= VARIANCE_FLOOR because Newey-West is."""
    g = _autocovariances(d, lag)
    w = 1.0 - np.arange(len(g)) / len(g)
    nw = float(g[0] + 2.0 * (w[1:] @ g[1:]))
    hh = float(g[0] + 2.0 * g[1:].sum())
    return max(nw, hh, VARIANCE_FLOOR)


def effective_df(n: np.ndarray | int, lag: int) -> np.ndarray:
    """Degrees of freedom of the long-run variance estimate after n pairs: n / (2 lag + 1), the chi-square match to
    the variance of a truncated-kernel estimate (2 sigma^4 (2 lag + 1) / n). 500 pairs of 24-candle labels: 10.6."""
    return np.asarray(n, dtype=np.float64) / (2.0 * max(int(lag), 0) + 1.0)


def _normal_cdf(u: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * _ERFC(-np.asarray(u, dtype=np.float64) / math.sqrt(2.0)), dtype=np.float64)


def _log_mixture_ratio(z: np.ndarray, x: np.ndarray) -> np.ndarray:
    """log Lambda for the standardised sum z >= 0 at x = n tau^2 (see the module docstring)."""
    r = x / (1.0 + x)
    return np.log(2.0) - 0.5 * np.log1p(x) + 0.5 * r * z * z + np.log(_normal_cdf(z * np.sqrt(r)))


def _boundary_at(x: np.ndarray, alpha: float) -> np.ndarray:
    """The z where Lambda = 1 / alpha, by bisection (Lambda increases with z; it is below 1 at z = 0, and above 1 /
    alpha at the upper bracket because 2 Phi(.) >= 1 there)."""
    x = np.asarray(x, dtype=np.float64)
    target = math.log(1.0 / alpha)
    lo = np.zeros_like(x)
    hi = np.sqrt(2.0 * (target + 0.5 * np.log1p(x)) * (1.0 + x) / x)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        above = _log_mixture_ratio(mid, x) >= target
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    return hi


def _golden_minimum(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-7) -> float:
    """Where the unimodal f is smallest on [lo, hi] (golden-section search)."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return 0.5 * (a + b)


@functools.lru_cache(maxsize=64)
def mixing_variance(alpha: float, tightest_at: float) -> float:
    """tau^2, per pair in long-run standard deviations squared, that makes the boundary smallest at `tightest_at`
    pairs. The boundary depends on n and tau^2 only through x = n tau^2, so this is x* / tightest_at (x* = 6.69 at
    alpha 0.05)."""
    u = _golden_minimum(lambda u: float(_boundary_at(np.array([math.exp(u)]), alpha)[0]),
                        math.log(1e-2), math.log(1e4))
    return math.exp(u) / tightest_at


def tightest_at(min_scored: int, max_scored: int) -> float:
    """Where the boundary is tuned to be tightest: the geometric middle of the window in which decisions are made."""
    return math.sqrt(min_scored * max_scored)


def mixture_boundary(n: np.ndarray | int, alpha: float = 0.05, min_scored: int = 500,
                     max_scored: int = 5000) -> np.ndarray:
    """The z boundary of the mixture test with a known long-run variance after n pairs (vectorised over n): the one
    Ville's inequality holds alpha for."""
    tau2 = mixing_variance(float(alpha), tightest_at(min_scored, max_scored))
    return _boundary_at(np.asarray(n, dtype=np.float64) * tau2, alpha)


def _t_quantile(z: np.ndarray, df: np.ndarray) -> np.ndarray:
    """The Student t quantile with `df` degrees of freedom at the tail probability of the normal quantile z: the
    Cornish-Fisher expansion to 1 / df^4 (Abramowitz and Stegun 26.7.5), within 0.2 % of exact for df >= 5 and z
    around 3."""
    z2 = z * z
    g1 = (z2 + 1.0) * z / 4.0
    g2 = ((5.0 * z2 + 16.0) * z2 + 3.0) * z / 96.0
    g3 = (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) * z / 384.0
    g4 = ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) * z / 92160.0
    return z + (g1 + (g2 + (g3 + g4 / df) / df) / df) / df


def boundary(n: np.ndarray | int, lag: int, alpha: float = 0.05, min_scored: int = 500,
             max_scored: int = 5000) -> np.ndarray:
    """The boundary the test uses after n pairs (vectorised over n): the mixture boundary moved to the same tail
    probability of a Student t with effective_df(n, lag) degrees of freedom, because the statistic is standardised
    by an estimate, not by the true long-run standard deviation; infinite below MIN_DF. It matters early (500 pairs of
    24-candle labels hold about 20 independent labels' worth) and fades as pairs accumulate; lag 0 leaves the mixture
    boundary almost unchanged."""
    b = mixture_boundary(n, alpha, min_scored, max_scored)
    df = effective_df(n, lag)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = _t_quantile(b, np.maximum(df, MIN_DF))
    return np.where(df >= MIN_DF, t, np.inf)


def decide(d: np.ndarray, lag: int, alpha: float = 0.05, min_scored: int = 500,
           max_scored: int = 5000) -> Comparison:
    """One look at the per-candle differences d (baseline - challenger, oldest first): promote, reject or undecided.

    Uses the first max_scored pairs only. Undecided below min_scored; at max_scored without a boundary crossing,
    reject. `lag` is the reach of the overlap: horizon_bars - 1 (of the longer horizon when the label specs differ)."""
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    if not 1 <= min_scored <= max_scored:
        raise ValueError(f"expected 1 <= min_scored <= max_scored, got {min_scored} and {max_scored}")
    x = np.asarray(d, dtype=np.float64).ravel()[:max_scored]
    if not np.all(np.isfinite(x)):
        raise ValueError("log-loss differences must be finite")
    n = len(x)
    if n == 0:
        return Comparison(0, 0.0, 0.0, 0.0, math.inf, UNDECIDED,
                          f"live test waits for {min_scored:,} paired candles (none yet): undecided")
    mean = float(x.mean())
    se = math.sqrt(long_run_variance(x, lag) / n)
    z = mean / se
    b = float(boundary(n, min(lag, n - 1), alpha, min_scored, max_scored))
    numbers = f"mean log-loss gain {mean:.4f} ± {se:.4f} (z {z:.2f}, boundary ±{b:.2f})"
    if n < min_scored:
        decision, why = UNDECIDED, f"undecided until {min_scored:,} paired candles"
    elif z >= b:
        decision, why = PROMOTE, PROMOTE
    elif z <= -b:
        decision, why = REJECT, f"{REJECT}: the baseline is better"
    elif n >= max_scored:
        decision, why = REJECT, f"{REJECT}: no decision within {max_scored:,} paired candles"
    else:
        decision, why = UNDECIDED, UNDECIDED
    return Comparison(n, mean, se, z, b, decision, f"live test after {n:,} paired candles: {numbers}: {why}")
