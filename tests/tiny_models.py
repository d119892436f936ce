"""Real models that cost milliseconds: tiny forests on random features, exported to ONNX and registered directly.

They answer through the whole serving path (registry, sha256, ONNX Runtime, features from the model's spec) without
a training job, so a test can put hundreds of markets, each with its own model, behind one inference server.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sklearn.ensemble import RandomForestClassifier

from inference_service.domain import CandleBatch
from mlsignal.v1 import common_pb2
from shared.artifacts import write_atomic
from shared.features import FeatureSpec
from shared.labels import CLASSES, LabelSpec
from shared.params import ForestParams
from shared.store.registry import SERVING, ModelRecord, insert_model
from training_service.pipeline import export_onnx

H = 3_600_000
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z


@functools.cache
def tiny_onnx(seed: int = 0, n_features: int | None = None) -> bytes:
    """A five-tree forest on random features (the default feature count unless given), exported to ONNX."""
    rng = np.random.default_rng(seed)
    n = len(FeatureSpec().feature_names) if n_features is None else n_features
    X, y = rng.normal(size=(300, n)), rng.integers(0, 3, 300)
    forest = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=seed).fit(X, y)
    return export_onnx(forest, n)


def register(engine: sa.Engine, model_dir: Path, symbol: str, timeframe: str = "1h", *, model_id: str,
             seed: int = 0, spec: FeatureSpec | None = None, stage: str = SERVING) -> ModelRecord:
    """Register one tiny model of its own file; SERVING unless `stage` says otherwise."""
    spec = spec or FeatureSpec()
    sha = write_atomic(Path(model_dir) / f"{model_id}.onnx", tiny_onnx(seed, len(spec.feature_names)))
    record = ModelRecord(
        model_id=model_id, symbol=symbol, timeframe=timeframe, created_at_ms=T0, train_start_ms=T0 - 500 * H,
        train_end_ms=T0 - 100 * H, label=LabelSpec(), feature_spec=spec, params=ForestParams(n_estimators=5,
                                                                                               max_depth=3),
        classes=CLASSES, prior=(0.3, 0.4, 0.3), shrink_weight=0.6, metrics={}, artifact=f"{model_id}.onnx",
        sha256=sha, stage=stage,
    )
    with engine.begin() as conn:
        insert_model(conn, record)
    return record


def candles(n: int, seed: int = 0, funding_from: int | None = None) -> CandleBatch:
    """A random walk of valid hourly candles from T0; funding rate on candles funding_from.. when given."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    opn = np.concatenate([[100.0], close[:-1]])
    high = np.maximum(opn, close) * (1 + rng.uniform(0, 0.005, n))
    low = np.minimum(opn, close) * (1 - rng.uniform(0, 0.005, n))
    funding = rng.normal(1e-4, 3e-4, n)
    if funding_from is None:
        funding[:] = np.nan
    else:
        funding[:funding_from] = np.nan
    return CandleBatch(T0 + H * np.arange(n, dtype=np.int64), opn, high, low, close, rng.uniform(1, 10, n),
                       funding, np.full(n, np.nan))


def messages(batch: CandleBatch, start: int, stop: int) -> list[common_pb2.Candle]:
    """Candles start..stop-1 as protobuf messages (funding rate set only where it is known)."""
    out = []
    for i in range(start, stop):
        c = common_pb2.Candle(open_time_ms=int(batch.open_time_ms[i]), open=float(batch.open[i]),
                              high=float(batch.high[i]), low=float(batch.low[i]), close=float(batch.close[i]),
                              volume=float(batch.volume[i]))
        if np.isfinite(batch.funding_rate[i]):
            c.funding_rate = float(batch.funding_rate[i])
        out.append(c)
    return out


def write_scores(engine: sa.Engine, model_id: str, symbol: str, loss: np.ndarray, prior_loss: np.ndarray,
                 timeframe: str = "1h", start_ms: int = T0) -> None:
    """Live scores of a model as the prediction journal writes them, one per candle from `start_ms` (labels and
    probabilities are placeholders the live test does not read; the losses are what it pairs)."""
    from shared.store.db import live_scores

    rows = [{"model_id": model_id, "open_time": start_ms + i * H, "symbol": symbol, "timeframe": timeframe,
             "label": 1, "p_down": 1 / 3, "p_range": 1 / 3, "p_up": 1 / 3, "loss": float(a), "prior_loss": float(b),
             "brier": 0.5, "scored_at": start_ms} for i, (a, b) in enumerate(zip(loss, prior_loss, strict=True))]
    with engine.begin() as conn:
        conn.execute(live_scores.insert(), rows)
