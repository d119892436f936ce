"""The live shadow test: pairing, the Newey-West variance, the decisions, and, by simulation with overlapping-label
dependence and a look after every flush, that it promotes a shadow that is no better at most alpha of the time
(where a fixed-sample z-test read at the same looks does not)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from bench import shadow_power as sim
from shared.sequential_test import (
    MIN_DF,
    PROMOTE,
    REJECT,
    UNDECIDED,
    VARIANCE_FLOOR,
    _log_mixture_ratio,
    boundary,
    decide,
    differences_against_prior,
    effective_df,
    hansen_hodrick_variance,
    long_run_variance,
    mixing_variance,
    mixture_boundary,
    newey_west_variance,
    paired_differences,
    tightest_at,
)

# --------------------------------------------------------------------------------------------------------------------
# Newey-West


def test_newey_west_by_hand():
    # d = 1 2 4 3 5 9: mean 4, deviations -3 -2 0 -1 1 5, n = 6
    # gamma_0 = (9 + 4 + 0 + 1 + 1 + 25) / 6 = 40/6
    # gamma_1 = ((-2)(-3) + 0(-2) + (-1)0 + 1(-1) + 5(1)) / 6 = 10/6
    # gamma_2 = (0(-3) + (-1)(-2) + 1(0) + 5(-1)) / 6 = -3/6
    d = np.array([1.0, 2.0, 4.0, 3.0, 5.0, 9.0])
    assert newey_west_variance(d, 0) == pytest.approx(40 / 6)
    assert newey_west_variance(d, 1) == pytest.approx(40 / 6 + 2 * (1 / 2) * 10 / 6)  # Bartlett weight 1 - 1/2
    assert newey_west_variance(d, 2) == pytest.approx(40 / 6 + 2 * (2 / 3) * 10 / 6 + 2 * (1 / 3) * (-3 / 6))
    assert newey_west_variance(d, 2) == pytest.approx(77 / 9)
    assert hansen_hodrick_variance(d, 2) == pytest.approx(40 / 6 + 2 * 10 / 6 + 2 * (-3 / 6))  # unit weights
    assert long_run_variance(d, 2) == pytest.approx(9.0)  # the larger of the two
    # alternating: gamma_0 = 1, gamma_1 = -5/6; Hansen-Hodrick 1 - 10/6 < 0, Newey-West 1 - 5/6
    alternating = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    assert hansen_hodrick_variance(alternating, 1) == pytest.approx(-4 / 6)
    assert long_run_variance(alternating, 1) == pytest.approx(1 / 6)


def _reference(d: np.ndarray, lag: int, bartlett: bool = True) -> float:
    n, e = len(d), d - d.mean()
    lag = min(lag, n - 1)
    gamma = [sum(e[t] * e[t - j] for t in range(j, n)) / n for j in range(lag + 1)]
    return gamma[0] + 2 * sum((1 - j / (lag + 1) if bartlett else 1) * gamma[j] for j in range(1, lag + 1))


@pytest.mark.parametrize("lag", [0, 1, 5, 23])
def test_newey_west_and_hansen_hodrick_match_a_loop(lag):
    d = np.random.default_rng(lag).standard_normal(200).cumsum() * 0.01 + 0.3
    assert newey_west_variance(d, lag) == pytest.approx(_reference(d, lag), rel=1e-12)
    assert hansen_hodrick_variance(d, lag) == pytest.approx(_reference(d, lag, bartlett=False), rel=1e-12)
    assert long_run_variance(d, lag) == max(newey_west_variance(d, lag), hansen_hodrick_variance(d, lag))


def test_newey_west_is_floored_and_the_lag_capped():
    assert newey_west_variance(np.full(50, 0.25), 23) == VARIANCE_FLOOR
    assert long_run_variance(np.full(50, 0.25), 23) == VARIANCE_FLOOR
    d = np.array([0.1, -0.2, 0.4])
    assert newey_west_variance(d, 23) == pytest.approx(_reference(d, 2))
    # all autocovariances of a centred series sum to (sum of deviations)^2 / n = 0: unit weights up to n - 1 give 0
    assert hansen_hodrick_variance(d, 23) == pytest.approx(0.0, abs=1e-15)
    assert long_run_variance(d, 23) == pytest.approx(_reference(d, 2))
    with pytest.raises(ValueError):
        newey_west_variance(np.array([]), 1)
    with pytest.raises(ValueError):
        newey_west_variance(d, -1)


def test_overlapping_labels_long_run_variance():
    """A unit-variance equal-weight MA(23), the overlap of 24-candle labels: gamma_j = (24 - j) / 24, so the long-run
    variance is 24. Newey-West at lag 23 weighs gamma_j by 1 - j/24 and finds 1 + 2 sum (1 - j/24)(24 - j)/24 = 16.0,
    two thirds of it; Hansen-Hodrick, and so long_run_variance, finds all of it."""
    d = sim.overlapping_differences(np.random.default_rng(3), 1, 200_000, 0.0, sd=1.0, horizon=24)[0]
    bartlett = 1 + 2 * sum((1 - j / 24) * (24 - j) / 24 for j in range(1, 24))
    assert bartlett == pytest.approx(16.0, abs=0.02)
    assert sim.long_run_sd(1.0, 24) ** 2 == pytest.approx(24.0)
    assert newey_west_variance(d, 0) == pytest.approx(1.0, rel=0.03)
    assert newey_west_variance(d, 23) == pytest.approx(bartlett, rel=0.05)
    assert long_run_variance(d, 23) == pytest.approx(24.0, rel=0.05)


# --------------------------------------------------------------------------------------------------------------------
# pairing


def test_paired_differences_inner_join_on_open_time():
    base_t = np.array([10, 20, 30, 50], dtype=np.int64)
    base_loss = np.array([1.0, 1.1, 1.2, 1.3])
    base_prior = np.array([1.05, 1.05, 1.05, 1.05])
    model_t = np.array([50, 20, 40, 30], dtype=np.int64)  # not sorted; 40 has no base score, 10 no model score
    model_loss = np.array([0.9, 1.0, 7.0, 1.5])
    model_prior = np.array([1.0, 0.95, 1.0, 1.1])

    t, d = paired_differences(base_t, base_loss, base_prior, model_t, model_loss, model_prior, same_label=True)
    assert t.tolist() == [20, 30, 50]
    np.testing.assert_allclose(d, [1.1 - 1.0, 1.2 - 1.5, 1.3 - 0.9])

    t, d = paired_differences(base_t, base_loss, base_prior, model_t, model_loss, model_prior, same_label=False)
    assert t.tolist() == [20, 30, 50]
    np.testing.assert_allclose(d, [(1.1 - 1.05) - (1.0 - 0.95), (1.2 - 1.05) - (1.5 - 1.1), (1.3 - 1.05) - (0.9 - 1.0)])


def test_paired_differences_refuses_a_candle_scored_twice():
    with pytest.raises(ValueError, match="twice"):
        paired_differences(np.array([1, 1]), np.ones(2), np.ones(2), np.array([1]), np.ones(1), np.ones(1), True)
    with pytest.raises(ValueError, match="length"):
        paired_differences(np.array([1, 2]), np.ones(1), np.ones(2), np.array([1]), np.ones(1), np.ones(1), True)


def test_nothing_shared_nothing_paired():
    t, d = paired_differences(np.array([1, 2]), np.ones(2), np.ones(2), np.array([3]), np.ones(1), np.ones(1), False)
    assert len(t) == 0 and len(d) == 0
    assert decide(d, 23).decision == UNDECIDED


def test_the_prior_as_challenger():
    t, d = differences_against_prior(np.array([3, 1]), np.array([0.9, 1.2]), np.array([1.0, 1.0]))
    assert t.tolist() == [1, 3]
    np.testing.assert_allclose(d, [0.2, -0.1])  # positive: the prior is better


# --------------------------------------------------------------------------------------------------------------------
# the boundary and the decisions


def test_the_boundary_is_where_the_mixture_ratio_reaches_one_over_alpha():
    n = np.array([500, 1000, 1581, 3000, 5000])
    b = mixture_boundary(n)
    tau2 = mixing_variance(0.05, tightest_at(500, 5000))
    np.testing.assert_allclose(_log_mixture_ratio(b, n * tau2), math.log(20), atol=1e-9)
    grid = mixture_boundary(np.arange(500, 5001))
    assert abs(500 + int(grid.argmin()) - 1581) <= 5  # tightest in the geometric middle of the window
    assert grid.min() > 1.645  # the price of looking whenever one likes
    assert mixture_boundary(5000, alpha=0.01) > mixture_boundary(5000, alpha=0.05)


def test_the_boundary_allows_for_the_estimated_variance():
    """Same tail probability under a Student t with n / (2 lag + 1) degrees of freedom: wide while few labels have
    realised, close to the mixture boundary by max_scored, and next to no change without overlap."""
    n = np.array([500, 1581, 5000])
    assert effective_df(500, 23) == pytest.approx(500 / 47)
    b, m = boundary(n, 23), mixture_boundary(n)
    assert np.all(b > m)
    assert b[0] - m[0] > 0.5 and b[-1] - m[-1] < 0.1
    np.testing.assert_allclose(boundary(n, 0), m, atol=0.02)
    # no decision on fewer than MIN_DF degrees of freedom: 5 * 47 = 235 pairs at lag 23, 1,675 at lag 167
    assert np.isinf(boundary(234, 23)) and np.isfinite(boundary(235, 23))
    assert np.isinf(boundary(1674, 167)) and np.isfinite(boundary(1675, 167))


@pytest.mark.parametrize("lag", [0, 23, 167])
def test_the_t_quantile_expansion_against_scipy(lag):
    stats = pytest.importorskip("scipy.stats")
    n = np.arange(max(500, int(MIN_DF * (2 * lag + 1)) + 1), 5001, 7)
    exact = stats.t.isf(stats.norm.sf(mixture_boundary(n)), effective_df(n, lag))
    np.testing.assert_allclose(boundary(n, lag), exact, rtol=2e-3)


def test_undecided_below_min_scored_even_with_a_large_gain():
    d = np.random.default_rng(0).normal(0.5, 0.1, 499)
    c = decide(d, 23)
    assert c.paired == 499 and c.decision == UNDECIDED and c.statistic > 10
    assert "undecided until 500 paired candles" in c.reason


def test_promote_and_reject_on_clear_evidence():
    rng = np.random.default_rng(1)
    assert decide(rng.normal(0.05, 0.2, 600), 0).decision == PROMOTE
    c = decide(rng.normal(-0.05, 0.2, 600), 0)
    assert c.decision == REJECT and "the baseline is better" in c.reason


def test_reject_at_max_scored_and_only_the_first_max_scored_pairs_count():
    d = np.random.default_rng(2).normal(0.0, 0.2, 5000)
    d -= d.mean()  # exactly no gain: never crosses
    c = decide(d, 23)
    assert c.paired == 5000 and c.decision == REJECT
    assert "no decision within 5,000 paired candles" in c.reason
    later = np.concatenate([d, np.full(3000, 1.0)])  # a gain after max_scored changes nothing
    assert decide(later, 23) == c
    assert decide(d[:4999], 23).decision == UNDECIDED


def test_identical_models_stay_finite():
    c = decide(np.zeros(800), 23)
    assert c.decision == UNDECIDED and c.statistic == 0.0 and math.isfinite(c.standard_error)


def test_the_reason_carries_the_numbers():
    rng = np.random.default_rng(4)
    d = rng.normal(0.0123, 0.1, 1234)
    c = decide(d, 23)
    assert c.mean_log_loss_difference == pytest.approx(d.mean())
    assert c.standard_error == pytest.approx(math.sqrt(long_run_variance(d, 23) / 1234))
    assert c.statistic == pytest.approx(c.mean_log_loss_difference / c.standard_error)
    assert c.boundary == pytest.approx(float(boundary(1234, 23)))
    m = re.fullmatch(r"live test after 1,234 paired candles: mean log-loss gain (-?[\d.]+) ± ([\d.]+) "
                     r"\(z (-?[\d.]+), boundary ±([\d.]+)\): (promote|reject.*|undecided)", c.reason)
    assert m, c.reason
    assert float(m[1]) == pytest.approx(c.mean_log_loss_difference, abs=5e-5)
    assert float(m[2]) == pytest.approx(c.standard_error, abs=5e-5)
    assert float(m[3]) == pytest.approx(c.statistic, abs=5e-3)
    assert float(m[4]) == pytest.approx(c.boundary, abs=5e-3)
    assert m[5].split(":")[0] == c.decision


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        decide(np.zeros(10), 1, alpha=0.5)
    with pytest.raises(ValueError):
        decide(np.zeros(10), 1, min_scored=10, max_scored=5)
    with pytest.raises(ValueError, match="finite"):
        decide(np.array([0.1, np.nan]), 1)


# --------------------------------------------------------------------------------------------------------------------
# the simulation


def test_the_vectorised_simulation_computes_what_decide_computes():
    rng = np.random.default_rng(5)
    d = sim.overlapping_differences(rng, 3, 1200, 0.02, overlap=0.5)
    m, se, se_nw = sim.prefix_statistics(d, 23, 500)
    for case, n in [(0, 500), (1, 777), (2, 1200)]:
        c = decide(d[case, :n], 23)
        assert m[case, n - 500] == pytest.approx(c.mean_log_loss_difference, rel=1e-9)
        assert se[case, n - 500] == pytest.approx(c.standard_error, rel=1e-7)
        assert se_nw[case, n - 500] == pytest.approx(math.sqrt(newey_west_variance(d[case, :n], 23) / n), rel=1e-7)


def test_look_schedule():
    looks = sim.look_schedule(np.random.default_rng(6), 200)
    assert looks.shape == (200, 4501) and looks[:, -1].all()
    assert looks[:, :50].any(axis=1).all()  # the first look comes with the first flush past 500 pairs
    for row in looks[:5]:
        gaps = np.diff(np.flatnonzero(row))
        assert gaps.min() >= 1 and gaps[:-1].max() <= 50


CASES = 1000


@pytest.fixture(scope="module")
def null_cases() -> dict[str, sim.Outcome]:
    """1,000 shadows no better than the serving model: per-candle sd 0.2 nats, 24-candle labels with every overlap
    counting (an equal-weight MA(23); long-run sd 0.98), a look every 1 to 50 new pairs from 500 to 5,000."""
    return sim.simulate(CASES, 0.0, seed=11)


def test_false_promotions_at_most_alpha_when_looking_after_every_flush(null_cases):
    promoted = int(np.sum(null_cases[sim.SEQUENTIAL].decision == 1))
    print(f"\nnull: {promoted} of {CASES} promoted ({promoted / CASES:.3f}), alpha 0.05")
    assert promoted / CASES <= 0.05


def test_the_simulation_sees_what_the_design_prevents(null_cases):
    """The same series and looks, read with a fixed-sample z-test (1.645 at every look), or with the mixture boundary
    but a Newey-West standard error that misses a third of the overlap's variance: both promote too often."""
    naive = int(np.sum(null_cases[sim.NAIVE].decision == 1))
    newey_west = int(np.sum(null_cases[sim.NEWEY_WEST].decision == 1))
    print(f"\nnull, fixed-sample z-test at every look: {naive} of {CASES} promoted; "
          f"mixture boundary with Newey-West only: {newey_west} of {CASES}")
    assert naive / CASES > 0.15
    assert newey_west / CASES > 0.05


def test_power_for_a_small_real_gain():
    # The gain: 0.05 long-run standard deviations per candle, 0.049 nats with sd 0.2 and h 24 (long-run sd 0.98).
    # That is a quarter of a per-candle standard deviation, but with every 24-candle overlap counting, 5,000 pairs
    # hold only about 208 independent labels' worth of evidence: the expected z reaches 0.05 * sqrt(5000) = 3.5 at
    # max_scored, against a boundary of 2.9. Smaller gains mostly run into max_scored (bench.shadow_power).
    effect = 0.05 * sim.long_run_sd()
    out = sim.simulate(CASES, effect, seed=12)[sim.SEQUENTIAL]
    print(f"\ngain {effect:.4f} nats/candle (0.05 long-run sd): power {out.promoted:.3f}, "
          f"median pairs to a decision {out.median_pairs:,.0f}, to a promotion {out.median_pairs_promoted:,.0f}")
    assert out.promoted > 0.5
