"""Served probabilities through a real inference server on the native forest runtime equal scikit-learn's
`predict_proba` of the registered forest, then calibration, to 1e-12: for every kind of model training makes (fixed
horizon, triple barrier, funding-rate features), over rows and columns, for one row and many; a stream fed one
candle at a time still answers bit for bit what one Predict does; and with MLSIGNAL_FOREST_RUNTIME=onnx the same
models answer through ONNX Runtime, within its float32 accuracy.

The models are trained by the real pipeline (`training_service.pipeline.train`) in this process and registered with
both files, as the training service registers them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from service_fixtures import ms
from shared.artifacts import read_verified, write_atomic
from shared.calibration import shrink_to_prior
from shared.features import compute_features
from shared.labels import CLASSES, TRIPLE_BARRIER, LabelSpec
from shared.params import ForestParams
from shared.settings import Settings
from shared.store.db import make_engine
from shared.store.migrate import upgrade
from shared.store.registry import SERVING, ModelRecord, insert_model
from training_service.pipeline import train

TF = "1h"
PARAMS = ForestParams(n_estimators=12)
PARITY = 1e-12


@dataclass(frozen=True)
class Kind:
    symbol: str
    label: LabelSpec
    funding: bool


KINDS = [Kind("FH/USD", LabelSpec(), False), Kind("TB/USD", LabelSpec(kind=TRIPLE_BARRIER), False),
         Kind("FR/USD", LabelSpec(), True)]


def _with_funding(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["funding_rate"] = 1e-4 * np.sin(np.arange(len(out)) / 7.0)
    return out


@pytest.fixture(scope="module")
def windows(sample_frame) -> tuple[pd.DataFrame, pd.DataFrame]:
    t = sample_frame.open_time_ms
    fit = sample_frame[(t >= ms("2018-01-01")) & (t < ms("2018-05-01"))].reset_index(drop=True)
    held = sample_frame[(t >= ms("2018-06-01")) & (t < ms("2018-08-15"))].reset_index(drop=True)
    return fit, held


@pytest.fixture(scope="module")
def registered(tmp_path_factory, windows) -> tuple[str, Path, dict[str, ModelRecord]]:
    fit, _ = windows
    root = tmp_path_factory.mktemp("forest-runtime")
    url, model_dir = f"sqlite:///{root}/mlsignal.db", root / "models"
    upgrade(url)
    engine = make_engine(url)
    records = {}
    try:
        for kind in KINDS:
            m = train(_with_funding(fit) if kind.funding else fit, kind.label, PARAMS, n_jobs=1, cv_folds=0,
                      importance_repeats=0)
            assert m.spec.use_funding_rate == kind.funding
            model_id = kind.symbol.replace("/", "-").lower()
            rec = ModelRecord(
                model_id=model_id, symbol=kind.symbol, timeframe=TF, created_at_ms=ms("2018-05-02"),
                train_start_ms=m.train_start_ms, train_end_ms=m.train_end_ms, label=kind.label, feature_spec=m.spec,
                # a small forest on a short window may fit a weight of 0 (the prior alone), which would hide the forest
                params=PARAMS, classes=CLASSES, prior=tuple(m.prior), shrink_weight=max(m.shrink_weight, 0.7),
                metrics=m.metrics, artifact=f"{model_id}.onnx",
                sha256=write_atomic(model_dir / f"{model_id}.onnx", m.onnx_bytes),
                sklearn_artifact=f"{model_id}.joblib",
                sklearn_sha256=write_atomic(model_dir / f"{model_id}.joblib", m.sklearn_bytes),
                stage=SERVING, ood=m.ood, drift=m.drift,
            )
            with engine.begin() as conn:
                records[kind.symbol] = insert_model(conn, rec)
    finally:
        engine.dispose()
    return url, model_dir, records


@pytest.fixture(scope="module", params=["native", "onnx"])
def server(request, registered):
    from inference_service.server import start

    url, model_dir, _ = registered
    settings = Settings(database_url=url, model_dir=model_dir, model_poll_seconds=3600.0, live_monitoring=False,
                        forest_runtime=request.param)
    running = start(settings, "127.0.0.1:0")
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield request.param, running, inference_pb2_grpc.InferenceServiceStub(channel)
    channel.close()
    running.stop(0.5)


def _candles(frame: pd.DataFrame) -> list[common_pb2.Candle]:
    out = []
    for row in frame.itertuples(index=False):
        c = common_pb2.Candle(open_time_ms=int(row.open_time_ms), open=row.open, high=row.high, low=row.low,
                              close=row.close, volume=row.volume)
        fr = getattr(row, "funding_rate", math.nan)
        if not math.isnan(fr):
            c.funding_rate = fr
        out.append(c)
    return out


def _columns(frame: pd.DataFrame) -> common_pb2.CandleColumns:
    cols = common_pb2.CandleColumns(open_time_ms=frame.open_time_ms.tolist())
    for name in ("open", "high", "low", "close", "volume"):
        getattr(cols, name).extend(frame[name].to_numpy(float))
    if "funding_rate" in frame:
        cols.funding_rate.extend(frame["funding_rate"].to_numpy(float))
    return cols


def _rows_answer(resp) -> tuple[np.ndarray, np.ndarray]:
    p = np.array([[x.ml_down_prob, x.ml_range_prob, x.ml_up_prob] for x in resp.predictions])
    return p, np.array([x.ready for x in resp.predictions])


def _columns_answer(resp) -> tuple[np.ndarray, np.ndarray]:
    c = resp.columns
    return np.column_stack([c.ml_down_prob, c.ml_range_prob, c.ml_up_prob]), np.array(c.ready)


def _expected(rec: ModelRecord, model_dir: Path, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's predict_proba of the registered forest, shrunk toward the prior; and which rows are ready."""
    forest = joblib.load(io.BytesIO(read_verified(model_dir, rec.sklearn_artifact, rec.sklearn_sha256)))
    assert list(forest.classes_) == list(range(len(CLASSES)))
    X = compute_features(frame, rec.feature_spec).to_numpy()
    ok = np.isfinite(X).all(axis=1)
    p = np.full((len(frame), 3), np.nan)
    p[ok] = shrink_to_prior(forest.predict_proba(X[ok].astype(np.float32)), np.array(rec.prior), rec.shrink_weight)
    return p, ok


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.symbol)
def test_served_probabilities_are_scikit_learns(server, registered, windows, kind):
    runtime, running, stub = server
    _, model_dir, records = registered
    rec = records[kind.symbol]
    frame = _with_funding(windows[1]) if kind.funding else windows[1]
    expected, ok = _expected(rec, model_dir, frame)
    assert ok.sum() >= 300 and expected[ok].std(axis=0).min() > 1e-3  # the forest's numbers, row by row
    rows = stub.Predict(inference_pb2.PredictRequest(symbol=kind.symbol, timeframe=TF, candles=_candles(frame)),
                        timeout=60)
    cols = stub.Predict(inference_pb2.PredictRequest(symbol=kind.symbol, timeframe=TF, columns=_columns(frame)),
                        timeout=60)
    assert running.store.current(kind.symbol, TF).runtime == runtime
    for got, ready in (_rows_answer(rows), _columns_answer(cols)):
        assert np.array_equal(ready, ok)
        diff = np.max(np.abs(got[ok] - expected[ok]))
        if runtime == "native":
            assert diff <= PARITY
        else:
            assert 0 < diff < 1e-5  # ONNX Runtime sums float32 leaf values
    # one ready row alone: a request of exactly the warm-up
    w = rec.warmup_bars
    last = int(np.flatnonzero(ok)[-1])
    one = stub.Predict(inference_pb2.PredictRequest(symbol=kind.symbol, timeframe=TF,
                                                    candles=_candles(frame.iloc[last - w + 1:last + 1])), timeout=30)
    got, ready = _rows_answer(one)
    assert ready[-1] and not ready[:-1].any()
    assert np.max(np.abs(got[-1] - expected[last])) <= (PARITY if runtime == "native" else 1e-5)


def test_a_stream_one_candle_at_a_time_answers_what_predict_does_bit_for_bit(server, registered, windows):
    _, _, stub = server
    kind = KINDS[2]  # funding-rate features: every column travels
    frame = _with_funding(windows[1]).iloc[:300]
    batch, _ = _rows_answer(stub.Predict(
        inference_pb2.PredictRequest(symbol=kind.symbol, timeframe=TF, candles=_candles(frame)), timeout=60))
    reqs = [inference_pb2.PredictRequest(symbol=kind.symbol if i == 0 else "", timeframe=TF if i == 0 else "",
                                         candles=_candles(frame.iloc[i:i + 1])) for i in range(len(frame))]
    streamed = np.vstack([_rows_answer(r)[0] for r in stub.StreamPredict(iter(reqs), timeout=120)])
    assert streamed.tobytes() == batch.tobytes()


@pytest.mark.parametrize("runtime", ["onnx", "native"])
def test_shadow_models_run_on_the_servers_forest_runtime(registered, runtime, monkeypatch):
    """A market's SHADOW models are executed as the server's settings say, not as the environment does."""
    from dataclasses import replace

    from inference_service.shadows import Shadows

    url, model_dir, records = registered
    other = "native" if runtime == "onnx" else "onnx"
    monkeypatch.setenv("MLSIGNAL_FOREST_RUNTIME", other)  # what a shadow must not follow
    serving = records["FH/USD"]
    symbol = f"SH{runtime.upper()}/USD"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            insert_model(conn, replace(serving, model_id=f"shadow-{runtime}", symbol=symbol,
                                       stage="SHADOW"))
        shadows = Shadows(engine, model_dir, lambda *args: None, forest_runtime=runtime)
        loaded = shadows._load_market((symbol, TF))
        assert [m.model_id for m in loaded] == [f"shadow-{runtime}"]
        assert loaded[0].runtime == runtime
    finally:
        engine.dispose()
