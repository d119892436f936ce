"""StartTrainingRequest validation and TrainingJob messages."""

from __future__ import annotations

import math

from google.protobuf import duration_pb2

from mlsignal.v1 import common_pb2, training_pb2
from shared.converters import (
    CLASS_WEIGHT_TO_PROTO,
    LABEL_KIND_TO_PROTO,
    STAGE_TO_PROTO,
    candle_batch,
    columns_batch,
    label_message,
    params_message,
)
from shared.errors import InvalidArgument
from shared.features import TRAINING_SPEC, TRAINING_SPECS
from shared.labels import FIXED_HORIZON, MAX_VOLATILITY_BARS, LabelSpec
from shared.params import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MIN_SAMPLES_LEAF,
    DEFAULT_N_ESTIMATORS,
    DEFAULT_RANDOM_STATE,
    MAX_DEPTH_LIMIT,
    MAX_N_ESTIMATORS,
    ForestParams,
)
from shared.store.policies import RetrainPolicy
from shared.store.registry import PRODUCTION, RESEARCH_PURPOSE
from shared.symbols import validate_symbol
from shared.timeframes import ms_to_iso, ms_to_timestamp, timeframe_ms
from training_service import policies
from training_service.candle_import import ImportBatch, ImportResult
from training_service.jobs import Job, TrainingRequest

MAX_HORIZON_BARS = 10_000
MAX_RANGE_MS = 50 * 366 * 86_400_000  # fifty years
# start_time and end_time must lie in the range of times candles can be stored with (the importers' range).
EARLIEST_TIME_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
LATEST_TIME_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z
# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
PROTO_MIN_SECONDS = -62_135_596_800
PROTO_MAX_SECONDS = 253_402_300_799

STATE_TO_PROTO = {
    "QUEUED": training_pb2.JOB_STATE_QUEUED,
    "RUNNING": training_pb2.JOB_STATE_RUNNING,
    "SUCCEEDED": training_pb2.JOB_STATE_SUCCEEDED,
    "FAILED": training_pb2.JOB_STATE_FAILED,
    "CANCELLED": training_pb2.JOB_STATE_CANCELLED,
}
PROTO_TO_STATE = {v: k for k, v in STATE_TO_PROTO.items()}
PURPOSE_TO_PROTO = {
    PRODUCTION: training_pb2.TRAINING_PURPOSE_PRODUCTION,
    RESEARCH_PURPOSE: training_pb2.TRAINING_PURPOSE_RESEARCH,
}
PROTO_TO_PURPOSE = {v: k for k, v in PURPOSE_TO_PROTO.items()} | {training_pb2.TRAINING_PURPOSE_UNSPECIFIED: PRODUCTION}
PROTO_TO_LABEL_KIND = {v: k for k, v in LABEL_KIND_TO_PROTO.items()} | {
    common_pb2.LABEL_KIND_UNSPECIFIED: FIXED_HORIZON
}


def _bad(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {message}", field=field)


def market(symbol: str, timeframe: str) -> tuple[str, str]:
    """A validated (symbol, timeframe); InvalidArgument names the field."""
    try:
        symbol = validate_symbol(symbol)
    except InvalidArgument as exc:
        raise _bad("symbol", str(exc)) from None
    try:
        timeframe_ms(timeframe)
    except ValueError as exc:
        raise _bad("timeframe", str(exc)) from None
    return symbol, timeframe


def _time_ms(msg: training_pb2.StartTrainingRequest, field: str) -> int | None:
    """A Timestamp field as epoch milliseconds (None when unset); InvalidArgument names the field when it is not a
    valid Timestamp or lies outside EARLIEST_TIME_MS..LATEST_TIME_MS."""
    if not msg.HasField(field):
        return None
    t = getattr(msg, field)
    if not (0 <= t.nanos <= 999_999_999 and PROTO_MIN_SECONDS <= t.seconds <= PROTO_MAX_SECONDS):
        raise _bad(field, f"is not a valid Timestamp (seconds {t.seconds}, nanos {t.nanos}); expected a time "
                          f"between {ms_to_iso(EARLIEST_TIME_MS)} and {ms_to_iso(LATEST_TIME_MS)}")
    ms = t.ToMilliseconds()
    if not EARLIEST_TIME_MS <= ms < LATEST_TIME_MS:
        raise _bad(field, f"{t.ToJsonString()} is outside {ms_to_iso(EARLIEST_TIME_MS)} .. "
                          f"{ms_to_iso(LATEST_TIME_MS)}")
    return ms


def training_request(msg: training_pb2.StartTrainingRequest) -> TrainingRequest:
    """Validate a StartTrainingRequest and fill in the documented defaults; InvalidArgument names the field."""
    symbol, _ = market(msg.symbol, msg.timeframe)
    start_ms = _time_ms(msg, "start_time")
    end_ms = _time_ms(msg, "end_time")
    if start_ms is not None and end_ms is not None:
        if start_ms >= end_ms:
            raise _bad("start_time", f"must be before end_time ({msg.start_time.ToJsonString()} is not before "
                                     f"{msg.end_time.ToJsonString()})")
        if end_ms - start_ms > MAX_RANGE_MS:
            raise _bad("end_time", "the range from start_time to end_time may span at most 50 years")

    horizon = msg.label.horizon_bars or 24
    if not 1 <= horizon <= MAX_HORIZON_BARS:
        raise _bad("label.horizon_bars", f"must be between 1 and {MAX_HORIZON_BARS} (0 means 24), got {horizon}")
    threshold = msg.label.threshold or 0.02
    if not (math.isfinite(threshold) and 0 < threshold < 1):
        raise _bad("label.threshold",
                   f"must be a fraction in (0, 1), e.g. 0.02 for 2 % (0 means 0.02), got {threshold}")
    if msg.label.kind not in PROTO_TO_LABEL_KIND:
        raise _bad("label.kind", f"unknown label kind {msg.label.kind}")
    kind = PROTO_TO_LABEL_KIND[msg.label.kind]
    if msg.purpose not in PROTO_TO_PURPOSE:
        raise _bad("purpose", f"unknown training purpose {msg.purpose}")
    vol_bars, vol_k = msg.label.volatility_bars, msg.label.volatility_multiple
    if not (vol_bars == 0 or 2 <= vol_bars <= MAX_VOLATILITY_BARS):
        raise _bad("label.volatility_bars",
                   f"must be 0 (a fixed threshold) or between 2 and {MAX_VOLATILITY_BARS}, got {vol_bars}")
    if not (math.isfinite(vol_k) and 0 <= vol_k <= 100):
        raise _bad("label.volatility_multiple", f"must be a number between 0 and 100, got {vol_k}")
    if (vol_bars > 0) != (vol_k > 0):
        missing = "label.volatility_multiple" if vol_bars else "label.volatility_bars"
        raise _bad(missing, f"a volatility-scaled barrier needs both label.volatility_bars and "
                            f"label.volatility_multiple (got {vol_bars} and {vol_k}); set both, or neither for the "
                            "fixed threshold")
    if vol_bars and PROTO_TO_PURPOSE[msg.purpose] != RESEARCH_PURPOSE:
        raise _bad("label.volatility_bars",
                   "a volatility-scaled barrier is for research models only (purpose TRAINING_PURPOSE_RESEARCH): "
                   "live scoring keeps the candles from each prediction on, not the volatility_bars before it")

    feature_set = msg.feature_set or TRAINING_SPEC.key
    if feature_set not in TRAINING_SPECS:
        raise _bad("feature_set", f"must be empty (the default, {TRAINING_SPEC.key}) or one of "
                                  f"{', '.join(TRAINING_SPECS)}, got {msg.feature_set!r}")

    p = msg.params
    n_estimators = p.n_estimators or DEFAULT_N_ESTIMATORS
    if not 1 <= n_estimators <= MAX_N_ESTIMATORS:
        raise _bad("params.n_estimators",
                   f"must be between 1 and {MAX_N_ESTIMATORS} (0 means {DEFAULT_N_ESTIMATORS}), got {n_estimators}")
    if p.max_depth == 0:
        max_depth = DEFAULT_MAX_DEPTH
    elif p.max_depth == -1:
        max_depth = None
    elif 1 <= p.max_depth <= MAX_DEPTH_LIMIT:
        max_depth = p.max_depth
    else:
        raise _bad("params.max_depth",
                   f"must be between 1 and {MAX_DEPTH_LIMIT}, -1 for unlimited or 0 for the default "
                   f"({DEFAULT_MAX_DEPTH}), got {p.max_depth}")
    leaf = p.min_samples_leaf or DEFAULT_MIN_SAMPLES_LEAF
    if not 1 <= leaf <= 1_000_000:
        raise _bad("params.min_samples_leaf",
                   f"must be between 1 and 1000000 (0 means {DEFAULT_MIN_SAMPLES_LEAF}), got {leaf}")
    weights = {v: k for k, v in CLASS_WEIGHT_TO_PROTO.items()}
    if p.class_weight == common_pb2.CLASS_WEIGHT_UNSPECIFIED:
        class_weight = "none"
    elif p.class_weight in weights:
        class_weight = weights[p.class_weight]
    else:
        raise _bad("params.class_weight", f"unknown value {p.class_weight}")
    seed = p.random_state if p.HasField("random_state") else DEFAULT_RANDOM_STATE
    if not 0 <= seed < 2**32:
        raise _bad("params.random_state", f"must be between 0 and 2**32-1, got {seed}")

    return TrainingRequest(
        symbol=symbol,
        timeframe=msg.timeframe,
        start_ms=start_ms,
        end_ms=end_ms,
        label=LabelSpec(horizon_bars=horizon, threshold=threshold, kind=kind, volatility_bars=vol_bars,
                        volatility_multiple=vol_k),
        params=ForestParams(n_estimators=n_estimators, max_depth=max_depth, min_samples_leaf=leaf,
                            class_weight=class_weight, random_state=seed),
        purpose=PROTO_TO_PURPOSE[msg.purpose],
        feature_set=feature_set,
    )


def request_message(req: TrainingRequest) -> training_pb2.StartTrainingRequest:
    return training_pb2.StartTrainingRequest(
        symbol=req.symbol,
        timeframe=req.timeframe,
        start_time=ms_to_timestamp(req.start_ms),
        end_time=ms_to_timestamp(req.end_ms),
        label=label_message(req.label),
        params=params_message(req.params),
        purpose=PURPOSE_TO_PROTO[req.purpose],
        feature_set=req.feature_set,
    )


def job_message(job: Job) -> training_pb2.TrainingJob:
    return training_pb2.TrainingJob(
        job_id=job.job_id,
        state=STATE_TO_PROTO[job.state],
        progress=job.progress,
        stage=job.stage,
        error=job.error,
        model_id=job.model_id,
        request=request_message(job.request),
        created_at=ms_to_timestamp(job.created_at_ms),
        started_at=ms_to_timestamp(job.started_at_ms),
        finished_at=ms_to_timestamp(job.finished_at_ms),
        metrics={k: float(v) for k, v in job.metrics.items()},
    )


def stage_changes_response(changes: list) -> training_pb2.ListModelStageChangesResponse:
    """Stage changes (registry.StageChange, oldest first) as a ListModelStageChangesResponse."""
    return training_pb2.ListModelStageChangesResponse(changes=[
        training_pb2.ModelStageChange(
            model_id=c.model_id, symbol=c.symbol, timeframe=c.timeframe,
            stage=STAGE_TO_PROTO.get(c.stage, common_pb2.MODEL_STAGE_UNSPECIFIED), reason=c.reason,
            changed_at=ms_to_timestamp(c.changed_at_ms),
        )
        for c in changes
    ])


# -- retrain policies --------------------------------------------------------------------------------------------------
# google.protobuf.Duration's valid range: +-315,576,000,000 seconds (10,000 years).
PROTO_MAX_DURATION_SECONDS = 315_576_000_000


def _duration_ms(msg: training_pb2.RetrainPolicy, field: str) -> int:
    """A required, positive Duration field as whole milliseconds; InvalidArgument names the field."""
    if not msg.HasField(field):
        raise _bad(field, "is required: a duration such as 1d (every) or 365d (window)")
    d = getattr(msg, field)
    if not (0 <= d.seconds <= PROTO_MAX_DURATION_SECONDS and 0 <= d.nanos <= 999_999_999):
        raise _bad(field, f"must be a positive duration (seconds {d.seconds}, nanos {d.nanos})")
    if d.nanos % 1_000_000:
        raise _bad(field, f"must be whole milliseconds, got {d.seconds}s {d.nanos}ns")
    ms = d.seconds * 1000 + d.nanos // 1_000_000
    if ms <= 0:
        raise _bad(field, "must be a positive duration")
    return ms


def retrain_policy(msg: training_pb2.RetrainPolicy) -> RetrainPolicy:
    """Validate a RetrainPolicy (symbol, timeframe, label and params as StartTraining validates them; `every` and
    `window` against the timeframe and the label) with the documented defaults filled in; InvalidArgument names the
    field. The output-only fields are ignored."""
    req = training_request(training_pb2.StartTrainingRequest(symbol=msg.symbol, timeframe=msg.timeframe,
                                                             label=msg.label, params=msg.params))
    policy = RetrainPolicy(symbol=req.symbol, timeframe=req.timeframe, every_ms=_duration_ms(msg, "every"),
                           window_ms=_duration_ms(msg, "window"), label=req.label, params=req.params,
                           paused=msg.paused, cross_validate=msg.cross_validate)
    return policies.validate(policy)


def _duration(ms: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(ms)
    return d


def policy_message(p: RetrainPolicy) -> training_pb2.RetrainPolicy:
    return training_pb2.RetrainPolicy(
        symbol=p.symbol, timeframe=p.timeframe, every=_duration(p.every_ms), window=_duration(p.window_ms),
        label=label_message(p.label), params=params_message(p.params), paused=p.paused,
        cross_validate=p.cross_validate,
        next_run_at=ms_to_timestamp(p.next_run_at_ms), last_job_id=p.last_job_id, last_outcome=p.last_outcome,
    )


# -- ImportCandles ---------------------------------------------------------------------------------------------


def import_batch(msg: training_pb2.ImportCandlesRequest) -> ImportBatch:
    """An ImportCandlesRequest's market and candles, rows or columns (never both: INVALID_ARGUMENT); unset optional
    values are NaN. The candles themselves are checked by `candle_import`."""
    columnar = msg.HasField("columns")
    if columnar and len(msg.candles):
        raise InvalidArgument(
            "candles, columns: a message carries its candles either as candles or as columns, not both",
            field="columns")
    batch = columns_batch(msg.columns) if columnar else candle_batch(msg.candles)
    return ImportBatch(symbol=msg.symbol, timeframe=msg.timeframe, candles=batch, columnar=columnar)


def import_response(result: ImportResult) -> training_pb2.ImportCandlesResponse:
    return training_pb2.ImportCandlesResponse(inserted=result.inserted, unchanged=result.unchanged,
                                              conflicting=result.conflicting,
                                              last_open_time_ms=result.last_open_time_ms)
