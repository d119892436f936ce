"""The out-of-distribution score (shared.ood): its flag rate, what it flags, stream = batch bit for bit, its cost,
its storage, and its path from training through the registry.

Real features come from the bundled BTC/USD 1h sample with the default FeatureSpec; the score is fitted on the
first 10,000 candles with features (2017-07 .. 2018-08) and judged on the candles after them.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service_fixtures import SAMPLE, load_market, ms
from shared import ood as ood_mod
from shared.drift import DriftModel, fit_drift
from shared.features import FeatureSpec, feature_matrix
from shared.labels import CLASSES, LabelSpec
from shared.ood import OodModel, fit_ood, ledoit_wolf_shrinkage, ood_scores
from shared.params import ForestParams
from shared.store.importers import read_candles
from shared.store.registry import ModelRecord, get_model, insert_model

SPLIT = 10_000  # candles of the sample the score is fitted on
SETTLE = 200  # candles after the split left out, so no later feature window reaches back across it

OHLC = ("open", "high", "low", "close")


def _columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return {c: frame[c].to_numpy(np.float64) for c in (*OHLC, "volume")}


def _finite(X: np.ndarray) -> np.ndarray:
    return X[np.isfinite(X).all(axis=1)]


def scaled_volatility(columns: dict[str, np.ndarray], start: int, factor: float = 10.0) -> dict[str, np.ndarray]:
    """Candles from `start` on with every log return and every intra-candle log offset (open, high, low against the
    close) multiplied by `factor`, and prices `factor` times higher: the same market with tenfold volatility."""
    log_close = np.log(columns["close"])
    r = np.diff(log_close)
    r[start - 1:] *= factor
    new_log_close = log_close[0] + np.concatenate([[0.0], np.cumsum(r)])
    new_log_close[start:] += np.log(factor)
    out = {"close": np.exp(new_log_close), "volume": columns["volume"].copy()}
    for c in ("open", "high", "low"):
        offset = np.log(columns[c]) - log_close
        offset[start:] *= factor
        out[c] = np.exp(new_log_close + offset)
    return out


@pytest.fixture(scope="module")
def sample_columns() -> dict[str, np.ndarray]:
    return _columns(read_candles(SAMPLE, "1h"))


@pytest.fixture(scope="module")
def features(sample_columns) -> np.ndarray:
    return feature_matrix(sample_columns, FeatureSpec())


@pytest.fixture(scope="module")
def train_rows(features) -> np.ndarray:
    return _finite(features[:SPLIT]).astype(np.float32)  # float32, as training stores them


@pytest.fixture(scope="module")
def model(train_rows) -> OodModel:
    return fit_ood(train_rows)


# ------------------------------------------------------------------------------------------------------------------
# flag rate and what is flagged


def test_the_flag_rate_on_the_training_rows_is_one_percent(model, train_rows):
    assert 0.005 <= model.rate_train <= 0.02
    assert model.rate_train == pytest.approx(0.01, abs=1e-3)
    assert np.mean(model.flags(train_rows)) == model.rate_train  # the stored rate is the score's own
    assert model.n_train == len(train_rows) and model.n_features == len(FeatureSpec().feature_names)


@pytest.mark.parametrize("kind", ["normal", "student-t 3", "lognormal", "correlated", "few rows"])
def test_the_flag_rate_on_random_training_rows_is_one_percent(kind):
    rng = np.random.default_rng(7)
    n, k = (150, 18) if kind == "few rows" else (20_000, 18)
    X = {
        "normal": lambda: rng.normal(size=(n, k)),
        "student-t 3": lambda: rng.standard_t(3, size=(n, k)),
        "lognormal": lambda: rng.lognormal(sigma=1.5, size=(n, k)),
        "correlated": lambda: rng.normal(size=(n, k)) @ rng.normal(size=(k, k)),
        "few rows": lambda: rng.normal(size=(n, k)),
    }[kind]()
    m = fit_ood(X)
    assert 0.005 <= m.rate_train <= 0.02
    assert 0.005 <= np.mean(m.flags(X)) <= 0.02


def test_candles_with_tenfold_volatility_are_flagged_and_untouched_ones_are_not(model, sample_columns, features):
    scaled = feature_matrix(scaled_volatility(sample_columns, SPLIT), FeatureSpec())
    later_scaled = _finite(scaled[SPLIT + SETTLE:])
    later = _finite(features[SPLIT + SETTLE:])
    assert len(later) == len(later_scaled) > 5000
    scaled_rate, untouched_rate = np.mean(model.flags(later_scaled)), np.mean(model.flags(later))
    print(f"\nflagged: {scaled_rate:.1%} of {len(later)} candles with tenfold volatility, "
          f"{untouched_rate:.2%} of the same candles untouched")
    assert scaled_rate > 0.6
    assert untouched_rate < 0.02
    # the scaled candles are further out than the untouched ones, candle by candle
    assert np.median(model.scores(later_scaled) / model.scores(later)) > 2


def test_the_score_is_the_mahalanobis_distance_under_the_shrunk_covariance():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(4000, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6) * 10
    m = fit_ood(X)
    X = X.astype(np.float32).astype(np.float64)
    mean, std = X.mean(axis=0), X.std(axis=0)
    corr = np.corrcoef(X, rowvar=False)
    cov = ((1 - m.shrinkage) * corr + m.shrinkage * np.eye(6)) * np.outer(std, std)
    d = X[:50] - mean
    expected = np.sqrt(np.einsum("ri,ij,rj->r", d, np.linalg.inv(cov), d))
    np.testing.assert_allclose(m.scores(X[:50]), expected, rtol=1e-9)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-12)


def test_the_shrinkage_is_ledoit_wolfs():
    from sklearn.covariance import ledoit_wolf_shrinkage as sklearn_shrinkage

    rng = np.random.default_rng(4)
    for n, k in ((60, 18), (500, 18), (5000, 5)):
        Z = rng.standard_t(4, size=(n, k)) @ rng.normal(size=(k, k))
        Z = Z - Z.mean(axis=0)
        assert ledoit_wolf_shrinkage(Z) == pytest.approx(sklearn_shrinkage(Z, assume_centered=True), rel=1e-9)


def test_near_singular_and_constant_features_keep_every_score_finite():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(3000, 4))
    X = np.column_stack([a, a[:, 0] + 1e-7 * rng.normal(size=3000),  # almost collinear with column 0
                         a[:, 1],  # an exact duplicate
                         np.full(3000, 0.25),  # constant
                         a[:, 2] * 3 - a[:, 3]])  # an exact linear combination
    m = fit_ood(X)
    assert np.isfinite(m.whitening).all() and np.isfinite(m.threshold)
    assert m.shrinkage >= ood_mod.MIN_SHRINKAGE
    s = m.scores(X)
    assert np.isfinite(s).all() and 0.005 <= m.rate_train <= 0.02
    # breaking the collinearity, or moving the constant feature, is out of distribution
    broken = X[:100].copy()
    broken[:, 4] = broken[:, 0] + 1.0
    assert m.flags(broken).all()
    moved = X[:100].copy()
    moved[:, 6] += 50.0
    assert m.flags(moved).all()


def test_rows_that_are_not_finite_score_nan_and_leave_the_others_alone(model, train_rows):
    X = train_rows[:40].astype(np.float64)
    clean = model.scores(X)
    X[3, 0] = np.nan
    X[7, 5] = np.inf
    X[9, 2] = -np.inf
    X[11, 1] = 1e39  # finite, beyond float32: infinitely far for the forest, which sees float32
    s = model.scores(X)
    assert np.isnan(s[[3, 7, 9]]).all()
    assert s[11] == np.inf and model.flags(X)[11]
    assert not model.flags(X)[[3, 7, 9]].any()  # NaN is not flagged
    others = np.setdiff1d(np.arange(40), [3, 7, 9, 11])
    assert np.array_equal(s[others], clean[others])
    assert model.scores(np.empty((0, model.n_features))).shape == (0,)
    with pytest.raises(ValueError, match="matrix"):
        model.scores(X[:, :5])


# ------------------------------------------------------------------------------------------------------------------
# stream = batch


def _assert_row_independent(m: OodModel, X: np.ndarray, rng: np.random.Generator) -> None:
    full = ood_scores(m, X)
    alone = np.array([ood_scores(m, X[i:i + 1])[0] for i in range(len(X))])
    assert np.array_equal(alone, full, equal_nan=True)  # == on every row, not approx
    for _ in range(60):
        a = int(rng.integers(0, len(X)))
        b = int(rng.integers(a, min(len(X), a + int(rng.choice([2, 7, 31, 32, 33, 100, 1024, 5000]))) + 1))
        assert np.array_equal(ood_scores(m, X[a:b]), full[a:b], equal_nan=True)
    reversed_ = ood_scores(m, X[::-1].copy())
    assert np.array_equal(reversed_[::-1], full, equal_nan=True)


def test_stream_equals_batch_bit_for_bit_on_random_rows():
    rng = np.random.default_rng(11)
    X = rng.standard_t(3, size=(6000, 18)) * rng.lognormal(sigma=2.0, size=18)  # crosses a block boundary
    m = fit_ood(X[:3000])
    X[17, 4] = np.nan
    _assert_row_independent(m, X, rng)


def test_stream_equals_batch_bit_for_bit_on_real_features(model, features):
    rng = np.random.default_rng(12)
    X = features[SPLIT - 2000:]  # float64, as inference computes them; rows still warming up are NaN
    assert np.isnan(X).any() or len(X) > 5000
    _assert_row_independent(model, X, rng)
    # the float32 rows the forest is fed score the same bits as the float64 features
    assert np.array_equal(ood_scores(model, X.astype(np.float32)), ood_scores(model, X), equal_nan=True)


def test_the_two_summation_ways_agree_bit_for_bit(model, features):
    X = _finite(features[SPLIT:]).astype(np.float32).astype(np.float64)
    d = X[:3000] - model.mean
    assert np.array_equal(ood_mod._scores_accumulate(d, model.whitening),
                          ood_mod._scores_vector_adds(d, model.whitening))


def test_the_cost_of_one_row_and_of_a_thousand(model, features):
    X = _finite(features[SPLIT:])
    one, many = X[:1], X[:1024]

    def best(rows: np.ndarray, number: int) -> float:
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(number):
                ood_scores(model, rows)
            times.append((time.perf_counter() - t0) / number)
        return min(times)

    t1, t1024 = best(one, 500), best(many, 10)
    print(f"\nood_scores cost: {t1 * 1e6:.1f} us for 1 row, {t1024 * 1e3:.2f} ms for 1,024 rows "
          f"({t1024 / 1024 * 1e6:.2f} us a row)")
    assert t1 < 1e-3 and t1024 < 0.1  # loose bounds: a shared machine, the figures are in the output


# ------------------------------------------------------------------------------------------------------------------
# storage


def test_to_dict_round_trips_exactly_through_json(model, features):
    stored = json.loads(json.dumps(model.to_dict()))
    back = OodModel.from_dict(stored)
    assert back == model and back.to_dict() == model.to_dict()
    assert np.array_equal(back.whitening, model.whitening) and np.array_equal(back.mean, model.mean)
    assert back.threshold == model.threshold and back.rate_train == model.rate_train
    X = features[SPLIT:]
    assert np.array_equal(back.scores(X), model.scores(X), equal_nan=True)
    assert not model.mean.flags.writeable and not model.whitening.flags.writeable


def test_an_unknown_stored_version_is_refused(model):
    with pytest.raises(ValueError, match="version"):
        OodModel.from_dict({**model.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="unknown OOD model"):
        OodModel.from_dict({**model.to_dict(), "method": "isolation-forest"})


def _record(model_id: str, ood: OodModel | None, drift: DriftModel | None) -> ModelRecord:
    return ModelRecord(
        model_id=model_id, symbol="BTC/USD", timeframe="1h", created_at_ms=1_600_000_000_000, train_start_ms=0,
        train_end_ms=1, label=LabelSpec(), feature_spec=FeatureSpec(), params=ForestParams(), classes=CLASSES,
        prior=(0.3, 0.4, 0.3), shrink_weight=0.5, metrics={"log_loss": 1.0}, artifact=f"{model_id}.onnx",
        sha256="0" * 64, ood=ood, drift=drift,
    )


@pytest.fixture
def engine(tmp_path):
    from shared.store.db import make_engine
    from shared.store.migrate import upgrade

    url = f"sqlite:///{tmp_path}/registry.db"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def test_the_manifest_round_trips_through_the_registry(engine, model, train_rows):
    drift = fit_drift(train_rows)
    with engine.begin() as conn:
        insert_model(conn, _record("with-signals", model, drift))
        insert_model(conn, _record("before-signals", None, None))
    back = get_model(engine, "with-signals")
    assert back is not None and back.ood == model and back.drift == drift
    assert np.array_equal(back.ood.whitening, model.whitening) and back.ood.threshold == model.threshold
    assert np.array_equal(back.drift.edges, drift.edges)
    old = get_model(engine, "before-signals")
    assert old is not None and old.ood is None and old.drift is None  # a model from before has neither
    assert "ood" not in old.manifest() and "drift" not in old.manifest()


# ------------------------------------------------------------------------------------------------------------------
# training


def _random_walk(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.015, n)))
    open_ = np.concatenate([[100.0], close[:-1]])
    spread = np.abs(rng.normal(0.0, 0.004, n)) * close
    return pd.DataFrame({
        "open_time_ms": 1_514_764_800_000 + 3_600_000 * np.arange(n, dtype=np.int64),
        "open": open_, "high": np.maximum(open_, close) + spread, "low": np.minimum(open_, close) - spread,
        "close": close, "volume": rng.uniform(1.0, 10.0, n),
    })


def test_training_fits_both_on_the_window_and_stores_the_metrics():
    from training_service.pipeline import build_dataset, train

    frame, label = _random_walk(3000), LabelSpec(horizon_bars=12)
    trained = train(frame, label, ForestParams(n_estimators=4, min_samples_leaf=20), n_jobs=1, cv_folds=0,
                    importance_repeats=0)
    m = trained.metrics
    X = build_dataset(frame, label).X  # every labelled row: the registered forest's rows
    assert trained.ood is not None and trained.drift is not None
    assert trained.ood == fit_ood(X) and trained.drift == fit_drift(X)
    assert m["ood_threshold"] == trained.ood.threshold and m["ood_rate_train"] == trained.ood.rate_train
    assert 0.005 <= m["ood_rate_train"] <= 0.02
    assert 0.0 <= m["ood_rate_test"] <= 1.0 and m["test_ood_rows"] == round(m["ood_rate_test"] * m["n_test"])
    assert m["test_in_distribution_log_loss_ratio"] > 0
    assert ("test_ood_log_loss_ratio" in m) == (m["test_ood_rows"] > 0)
    assert 0.0 < m["test_expected_log_loss"] < np.log(3) + 1e-9 and m["test_psi_max"] >= 0.0
    assert all(np.isfinite(v) for v in m.values())  # metrics are JSON: no NaN
    json.dumps(m, allow_nan=False)


def test_a_trained_model_reaches_the_registry_with_its_signals(tmp_path, sample_frame):
    """The real path: worker.train_job's result, the scheduler's registration, the registry row."""
    from shared.store.db import make_engine
    from training_service.jobs import SUCCEEDED, JobStore, TrainingRequest
    from training_service.scheduler import Scheduler

    url = f"sqlite:///{tmp_path}/mlsignal.db"
    t = sample_frame["open_time_ms"]
    load_market(url, sample_frame[(t >= ms("2018-03-01")) & (t < ms("2018-08-01"))])
    engine = make_engine(url)
    scheduler = Scheduler(JobStore(engine), url, Path(tmp_path) / "models", workers=1, fit_jobs=1)
    done = threading.Event()
    scheduler.on_job_finished = lambda job: done.set()
    scheduler.start()
    try:
        request = TrainingRequest(symbol="BTC/USD", timeframe="1h", start_ms=ms("2018-03-01"),
                                  end_ms=ms("2018-08-01"), params=ForestParams(n_estimators=8), cv_folds=0)
        job_id = scheduler.submit(request).job_id
        assert done.wait(180), "the training job did not finish"
        job = scheduler.store.get_existing(job_id)
        assert job.state == SUCCEEDED, job.error
        record = get_model(engine, job.model_id)
    finally:
        scheduler.stop(0)
        engine.dispose()
    assert record is not None and record.ood is not None and record.drift is not None
    assert record.ood.threshold == record.metrics["ood_threshold"]
    assert record.ood.n_train == record.drift.n_train == record.metrics["n_rows"]
    window = sample_frame[(t >= ms("2018-03-01")) & (t < ms("2018-08-01"))]
    X = _finite(feature_matrix(_columns(window), record.feature_spec))
    assert 0.005 <= np.mean(record.ood.flags(X)) <= 0.02  # the window's candles, labelled or not
