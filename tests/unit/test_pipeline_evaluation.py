"""The evaluation's index sets: the held-back split, the purged k-fold CV, the class prior and the dataset.

Every check is on sets of row indices: no test row may be a fitting or calibration row, and every purge gap (rows
strictly between two parts) must be at least the label horizon, so a shrunk purge fails these tests.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shared import calibration as cal
from shared.features import CONTEXT_SPEC, FeatureSpec, feature_matrix
from shared.labels import CLASSES, LabelSpec, make_labels, spans_gap
from shared.params import UNIQUENESS, ForestParams
from training_service import evaluation, pipeline
from training_service.evaluation import min_gap, purged_kfold
from training_service.pipeline import build_dataset, purged_splits, train

H = 3_600_000


def candles(n: int, seed: int = 0, start_ms: int = 1_514_764_800_000, step_ms: int = H) -> pd.DataFrame:
    """A consistent random-walk candle frame with ~1.5 % hourly moves (enough for all three classes at 2 %)."""
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.015, n)))
    open_ = np.concatenate([[100.0], close[:-1]])
    spread = np.abs(rng.normal(0.0, 0.004, n)) * close
    return pd.DataFrame({
        "open_time_ms": start_ms + step_ms * np.arange(n, dtype=np.int64),
        "open": open_, "high": np.maximum(open_, close) + spread, "low": np.minimum(open_, close) - spread,
        "close": close, "volume": rng.uniform(1.0, 10.0, n),
    })


def rows(part) -> np.ndarray:
    return np.arange(part.start, part.stop) if isinstance(part, slice) else np.asarray(part)


def gap_rows(a, b) -> int:
    """Rows strictly between the closest pair of rows of two parts."""
    return min_gap(rows(a), rows(b)) - 1


# --------------------------------------------------------------------------------------------------------------------
# the held-back split


@pytest.mark.parametrize(("n", "horizon"), [(1000, 1), (1500, 24), (17_000, 24), (9000, 200)])
def test_purged_splits_keep_the_test_rows_apart(n, horizon):
    fit, calib, test = purged_splits(n, horizon)
    f, c, t = rows(fit), rows(calib), rows(test)
    assert not (set(f) & set(t)) and not (set(c) & set(t)) and not (set(f) & set(c))
    assert f.max() < c.min() and c.max() < t.min() and t.max() == n - 1  # time order, test at the end
    assert gap_rows(f, c) >= horizon
    assert gap_rows(c, t) >= horizon
    assert gap_rows(f, t) >= horizon
    assert len(t) >= 100 and len(c) >= 100


def test_purged_splits_refuse_too_few_rows():
    with pytest.raises(Exception, match="too few"):
        purged_splits(600, 24)


# --------------------------------------------------------------------------------------------------------------------
# purged, embargoed k-fold


@pytest.mark.parametrize(("n", "horizon", "folds", "warmup"),
                         [(17_000, 24, 5, 100), (5000, 24, 4, 100), (3000, 1, 5, 100), (9000, 96, 5, 100),
                          (17_000, 24, 5, 0), (9000, 24, 5, 721)])
def test_kfold_folds_keep_test_rows_out_of_fitting_and_calibration(n, horizon, folds, warmup):
    emb = evaluation.embargo_rows(n, warmup)
    assert emb >= warmup and emb >= n * evaluation.EMBARGO_FRACTION
    parts = purged_kfold(n, horizon, folds, warmup_bars=warmup)
    assert len(parts) == folds
    tested = np.concatenate([p.test for p in parts])
    assert np.array_equal(np.sort(tested), np.arange(n))  # every row is tested exactly once
    for p in parts:
        f, c, t = set(p.fit.tolist()), set(p.calibration.tolist()), set(p.test.tolist())
        assert not (f & t) and not (c & t) and not (f & c)
        assert np.array_equal(p.test, np.arange(p.test[0], p.test[-1] + 1))  # one contiguous block
        assert gap_rows(p.fit, p.test) >= horizon
        assert gap_rows(p.calibration, p.test) >= horizon
        assert gap_rows(p.fit, p.calibration) >= horizon
        # the embargo: after the test block, nothing is fitted on for horizon + embargo rows
        after = p.fit[p.fit > p.test[-1]]
        if after.size:
            assert after.min() - p.test[-1] - 1 >= horizon + emb
        after_cal = p.calibration[p.calibration > p.test[-1]]
        if after_cal.size:
            assert after_cal.min() - p.test[-1] - 1 >= horizon + emb
        assert len(p.fit) >= evaluation.MIN_FOLD_FIT_ROWS


@pytest.mark.parametrize("n", [2000, 5000, 9000])
def test_the_embargo_after_each_test_part_is_at_least_the_feature_warmup(n):
    """1 % of a window under 10,000 rows is fewer rows than the default features' warm-up (100 candles): the embargo
    must still cover the warm-up, so no fitting or calibration row's features read a candle of the test part."""
    warmup = FeatureSpec().warmup_bars
    assert n * evaluation.EMBARGO_FRACTION < warmup
    assert evaluation.embargo_rows(n, warmup) == warmup
    for p in purged_kfold(n, 24, 4, warmup_bars=warmup):
        learned = np.concatenate([p.fit, p.calibration])
        after = learned[learned > p.test[-1]]
        if after.size:  # every later fitting/calibration row starts its feature window after the test block
            assert after.min() - (warmup - 1) > p.test[-1] + 24
            assert after.min() - p.test[-1] - 1 >= 24 + warmup


def test_the_context_features_embargo_their_warmup_and_still_leave_five_folds_on_a_year():
    warmup = CONTEXT_SPEC.warmup_bars
    assert warmup == 721
    assert evaluation.embargo_rows(8760, warmup) == warmup  # a year of 1h candles: 1 % would be 88 rows
    assert len(evaluation.folds_that_fit(8000, 24, warmup_bars=warmup)) == evaluation.DEFAULT_CV_FOLDS


def test_the_pipeline_embargoes_the_feature_warmup(recorded):
    model, data, label, fits, _ = recorded
    assert model.metrics["cv_embargo_rows"] == data.spec.warmup_bars == 100
    k = int(model.metrics["cv_folds"])
    for j, fold in enumerate(purged_kfold(len(data.y), label.horizon_bars, k, warmup_bars=100)):
        assert np.array_equal(fits[1 + j], fold.fit)
        after = fold.fit[fold.fit > fold.test[-1]]
        if after.size:
            assert after.min() - fold.test[-1] - 1 >= label.horizon_bars + 100


def test_default_cv_has_at_least_four_folds_and_too_short_windows_get_none():
    assert evaluation.DEFAULT_CV_FOLDS >= 4
    assert len(evaluation.folds_that_fit(17_000, 24, warmup_bars=100)) == evaluation.DEFAULT_CV_FOLDS
    # the smallest trainable window (1,000 rows) has no room for folds with a 100-row embargo; 1,100 rows have
    assert evaluation.folds_that_fit(1000, 24, warmup_bars=100) == []
    assert len(evaluation.folds_that_fit(1100, 24, warmup_bars=100)) == evaluation.DEFAULT_CV_FOLDS
    assert len(evaluation.folds_that_fit(1000, 24)) == evaluation.DEFAULT_CV_FOLDS  # with the 1 % embargo alone
    assert evaluation.folds_that_fit(800, 24) == []
    with pytest.raises(ValueError, match="too few"):
        purged_kfold(800, 24, 5)


def test_near_marks_exactly_the_purge_window():
    mask = np.zeros(20, dtype=bool)
    mask[8:10] = True
    got = np.flatnonzero(evaluation.near(mask, before=3, after=2))
    assert got.tolist() == list(range(5, 12))


def test_min_gap_is_the_closest_pair():
    assert min_gap(np.array([0, 1, 2]), np.array([10, 20])) == 8
    assert min_gap(np.array([30]), np.array([10, 20])) == 10


# --------------------------------------------------------------------------------------------------------------------
# the pipeline uses these index sets


@pytest.fixture(scope="module")
def recorded():
    """Train on a synthetic window whose first feature is the row number, recording the rows of every forest fit
    and every probability call, in order."""
    frame = candles(2600, seed=3)
    label = LabelSpec(horizon_bars=12, threshold=0.02)
    fits: list[np.ndarray] = []
    probas: list[np.ndarray] = []
    real_build, real_fit, real_proba = pipeline.build_dataset, pipeline.fit_forest, pipeline.class_proba

    def build(*args, **kw):
        data = real_build(*args, **kw)
        data.X[:, 0] = np.arange(len(data.y), dtype=np.float32)
        return data

    def fit(X, *args, **kw):
        fits.append(X[:, 0].astype(np.int64))
        return real_fit(X, *args, **kw)

    def proba(forest, X):
        probas.append(X[:, 0].astype(np.int64))
        return real_proba(forest, X)

    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "build_dataset", build)
    mp.setattr(pipeline, "fit_forest", fit)
    mp.setattr(pipeline, "class_proba", proba)
    try:
        model = train(frame, label, ForestParams(n_estimators=4, min_samples_leaf=20), n_jobs=1, cv_folds=4,
                      importance_repeats=0, base_spec=FeatureSpec())
    finally:
        mp.undo()
    data = real_build(frame, label, FeatureSpec())
    return model, data, label, fits, probas


def test_evaluation_fits_and_calibrates_away_from_the_test_rows(recorded):
    _, data, label, fits, probas = recorded
    h, n = label.horizon_bars, len(data.y)
    fit, calib, test = purged_splits(n, h)
    assert np.array_equal(fits[0], rows(fit))
    assert np.array_equal(probas[0], rows(calib)) and np.array_equal(probas[1], rows(test))
    assert gap_rows(fits[0], probas[1]) >= h and gap_rows(probas[0], probas[1]) >= h
    # the registered model's weight: a forest fitted on everything up to a purge before `test`, scored on `test`
    head_fit = fits[-2]
    assert head_fit.max() == test.start - h - 1
    assert gap_rows(head_fit, rows(test)) >= h
    assert np.array_equal(fits[-1], np.arange(n))  # then the refit on every labelled row


def test_cross_validation_fits_and_calibrates_away_from_each_test_part(recorded):
    model, data, label, fits, probas = recorded
    h, n = label.horizon_bars, len(data.y)
    k = int(model.metrics["cv_folds"])
    assert k == 4
    cv_fits = fits[1:1 + k]
    cv_probas = probas[2:2 + 2 * k]
    for j, fold in enumerate(purged_kfold(n, h, k, warmup_bars=data.spec.warmup_bars)):
        cal_rows, test_rows = cv_probas[2 * j], cv_probas[2 * j + 1]
        assert np.array_equal(cv_fits[j], fold.fit)
        assert np.array_equal(cal_rows, fold.calibration) and np.array_equal(test_rows, fold.test)
        assert not set(test_rows.tolist()) & (set(cv_fits[j].tolist()) | set(cal_rows.tolist()))
        assert gap_rows(cv_fits[j], test_rows) >= h and gap_rows(cal_rows, test_rows) >= h
        assert model.metrics[f"cv_fold_{j}_start_ms"] == data.open_time_ms[fold.test[0]]
        assert model.metrics[f"cv_fold_{j}_log_loss_ratio"] == pytest.approx(
            model.metrics[f"cv_fold_{j}_log_loss"] / model.metrics[f"cv_fold_{j}_prior_log_loss"])
    ratios = [model.metrics[f"cv_fold_{j}_log_loss_ratio"] for j in range(k)]
    assert model.metrics["cv_log_loss_ratio_mean"] == pytest.approx(np.mean(ratios))
    assert model.metrics["cv_log_loss_ratio_std"] == pytest.approx(np.std(ratios, ddof=1))


def test_the_prior_is_learned_from_the_fitting_rows_only(recorded):
    model, data, label, _, _ = recorded
    fit, _, test = purged_splits(len(data.y), label.horizon_bars)
    prior_fit = cal.class_prior(data.y[fit], len(CLASSES))
    yt = data.y[test]
    assert model.metrics["prior_log_loss"] == pytest.approx(cal.log_loss(np.tile(prior_fit, (len(yt), 1)), yt))
    # the served prior is that of the whole labelled window
    assert np.allclose(model.prior, cal.class_prior(data.y, len(CLASSES)))


def test_reliability_metrics_cover_the_test_part(recorded):
    model = recorded[0]
    n_test = model.metrics["n_test"]
    for name in CLASSES:
        counts = [model.metrics[f"oos_reliability_{name}_{b}_count"] for b in range(evaluation.RELIABILITY_BINS)]
        assert sum(counts) == n_test
        for b, c in enumerate(counts):
            if c:
                assert b / 10 <= model.metrics[f"oos_reliability_{name}_{b}_mean"] <= (b + 1) / 10
                assert 0 <= model.metrics[f"oos_reliability_{name}_{b}_freq"] <= 1


def test_class_prior_is_smoothed_and_sums_to_one():
    p = cal.class_prior(np.array([0, 0, 2, 2, 2]), 3)
    assert p.tolist() == pytest.approx([3 / 8, 1 / 8, 4 / 8])
    assert p.sum() == pytest.approx(1.0) and (p > 0).all()


# --------------------------------------------------------------------------------------------------------------------
# the dataset: labels across gaps, label kinds


def test_a_gap_in_the_middle_drops_exactly_the_labels_that_span_it():
    full = candles(1500, seed=1)
    missing = np.arange(700, 705)  # five candles missing
    frame = full.drop(index=missing).reset_index(drop=True)
    label = LabelSpec(horizon_bars=24, threshold=0.02)
    data = build_dataset(frame, label, FeatureSpec())  # the version-1 warm-up (100) ends before the gap
    times = frame.open_time_ms.to_numpy()
    before_gap = times[times < full.open_time_ms[700]]
    # the labels of the last 24 candles before the hole look across it; nothing else is lost to the gap
    spanning = set(before_gap[-24:].tolist())
    assert not spanning & set(data.open_time_ms.tolist())
    # every other row with features and a label is kept
    cols = {c: frame[c].to_numpy(np.float64) for c in ("open", "high", "low", "close", "volume")}
    finite = np.isfinite(feature_matrix(cols, data.spec)).all(axis=1)
    labelled = make_labels(frame.close.to_numpy(), label) >= 0
    assert set(times[finite & labelled].tolist()) - set(data.open_time_ms.tolist()) == spanning
    assert data.dropped_gap_labels == 24
    assert data.window_gaps == 1 and data.window_missing_candles == 5
    assert data.timeframe_ms == H
    # labels of the rows kept are those of make_labels on the candles as stored
    y = make_labels(frame.close.to_numpy(), label, times, H)
    keep = np.isin(times, data.open_time_ms)
    assert np.array_equal(data.y, y[keep])
    assert not spans_gap(times, 24, H)[keep].any()


def test_gap_counts_reach_the_model_metrics():
    full = candles(2600, seed=2)
    frame = full.drop(index=[1200, 1201, 1900]).reset_index(drop=True)
    model = train(frame, LabelSpec(horizon_bars=12), ForestParams(n_estimators=3, min_samples_leaf=20), n_jobs=1,
                  cv_folds=0, importance_repeats=0)
    assert model.metrics["dropped_gap_labels"] == 24
    assert model.metrics["window_gaps"] == 2 and model.metrics["window_missing_candles"] == 3
    assert model.metrics["cv_folds"] == 0


def test_triple_barrier_kind_reaches_the_dataset():
    frame = candles(1500, seed=4)
    fixed = build_dataset(frame, LabelSpec(horizon_bars=24, threshold=0.02))
    barrier = build_dataset(frame, LabelSpec(horizon_bars=24, threshold=0.02, kind="triple_barrier"))
    assert np.array_equal(fixed.open_time_ms, barrier.open_time_ms)
    want = make_labels(frame.close.to_numpy(), LabelSpec(24, 0.02, "triple_barrier"))
    keep = np.isin(frame.open_time_ms.to_numpy(), barrier.open_time_ms)
    assert np.array_equal(barrier.y, want[keep])
    # a path that touches a barrier and comes back is up or down, never range: fewer range labels
    assert (barrier.y == 1).sum() < (fixed.y == 1).sum()


# --------------------------------------------------------------------------------------------------------------------
# overlap-aware sampling


def test_average_uniqueness_of_overlapping_labels():
    h = 4
    u = evaluation.average_uniqueness(np.arange(50) * H, h, H)
    assert u[10:40] == pytest.approx(np.full(30, 1 / h))  # every candle is covered by h labels
    assert u[0] > 1 / h and u[-1] > 1 / h  # fewer neighbours at the edges
    apart = evaluation.average_uniqueness(np.array([0, 10, 20]) * H, h, H)
    assert apart == pytest.approx([1.0, 1.0, 1.0])  # labels that share no candle are unique


def test_uniqueness_sized_bootstraps_train():
    frame = candles(2400, seed=5)  # warm-up (721), horizon and 1,000 labelled rows
    params = ForestParams(n_estimators=3, min_samples_leaf=10, max_samples=UNIQUENESS)
    model = train(frame, LabelSpec(horizon_bars=12), params, n_jobs=1, cv_folds=0, importance_repeats=0)
    assert 0.0 <= model.shrink_weight <= 1.0
    with pytest.raises(ValueError, match="max_samples"):
        ForestParams(max_samples=1.5)


@pytest.mark.parametrize("params", [
    ForestParams(n_estimators=40),
    ForestParams(n_estimators=30, max_depth=None, min_samples_leaf=1, max_samples=None),
    ForestParams(n_estimators=25, class_weight="balanced", max_features=0.5, max_samples=0.3),
])
def test_forest_proba_is_predict_proba_bit_for_bit(params):
    """The evaluation's fast prediction path is scikit-learn's own answer, not an approximation of it."""
    data = build_dataset(candles(3000, seed=7), LabelSpec(horizon_bars=12))
    u = 0.2 if params.max_samples == UNIQUENESS else None
    forest = pipeline.fit_forest(data.X, data.y, params, 1, lambda f: None, uniqueness=u)
    for X in (data.X, data.X[:1], data.X[::7].astype(np.float64)):
        assert np.array_equal(pipeline.forest_proba(forest, X), forest.predict_proba(X))
    # a forest that never saw one class: columns follow forest.classes_, and class_proba fills CLASSES order
    two = pipeline.fit_forest(data.X, np.where(data.y == 2, 1, data.y), params, 1, lambda f: None, uniqueness=u)
    assert np.array_equal(pipeline.forest_proba(two, data.X), two.predict_proba(data.X))
    full = pipeline.class_proba(two, data.X)
    assert full.shape == (len(data.X), len(CLASSES)) and np.all(full[:, 2] == 0.0)
