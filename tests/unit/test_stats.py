"""PSR and DSR against published worked examples, scipy, and the best of 100 noise rules."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from mlsignal.stats import (
    EULER_GAMMA,
    deflated_sharpe_ratio,
    expected_max_sharpe,
    null_sharpe_variance,
    probabilistic_sharpe_ratio,
    sharpe_stats,
)


def test_psr_published_example():
    """mlfinlab's test of the 2012 formula (hudson-and-thames/mlfinlab, mlfinlab/tests/test_backtest_statistics.py,
    test_probabalistic_sharpe_ratio): observed SR 1.14, benchmark 1, 250 returns, skewness 0, kurtosis 3 give
    PSR 0.95727 (to 1e-4)."""
    assert probabilistic_sharpe_ratio(1.14, 1.0, 250, 0.0, 3.0) == pytest.approx(0.95727, abs=1e-4)
    # by hand: (0.14 * sqrt(249)) / sqrt(1 + 2 / 4 * 1.14^2) = 1.7199...
    z = 0.14 * math.sqrt(249) / math.sqrt(1 + 0.5 * 1.14**2)
    assert probabilistic_sharpe_ratio(1.14, 1.0, 250) == pytest.approx(scipy_stats.norm.cdf(z), abs=1e-15)


def test_dsr_published_example_of_the_2014_paper():
    """Bailey & López de Prado, "The Deflated Sharpe Ratio" (Journal of Portfolio Management 40(5), 2014), the
    numerical example: a strategy selected out of N = 100 trials with annualised SR 2.5 over T = 1,250 daily
    observations (5 years of 250 days), V[SR_n] = 1/2 across the trials (annualised), skewness -3 and kurtosis 10.
    The expected maximum of the trials' Sharpe ratios is SR0 = 0.1132 per day (1.79 annualised), and
    DSR = 0.9004: the strategy is not significant at 95 % despite its SR of 2.5."""
    days = 250
    sr = 2.5 / math.sqrt(days)
    variance = 0.5 / days  # an annualised variance of Sharpe ratios, per day
    assert expected_max_sharpe(100, variance) == pytest.approx(0.1132, abs=5e-5)
    assert expected_max_sharpe(100, variance) * math.sqrt(days) == pytest.approx(1.7894, abs=5e-4)
    assert deflated_sharpe_ratio(sr, 100, variance, 1250, -3.0, 10.0) == pytest.approx(0.9004, abs=5e-5)


def test_dsr_published_example_of_mlfinlab():
    """mlfinlab (test_deflated_sharpe_ratio): observed SR 1.14 against the trials' Sharpe ratios [3.5, 1.01, 1.02],
    250 returns, normal: DSR 0.95836 (to 1e-4). mlfinlab takes the population variance (numpy's default ddof=0) of
    the estimates as V[SR_n]."""
    estimates = np.array([3.5, 1.01, 1.02])
    assert deflated_sharpe_ratio(1.14, 3, float(np.var(estimates)), 250) == pytest.approx(0.95836, abs=1e-4)


def test_expected_max_sharpe_is_the_false_strategy_theorem():
    # (1 - gamma) * z(1 - 1/N) + gamma * z(1 - 1/(N e)) with scipy's normal quantile
    for n in (2, 10, 100, 1000):
        z = (1 - np.euler_gamma) * scipy_stats.norm.ppf(1 - 1 / n) + np.euler_gamma * scipy_stats.norm.ppf(
            1 - 1 / (n * math.e))
        assert expected_max_sharpe(n, 4.0) == pytest.approx(2.0 * z, rel=1e-12)
    assert abs(EULER_GAMMA - np.euler_gamma) < 1e-16
    # one trial: nothing selected, nothing to deflate; more trials, a higher bar
    assert expected_max_sharpe(1, 0.3, sr_mean=0.1) == 0.1
    bars = [expected_max_sharpe(n, 1.0) for n in (2, 5, 20, 100, 1000)]
    assert bars == sorted(bars) and bars[0] > 0
    # close to the mean of the maximum of N standard normals (simulated)
    rng = np.random.default_rng(0)
    simulated = rng.standard_normal((20_000, 100)).max(axis=1).mean()
    assert expected_max_sharpe(100, 1.0) == pytest.approx(simulated, rel=0.01)


def test_psr_penalises_negative_skew_fat_tails_and_short_records():
    base = probabilistic_sharpe_ratio(0.1, 0.0, 500)
    assert probabilistic_sharpe_ratio(0.1, 0.0, 500, skew=-2.0) < base < probabilistic_sharpe_ratio(0.1, 0.0, 500,
                                                                                                     skew=2.0)
    assert probabilistic_sharpe_ratio(0.1, 0.0, 500, kurtosis=20.0) < base
    assert probabilistic_sharpe_ratio(0.1, 0.0, 100) < base
    assert probabilistic_sharpe_ratio(0.0, 0.0, 500) == 0.5


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="n_obs"):
        probabilistic_sharpe_ratio(0.1, 0.0, 1)
    with pytest.raises(ValueError, match="sr must be a finite"):
        probabilistic_sharpe_ratio(math.nan, 0.0, 100)
    with pytest.raises(ValueError, match="n_trials"):
        expected_max_sharpe(0, 1.0)
    with pytest.raises(ValueError, match="sr_variance"):
        expected_max_sharpe(10, -1.0)
    with pytest.raises(ValueError, match="must be > 0 for the PSR"):
        probabilistic_sharpe_ratio(2.0, 0.0, 100, skew=5.0)
    with pytest.raises(ValueError, match="trials"):
        sharpe_stats([0.01, -0.01, 0.02], 0)
    with pytest.raises(ValueError, match="finite"):
        sharpe_stats([0.01, math.nan, 0.02], 3)


def test_sharpe_stats_of_a_return_series():
    rng = np.random.default_rng(4)
    r = rng.standard_t(4, 3000) * 0.01 + 0.0005
    st = sharpe_stats(r, trials=20)
    assert st.sharpe == pytest.approx(r.mean() / r.std(ddof=1), rel=1e-12)
    assert st.skew == pytest.approx(scipy_stats.skew(r), rel=1e-9)
    assert st.kurtosis == pytest.approx(scipy_stats.kurtosis(r, fisher=False), rel=1e-9)
    assert st.sr_variance == null_sharpe_variance(3000) == pytest.approx(1 / 2999)
    assert st.psr == probabilistic_sharpe_ratio(st.sharpe, 0.0, 3000, st.skew, st.kurtosis)
    assert st.dsr == deflated_sharpe_ratio(st.sharpe, 20, 1 / 2999, 3000, st.skew, st.kurtosis)
    assert st.dsr < st.psr
    assert sharpe_stats(r, trials=1).dsr == st.psr  # one trial: DSR = PSR
    # the trials' own Sharpe ratios, when known, give V[SR_n]
    own = sharpe_stats(r, trials=3, trial_sharpes=[0.01, 0.05, 0.02])
    assert own.sr_variance == pytest.approx(np.var([0.01, 0.05, 0.02], ddof=1))
    flat = sharpe_stats(np.zeros(50), trials=5)
    assert math.isnan(flat.sharpe) and math.isnan(flat.psr) and math.isnan(flat.dsr)


def test_null_variance_is_the_spread_of_noise_sharpe_ratios():
    """V[SR_n] for trials that are all noise: the spread of Sharpe ratios measured on pure noise is 1 / (T - 1)."""
    rng = np.random.default_rng(9)
    t = 400
    noise = rng.standard_normal((4000, t))
    sharpes = noise.mean(axis=1) / noise.std(axis=1, ddof=1)
    assert np.var(sharpes) == pytest.approx(null_sharpe_variance(t), rel=0.05)


def test_the_best_of_100_noise_rules_is_not_significant_once_deflated():
    """100 rules that enter at random on a random walk, held for the label's 24 candles; the best of them looks
    significant on its own (PSR > 0.95) but its DSR for 100 trials stays below 0.95, with V[SR_n] measured on the 100
    trials and with the noise variance alike."""
    from mlsignal.backtest import StrategyRule, run_backtest

    rng = np.random.default_rng(1)
    n = 3000
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    base = pd.DataFrame({
        "open_time_ms": 1_546_300_800_000 + 3_600_000 * np.arange(n, dtype=np.int64),
        "close": close, "ML_READY": True, "ML_IN_SAMPLE": False, "ML_DOWN_PROB": 0.2,
        "train_end_ms": 1_500_000_000_000, "ML_HORIZON_BARS": 24, "ML_THRESHOLD": 0.02,
        "ML_LABEL_KIND": "fixed_horizon",
    })  # fmt: skip
    rule = StrategyRule(up_min=0.5, edge_min=None, rsi_max=None)
    results = []
    for _ in range(100):
        sig = base.assign(ML_UP_PROB=np.where(rng.random(n) < 0.01, 0.9, 0.1))  # a coin that enters 1 % of candles
        results.append(run_backtest(sig, rule, fee_bps=0.0, trials=100))
    sharpes = np.array([res.sharpe_stats.sharpe for res in results])
    best = results[int(np.argmax(sharpes))].sharpe_stats
    assert best.psr > 0.95  # alone, the winner looks like skill (0.986 with this seed)
    assert best.dsr < 0.95  # deflated for the noise variance 1 / (T - 1): 0.35
    measured = sharpe_stats(results[int(np.argmax(sharpes))].strategy.returns.to_numpy(), 100, trial_sharpes=sharpes)
    assert measured.dsr < 0.95  # deflated for the 100 trials' own spread: 0.43
