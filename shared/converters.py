"""Conversions between protobuf messages and the plain types both services use."""

from __future__ import annotations

from mlsignal.v1 import common_pb2
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
}


def label_message(label: LabelSpec) -> common_pb2.LabelSpec:
    return common_pb2.LabelSpec(horizon_bars=label.horizon_bars, threshold=label.threshold,
                                kind=LABEL_KIND_TO_PROTO[label.kind])


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
