"""Conversions between protobuf messages and the plain types both services use."""

from __future__ import annotations

from mlsignal.v1 import common_pb2
from shared.params import ForestParams
from shared.store.registry import ModelRecord
from shared.timeframes import ms_to_timestamp

CLASS_WEIGHT_TO_PROTO = {"none": common_pb2.CLASS_WEIGHT_NONE, "balanced": common_pb2.CLASS_WEIGHT_BALANCED}


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
        label=common_pb2.LabelSpec(horizon_bars=rec.label.horizon_bars, threshold=rec.label.threshold),
        features=list(rec.feature_spec.feature_names),
        warmup_bars=rec.warmup_bars,
        metrics={k: float(v) for k, v in rec.metrics.items()},
        sha256=rec.sha256,
        params=params_message(p),
        feature_set=rec.feature_spec.key,
        classes=list(rec.classes),
    )
