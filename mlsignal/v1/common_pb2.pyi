from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LabelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_KIND_UNSPECIFIED: _ClassVar[LabelKind]
    LABEL_KIND_FIXED_HORIZON: _ClassVar[LabelKind]
    LABEL_KIND_TRIPLE_BARRIER: _ClassVar[LabelKind]

class ModelStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STAGE_UNSPECIFIED: _ClassVar[ModelStage]
    MODEL_STAGE_CANDIDATE: _ClassVar[ModelStage]
    MODEL_STAGE_SERVING: _ClassVar[ModelStage]
    MODEL_STAGE_REJECTED: _ClassVar[ModelStage]
    MODEL_STAGE_RETIRED: _ClassVar[ModelStage]
    MODEL_STAGE_RESEARCH: _ClassVar[ModelStage]
    MODEL_STAGE_SHADOW: _ClassVar[ModelStage]

class ClassWeight(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLASS_WEIGHT_UNSPECIFIED: _ClassVar[ClassWeight]
    CLASS_WEIGHT_NONE: _ClassVar[ClassWeight]
    CLASS_WEIGHT_BALANCED: _ClassVar[ClassWeight]
LABEL_KIND_UNSPECIFIED: LabelKind
LABEL_KIND_FIXED_HORIZON: LabelKind
LABEL_KIND_TRIPLE_BARRIER: LabelKind
MODEL_STAGE_UNSPECIFIED: ModelStage
MODEL_STAGE_CANDIDATE: ModelStage
MODEL_STAGE_SERVING: ModelStage
MODEL_STAGE_REJECTED: ModelStage
MODEL_STAGE_RETIRED: ModelStage
MODEL_STAGE_RESEARCH: ModelStage
MODEL_STAGE_SHADOW: ModelStage
CLASS_WEIGHT_UNSPECIFIED: ClassWeight
CLASS_WEIGHT_NONE: ClassWeight
CLASS_WEIGHT_BALANCED: ClassWeight

class Candle(_message.Message):
    __slots__ = ("open_time_ms", "open", "high", "low", "close", "volume", "funding_rate", "open_interest")
    OPEN_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    FUNDING_RATE_FIELD_NUMBER: _ClassVar[int]
    OPEN_INTEREST_FIELD_NUMBER: _ClassVar[int]
    open_time_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    funding_rate: float
    open_interest: float
    def __init__(self, open_time_ms: _Optional[int] = ..., open: _Optional[float] = ..., high: _Optional[float] = ..., low: _Optional[float] = ..., close: _Optional[float] = ..., volume: _Optional[float] = ..., funding_rate: _Optional[float] = ..., open_interest: _Optional[float] = ...) -> None: ...

class LabelSpec(_message.Message):
    __slots__ = ("horizon_bars", "threshold", "kind", "volatility_bars", "volatility_multiple")
    HORIZON_BARS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VOLATILITY_BARS_FIELD_NUMBER: _ClassVar[int]
    VOLATILITY_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    horizon_bars: int
    threshold: float
    kind: LabelKind
    volatility_bars: int
    volatility_multiple: float
    def __init__(self, horizon_bars: _Optional[int] = ..., threshold: _Optional[float] = ..., kind: _Optional[_Union[LabelKind, str]] = ..., volatility_bars: _Optional[int] = ..., volatility_multiple: _Optional[float] = ...) -> None: ...

class CandleColumns(_message.Message):
    __slots__ = ("open_time_ms", "open", "high", "low", "close", "volume", "funding_rate", "open_interest")
    OPEN_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    FUNDING_RATE_FIELD_NUMBER: _ClassVar[int]
    OPEN_INTEREST_FIELD_NUMBER: _ClassVar[int]
    open_time_ms: _containers.RepeatedScalarFieldContainer[int]
    open: _containers.RepeatedScalarFieldContainer[float]
    high: _containers.RepeatedScalarFieldContainer[float]
    low: _containers.RepeatedScalarFieldContainer[float]
    close: _containers.RepeatedScalarFieldContainer[float]
    volume: _containers.RepeatedScalarFieldContainer[float]
    funding_rate: _containers.RepeatedScalarFieldContainer[float]
    open_interest: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, open_time_ms: _Optional[_Iterable[int]] = ..., open: _Optional[_Iterable[float]] = ..., high: _Optional[_Iterable[float]] = ..., low: _Optional[_Iterable[float]] = ..., close: _Optional[_Iterable[float]] = ..., volume: _Optional[_Iterable[float]] = ..., funding_rate: _Optional[_Iterable[float]] = ..., open_interest: _Optional[_Iterable[float]] = ...) -> None: ...

class PredictionColumns(_message.Message):
    __slots__ = ("open_time_ms", "ml_up_prob", "ml_down_prob", "ml_range_prob", "ready", "in_sample", "ood_score", "ood")
    OPEN_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    ML_UP_PROB_FIELD_NUMBER: _ClassVar[int]
    ML_DOWN_PROB_FIELD_NUMBER: _ClassVar[int]
    ML_RANGE_PROB_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    IN_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    OOD_SCORE_FIELD_NUMBER: _ClassVar[int]
    OOD_FIELD_NUMBER: _ClassVar[int]
    open_time_ms: _containers.RepeatedScalarFieldContainer[int]
    ml_up_prob: _containers.RepeatedScalarFieldContainer[float]
    ml_down_prob: _containers.RepeatedScalarFieldContainer[float]
    ml_range_prob: _containers.RepeatedScalarFieldContainer[float]
    ready: _containers.RepeatedScalarFieldContainer[bool]
    in_sample: _containers.RepeatedScalarFieldContainer[bool]
    ood_score: _containers.RepeatedScalarFieldContainer[float]
    ood: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, open_time_ms: _Optional[_Iterable[int]] = ..., ml_up_prob: _Optional[_Iterable[float]] = ..., ml_down_prob: _Optional[_Iterable[float]] = ..., ml_range_prob: _Optional[_Iterable[float]] = ..., ready: _Optional[_Iterable[bool]] = ..., in_sample: _Optional[_Iterable[bool]] = ..., ood_score: _Optional[_Iterable[float]] = ..., ood: _Optional[_Iterable[bool]] = ...) -> None: ...

class ModelParams(_message.Message):
    __slots__ = ("n_estimators", "max_depth", "min_samples_leaf", "class_weight", "random_state")
    N_ESTIMATORS_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_LEAF_FIELD_NUMBER: _ClassVar[int]
    CLASS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RANDOM_STATE_FIELD_NUMBER: _ClassVar[int]
    n_estimators: int
    max_depth: int
    min_samples_leaf: int
    class_weight: ClassWeight
    random_state: int
    def __init__(self, n_estimators: _Optional[int] = ..., max_depth: _Optional[int] = ..., min_samples_leaf: _Optional[int] = ..., class_weight: _Optional[_Union[ClassWeight, str]] = ..., random_state: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "symbol", "timeframe", "created_at", "train_start", "train_end", "label", "features", "warmup_bars", "metrics", "sha256", "params", "feature_set", "classes", "stage", "stage_reason")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_START_FIELD_NUMBER: _ClassVar[int]
    TRAIN_END_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    WARMUP_BARS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SET_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_REASON_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    symbol: str
    timeframe: str
    created_at: _timestamp_pb2.Timestamp
    train_start: _timestamp_pb2.Timestamp
    train_end: _timestamp_pb2.Timestamp
    label: LabelSpec
    features: _containers.RepeatedScalarFieldContainer[str]
    warmup_bars: int
    metrics: _containers.ScalarMap[str, float]
    sha256: str
    params: ModelParams
    feature_set: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    stage: ModelStage
    stage_reason: str
    def __init__(self, model_id: _Optional[str] = ..., symbol: _Optional[str] = ..., timeframe: _Optional[str] = ..., created_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., train_start: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., train_end: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., label: _Optional[_Union[LabelSpec, _Mapping]] = ..., features: _Optional[_Iterable[str]] = ..., warmup_bars: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., sha256: _Optional[str] = ..., params: _Optional[_Union[ModelParams, _Mapping]] = ..., feature_set: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., stage: _Optional[_Union[ModelStage, str]] = ..., stage_reason: _Optional[str] = ...) -> None: ...
