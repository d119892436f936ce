from google.rpc import status_pb2 as _status_pb2
from mlsignal.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("symbol", "timeframe", "model_id", "candles", "columns")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CANDLES_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    model_id: str
    candles: _containers.RepeatedCompositeFieldContainer[_common_pb2.Candle]
    columns: _common_pb2.CandleColumns
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ..., model_id: _Optional[str] = ..., candles: _Optional[_Iterable[_Union[_common_pb2.Candle, _Mapping]]] = ..., columns: _Optional[_Union[_common_pb2.CandleColumns, _Mapping]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("open_time_ms", "ml_up_prob", "ml_down_prob", "ml_range_prob", "ready", "in_sample", "ood_score", "ood")
    OPEN_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    ML_UP_PROB_FIELD_NUMBER: _ClassVar[int]
    ML_DOWN_PROB_FIELD_NUMBER: _ClassVar[int]
    ML_RANGE_PROB_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    IN_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    OOD_SCORE_FIELD_NUMBER: _ClassVar[int]
    OOD_FIELD_NUMBER: _ClassVar[int]
    open_time_ms: int
    ml_up_prob: float
    ml_down_prob: float
    ml_range_prob: float
    ready: bool
    in_sample: bool
    ood_score: float
    ood: bool
    def __init__(self, open_time_ms: _Optional[int] = ..., ml_up_prob: _Optional[float] = ..., ml_down_prob: _Optional[float] = ..., ml_range_prob: _Optional[float] = ..., ready: bool = ..., in_sample: bool = ..., ood_score: _Optional[float] = ..., ood: bool = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model_id", "predictions", "columns", "error")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    columns: _common_pb2.PredictionColumns
    error: _status_pb2.Status
    def __init__(self, model_id: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., columns: _Optional[_Union[_common_pb2.PredictionColumns, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("symbol", "timeframe")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ...) -> None: ...

class GetLivePerformanceRequest(_message.Message):
    __slots__ = ("symbol", "timeframe", "model_id")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    model_id: str
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ..., model_id: _Optional[str] = ...) -> None: ...

class ReliabilityBin(_message.Message):
    __slots__ = ("class_name", "lower", "upper", "count", "mean_predicted", "observed_frequency")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_PREDICTED_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    lower: float
    upper: float
    count: int
    mean_predicted: float
    observed_frequency: float
    def __init__(self, class_name: _Optional[str] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ..., count: _Optional[int] = ..., mean_predicted: _Optional[float] = ..., observed_frequency: _Optional[float] = ...) -> None: ...

class LivePerformance(_message.Message):
    __slots__ = ("model_id", "scored", "log_loss", "prior_log_loss", "brier", "reliability", "first_open_time_ms", "last_open_time_ms", "prior_comparison", "worse_than_prior", "expected_log_loss", "ood_rate", "drift_candles", "drift")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    LOG_LOSS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_LOG_LOSS_FIELD_NUMBER: _ClassVar[int]
    BRIER_FIELD_NUMBER: _ClassVar[int]
    RELIABILITY_FIELD_NUMBER: _ClassVar[int]
    FIRST_OPEN_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_OPEN_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_COMPARISON_FIELD_NUMBER: _ClassVar[int]
    WORSE_THAN_PRIOR_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LOG_LOSS_FIELD_NUMBER: _ClassVar[int]
    OOD_RATE_FIELD_NUMBER: _ClassVar[int]
    DRIFT_CANDLES_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    scored: int
    log_loss: float
    prior_log_loss: float
    brier: float
    reliability: _containers.RepeatedCompositeFieldContainer[ReliabilityBin]
    first_open_time_ms: int
    last_open_time_ms: int
    prior_comparison: LiveComparison
    worse_than_prior: bool
    expected_log_loss: float
    ood_rate: float
    drift_candles: int
    drift: _containers.RepeatedCompositeFieldContainer[FeatureDrift]
    def __init__(self, model_id: _Optional[str] = ..., scored: _Optional[int] = ..., log_loss: _Optional[float] = ..., prior_log_loss: _Optional[float] = ..., brier: _Optional[float] = ..., reliability: _Optional[_Iterable[_Union[ReliabilityBin, _Mapping]]] = ..., first_open_time_ms: _Optional[int] = ..., last_open_time_ms: _Optional[int] = ..., prior_comparison: _Optional[_Union[LiveComparison, _Mapping]] = ..., worse_than_prior: bool = ..., expected_log_loss: _Optional[float] = ..., ood_rate: _Optional[float] = ..., drift_candles: _Optional[int] = ..., drift: _Optional[_Iterable[_Union[FeatureDrift, _Mapping]]] = ...) -> None: ...

class FeatureDrift(_message.Message):
    __slots__ = ("feature", "psi")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    feature: str
    psi: float
    def __init__(self, feature: _Optional[str] = ..., psi: _Optional[float] = ...) -> None: ...

class CompareLivePerformanceRequest(_message.Message):
    __slots__ = ("symbol", "timeframe", "model_id", "baseline_model_id")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BASELINE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    model_id: str
    baseline_model_id: str
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ..., model_id: _Optional[str] = ..., baseline_model_id: _Optional[str] = ...) -> None: ...

class LiveComparison(_message.Message):
    __slots__ = ("model_id", "baseline_model_id", "paired", "mean_log_loss_difference", "standard_error", "statistic", "decision", "reason")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BASELINE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PAIRED_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOG_LOSS_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    STANDARD_ERROR_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    baseline_model_id: str
    paired: int
    mean_log_loss_difference: float
    standard_error: float
    statistic: float
    decision: str
    reason: str
    def __init__(self, model_id: _Optional[str] = ..., baseline_model_id: _Optional[str] = ..., paired: _Optional[int] = ..., mean_log_loss_difference: _Optional[float] = ..., standard_error: _Optional[float] = ..., statistic: _Optional[float] = ..., decision: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
