"""Conversions between protobuf messages and the plain types both services use."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mlsignal.v1 import common_pb2
from shared.candles import CandleBatch
from shared.errors import InvalidArgument
from shared.labels import FIXED_HORIZON, TRIPLE_BARRIER, LabelSpec
from shared.params import ForestParams
from shared.store import registry
from shared.store.registry import ModelRecord
from shared.timeframes import ms_to_timestamp

CLASS_WEIGHT_TO_PROTO = {"none": common_pb2.CLASS_WEIGHT_NONE, "balanced": common_pb2.CLASS_WEIGHT_BALANCED}
LABEL_KIND_TO_PROTO = {
    FIXED_HORIZON: common_pb2.LABEL_KIND_FIXED_HORIZON,
    TRIPLE_BARRIER: common_pb2.LABEL_KIND_TRIPLE_BARRIER,
}
STAGE_TO_PROTO = {
    registry.CANDIDATE: common_pb2.MODEL_STAGE_CANDIDATE,
    registry.SERVING: common_pb2.MODEL_STAGE_SERVING,
    registry.REJECTED: common_pb2.MODEL_STAGE_REJECTED,
    registry.RETIRED: common_pb2.MODEL_STAGE_RETIRED,
    registry.RESEARCH: common_pb2.MODEL_STAGE_RESEARCH,
    registry.SHADOW: common_pb2.MODEL_STAGE_SHADOW,
}


def label_message(label: LabelSpec) -> common_pb2.LabelSpec:
    return common_pb2.LabelSpec(horizon_bars=label.horizon_bars, threshold=label.threshold,
                                kind=LABEL_KIND_TO_PROTO[label.kind], volatility_bars=label.volatility_bars,
                                volatility_multiple=label.volatility_multiple)


def params_message(p: ForestParams) -> common_pb2.ModelParams:
    """ModelParams with every default filled in (unlimited depth is -1, as in requests)."""
    return common_pb2.ModelParams(
        n_estimators=p.n_estimators,
        max_depth=-1 if p.max_depth is None else p.max_depth,
        min_samples_leaf=p.min_samples_leaf,
        class_weight=CLASS_WEIGHT_TO_PROTO[p.class_weight],
        random_state=p.random_state,
    )


def model_info(rec: ModelRecord) -> common_pb2.ModelInfo:
    p = rec.params
    return common_pb2.ModelInfo(
        model_id=rec.model_id,
        symbol=rec.symbol,
        timeframe=rec.timeframe,
        created_at=ms_to_timestamp(rec.created_at_ms),
        train_start=ms_to_timestamp(rec.train_start_ms),
        train_end=ms_to_timestamp(rec.train_end_ms),
        label=label_message(rec.label),
        features=list(rec.feature_spec.feature_names),
        warmup_bars=rec.warmup_bars,
        metrics={k: float(v) for k, v in rec.metrics.items()},
        sha256=rec.sha256,
        params=params_message(p),
        feature_set=rec.feature_spec.key,
        classes=list(rec.classes),
        stage=STAGE_TO_PROTO.get(rec.stage, common_pb2.MODEL_STAGE_UNSPECIFIED),
        stage_reason=rec.stage_reason,
    )


# --------------------------------------------------------------------------------------------------------------------
# candles


def candle_batch(
    candles: Sequence[common_pb2.Candle], funding_rate: bool = True, open_interest: bool = True
) -> CandleBatch:
    """Columns from repeated Candle messages; unset optional fields become NaN.

    Reading a field costs a Python attribute access per candle, so optional fields a model does not use are
    not read at all (left NaN), and the required ones are read in one pass, straight into their columns.
    """
    n = len(candles)
    if n == 1:
        return _one_candle(candles[0], funding_rate, open_interest)
    t = np.array([c.open_time_ms for c in candles], dtype=np.int64) if n else np.empty(0, np.int64)
    values = np.empty((7, n))  # open, high, low, close, volume, funding_rate, open_interest
    if n:
        values[:5].T[...] = [(c.open, c.high, c.low, c.close, c.volume) for c in candles]
    nan = math.nan
    if funding_rate:
        values[5] = [c.funding_rate if c.HasField("funding_rate") else nan for c in candles]
    else:
        values[5] = nan
    if open_interest:
        values[6] = [c.open_interest if c.HasField("open_interest") else nan for c in candles]
    else:
        values[6] = nan
    return CandleBatch(t, *values)


def _one_candle(c: common_pb2.Candle, funding_rate: bool, open_interest: bool) -> CandleBatch:
    """`candle_batch` of one candle (the live-stream case), without the list comprehensions."""
    nan = math.nan
    values = np.array([
        c.open, c.high, c.low, c.close, c.volume,
        c.funding_rate if funding_rate and c.HasField("funding_rate") else nan,
        c.open_interest if open_interest and c.HasField("open_interest") else nan,
    ])[:, None]
    return CandleBatch(np.array([c.open_time_ms], dtype=np.int64), *values)


VALUE_COLUMNS = ("open", "high", "low", "close", "volume")


def columns_batch(columns: common_pb2.CandleColumns) -> CandleBatch:
    """The batch of a CandleColumns message: every column the same length (INVALID_ARGUMENT naming the column
    otherwise); funding_rate and open_interest empty (all missing) or one per candle, NaN where missing.

    The lengths are compared before any column is copied; then each column is one array copy.
    """
    n = len(columns.open_time_ms)
    small = n <= SMALL_COLUMNS
    # A few candles (a stream step) are read as Python lists into one 2-D array: cheaper than eight conversions.
    values = [getattr(columns, name) for name in (*VALUE_COLUMNS, "funding_rate", "open_interest")]
    if small:
        values = [v[:] for v in values]
    for k, v in enumerate(values):
        m = len(v)
        if m != n and (k < 5 or m):
            name = (*VALUE_COLUMNS, "funding_rate", "open_interest")[k]
            expected = f"{n}" if k < 5 else f"0 (none) or {n}"
            raise InvalidArgument(
                f"columns.{name}: {m} values, expected {expected} (one per columns.open_time_ms"
                f"{', NaN where missing' if k >= 5 else ''})", field=f"columns.{name}")
    if small:
        missing = [math.nan] * n
        block = np.array([v if len(v) else missing for v in values], dtype=np.float64)
        return CandleBatch(np.array(columns.open_time_ms[:], dtype=np.int64), *block)
    t = np.asarray(columns.open_time_ms, dtype=np.int64)
    arrays = [np.asarray(v, dtype=np.float64) if len(v) else np.full(n, math.nan) for v in values]
    return CandleBatch(t, *arrays)


SMALL_COLUMNS = 32  # up to this many candles, columns are read through Python lists
