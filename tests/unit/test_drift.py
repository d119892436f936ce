"""Feature drift and expected loss (shared.drift): decile bins, the population stability index, the mean entropy of
served probabilities, and the drift model's storage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service_fixtures import SAMPLE
from shared import calibration as cal
from shared.drift import (
    N_BINS,
    PSI_EPS,
    DriftModel,
    bin_counts,
    bin_index,
    decile_edges,
    entropy,
    expected_log_loss,
    fit_drift,
    psi,
)
from shared.features import FeatureSpec, feature_matrix
from shared.store.importers import read_candles

SPLIT = 10_000


@pytest.fixture(scope="module")
def sample_columns() -> dict[str, np.ndarray]:
    frame = read_candles(SAMPLE, "1h")
    return {c: frame[c].to_numpy(np.float64) for c in ("open", "high", "low", "close", "volume")}


@pytest.fixture(scope="module")
def train_rows(sample_columns) -> np.ndarray:
    X = feature_matrix(sample_columns, FeatureSpec())[:SPLIT]
    return X[np.isfinite(X).all(axis=1)].astype(np.float32)


# ------------------------------------------------------------------------------------------------------------------
# bins


def test_the_decile_bins_of_the_training_rows_hold_ten_percent_each(train_rows):
    model = fit_drift(train_rows)
    assert model.edges.shape == (train_rows.shape[1], N_BINS - 1)
    assert (np.diff(model.edges, axis=1) >= 0).all()
    np.testing.assert_allclose(model.train_fractions, 0.1, atol=1e-3)
    np.testing.assert_allclose(model.train_fractions.sum(axis=1), 1.0, rtol=1e-12)
    rng = np.random.default_rng(0)
    R = rng.standard_t(3, size=(20_000, 5))
    np.testing.assert_allclose(fit_drift(R).train_fractions, 0.1, atol=1e-3)


def test_ties_make_uneven_bins_and_the_stored_fractions_follow_them():
    rng = np.random.default_rng(1)
    x = rng.normal(size=10_000)
    x[:3000] = 0.0  # 30 % of the rows share one value: several edges are 0
    model = fit_drift(x[:, None])
    fr = model.train_fractions[0]
    assert fr.sum() == pytest.approx(1.0) and fr.min() == 0.0 and fr.max() > 0.3
    # the rows themselves have no drift against their stored fractions, empty bins included
    assert model.psi(bin_counts(model.bins(x[:, None])))[0] == pytest.approx(0.0, abs=1e-12)


def test_bin_index_counts_the_edges_at_or_below_a_value():
    edges = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]])
    X = np.array([[0.5], [1.0], [1.5], [9.0], [100.0], [-np.inf], [np.nan], [np.inf]])
    b = bin_index(edges, X)
    assert b.dtype == np.int8 and b.shape == (8, 1)
    assert b[:, 0].tolist() == [0, 1, 1, 9, 9, -1, -1, -1]
    counts = bin_counts(b)
    assert counts.tolist() == [[1, 2, 0, 0, 0, 0, 0, 0, 0, 2]]  # not finite: not counted
    with pytest.raises(ValueError, match="matrix"):
        bin_index(edges, np.zeros((3, 2)))


def test_decile_edges_are_the_quantiles():
    rng = np.random.default_rng(2)
    X = rng.lognormal(size=(5000, 3))
    expected = np.quantile(X, [0.1 * q for q in range(1, 10)], axis=0).T
    np.testing.assert_allclose(decile_edges(X), expected, rtol=1e-12)


def test_bin_index_is_searchsorted_to_the_right_on_every_feature():
    rng = np.random.default_rng(8)
    X = np.round(rng.normal(size=(9000, 4)), 1)  # many ties, many values equal to an edge
    edges = decile_edges(X[:3000])
    b = bin_index(edges, X)
    for j in range(4):
        assert np.array_equal(b[:, j], np.searchsorted(edges[j], X[:, j], side="right"))
    assert np.array_equal(bin_index(edges, X[:1]), b[:1])  # one row alone: the same bins


# ------------------------------------------------------------------------------------------------------------------
# population stability index


def test_psi_is_near_zero_for_a_sample_of_the_training_distribution(train_rows):
    model = fit_drift(train_rows)
    rng = np.random.default_rng(3)
    sample = train_rows[rng.choice(len(train_rows), 1000, replace=False)]
    p = model.psi(bin_counts(model.bins(sample)))
    assert p.shape == (train_rows.shape[1],)
    assert p.max() < 0.05  # about (bins - 1) / 1000 = 0.009 expected for independent draws
    # fresh draws of a random distribution against the edges of another sample of it
    R = rng.normal(size=(20_000, 6))
    m = fit_drift(R)
    assert m.psi(bin_counts(m.bins(rng.normal(size=(1000, 6))))).max() < 0.05


def test_psi_is_large_for_a_shifted_distribution(train_rows):
    rng = np.random.default_rng(4)
    R = rng.normal(size=(20_000, 3))
    m = fit_drift(R)
    shifted = rng.normal(size=(1000, 3)) * np.array([1.0, 2.0, 1.0]) + np.array([0.5, 0.0, 0.0])
    p = m.psi(bin_counts(m.bins(shifted)))
    assert p[0] > 0.2 and p[1] > 0.2 and p[2] < 0.05  # mean shift, scale shift, none
    # real features: the candles of the training period with every return and range tenfold
    model = fit_drift(train_rows)
    names = FeatureSpec().feature_names
    tenfold = train_rows.astype(np.float64)
    scaled = [j for j, n in enumerate(names) if n.startswith(("ret_", "volatility_", "natr_", "candle_range"))]
    tenfold[:, scaled] *= 10.0
    p = model.psi(bin_counts(model.bins(tenfold[:1000])))
    assert (p[scaled] > 0.2).all()


def test_psi_by_hand_with_empty_bins():
    expected = np.array([[0.5, 0.5, 0.0] + [0.0] * 7])
    counts = np.array([[10, 30, 0, 0, 0, 0, 0, 0, 0, 10]])
    a = np.array([0.2, 0.6, 0, 0, 0, 0, 0, 0, 0, 0.2])
    e = np.array([0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0])
    a, e = np.maximum(a, PSI_EPS), np.maximum(e, PSI_EPS)
    by_hand = float(np.sum((a - e) * np.log(a / e)))
    assert psi(expected, counts)[0] == pytest.approx(by_hand, rel=1e-12)
    assert np.isnan(psi(expected, np.zeros((1, 10))))[0]  # no live value: no index


# ------------------------------------------------------------------------------------------------------------------
# expected log loss


def test_expected_log_loss_is_the_mean_entropy():
    proba = np.array([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [np.nan, np.nan, np.nan]])
    by_hand = [
        -(0.2 * np.log(0.2) + 0.5 * np.log(0.5) + 0.3 * np.log(0.3)),
        -(1.0 * np.log(1.0) + 0.0 * np.log(cal.EPS) + 0.0 * np.log(cal.EPS)),  # clipped as log_loss clips
        np.log(3.0),
    ]
    h = entropy(proba)
    np.testing.assert_allclose(h[:3], by_hand, rtol=1e-15)
    assert np.isnan(h[3])
    assert expected_log_loss(proba) == pytest.approx(np.mean(by_hand), rel=1e-15)  # the NaN row is left out
    assert np.isnan(expected_log_loss(np.full((2, 3), np.nan)))
    assert np.isnan(expected_log_loss(np.zeros((0, 3))))


def test_calibrated_probabilities_realise_their_expected_log_loss():
    rng = np.random.default_rng(5)
    proba = rng.dirichlet([2.0, 3.0, 2.0], size=100_000)
    y = (rng.random(len(proba))[:, None] > np.cumsum(proba, axis=1)).sum(axis=1)  # y drawn from each row
    assert cal.log_loss(proba, y) == pytest.approx(expected_log_loss(proba), abs=0.01)
    overconfident = cal.shrink_to_prior(proba ** 3, np.ones(3) / 3, 1.0)  # same labels, sharper probabilities
    assert cal.log_loss(overconfident, y) > expected_log_loss(overconfident) + 0.1


def test_a_rows_entropy_does_not_depend_on_the_batch():
    rng = np.random.default_rng(6)
    proba = rng.dirichlet([1.0, 1.0, 1.0], size=2000)
    full = entropy(proba)
    assert all(entropy(proba[i:i + 1])[0] == full[i] for i in range(len(proba)))


# ------------------------------------------------------------------------------------------------------------------
# storage


def test_the_drift_model_round_trips_exactly_through_json(train_rows):
    model = fit_drift(train_rows)
    back = DriftModel.from_dict(json.loads(json.dumps(model.to_dict(), allow_nan=False)))
    assert back == model and back.n_train == len(train_rows)
    assert np.array_equal(back.edges, model.edges) and np.array_equal(back.train_fractions, model.train_fractions)
    assert np.array_equal(back.bins(train_rows), model.bins(train_rows))
    with pytest.raises(ValueError, match="version"):
        DriftModel.from_dict({**model.to_dict(), "version": 2})
