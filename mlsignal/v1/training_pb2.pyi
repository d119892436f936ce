from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mlsignal.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainingPurpose(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_PURPOSE_UNSPECIFIED: _ClassVar[TrainingPurpose]
    TRAINING_PURPOSE_PRODUCTION: _ClassVar[TrainingPurpose]
    TRAINING_PURPOSE_RESEARCH: _ClassVar[TrainingPurpose]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
TRAINING_PURPOSE_UNSPECIFIED: TrainingPurpose
TRAINING_PURPOSE_PRODUCTION: TrainingPurpose
TRAINING_PURPOSE_RESEARCH: TrainingPurpose
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class RetrainPolicy(_message.Message):
    __slots__ = ("symbol", "timeframe", "every", "window", "label", "params", "paused", "next_run_at", "last_job_id", "last_outcome", "cross_validate")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    EVERY_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    NEXT_RUN_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CROSS_VALIDATE_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    every: _duration_pb2.Duration
    window: _duration_pb2.Duration
    label: _common_pb2.LabelSpec
    params: _common_pb2.ModelParams
    paused: bool
    next_run_at: _timestamp_pb2.Timestamp
    last_job_id: str
    last_outcome: str
    cross_validate: bool
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ..., every: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., window: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., label: _Optional[_Union[_common_pb2.LabelSpec, _Mapping]] = ..., params: _Optional[_Union[_common_pb2.ModelParams, _Mapping]] = ..., paused: bool = ..., next_run_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., last_job_id: _Optional[str] = ..., last_outcome: _Optional[str] = ..., cross_validate: bool = ...) -> None: ...

class ListRetrainPoliciesRequest(_message.Message):
    __slots__ = ("symbol", "timeframe")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ...) -> None: ...

class ListRetrainPoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[RetrainPolicy]
    def __init__(self, policies: _Optional[_Iterable[_Union[RetrainPolicy, _Mapping]]] = ...) -> None: ...

class DeleteRetrainPolicyRequest(_message.Message):
    __slots__ = ("symbol", "timeframe")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ...) -> None: ...

class ImportCandlesRequest(_message.Message):
    __slots__ = ("symbol", "timeframe", "candles", "columns")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    CANDLES_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    candles: _containers.RepeatedCompositeFieldContainer[_common_pb2.Candle]
    columns: _common_pb2.CandleColumns
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ..., candles: _Optional[_Iterable[_Union[_common_pb2.Candle, _Mapping]]] = ..., columns: _Optional[_Union[_common_pb2.CandleColumns, _Mapping]] = ...) -> None: ...

class ImportCandlesResponse(_message.Message):
    __slots__ = ("inserted", "unchanged", "conflicting", "last_open_time_ms")
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    CONFLICTING_FIELD_NUMBER: _ClassVar[int]
    LAST_OPEN_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    inserted: int
    unchanged: int
    conflicting: int
    last_open_time_ms: int
    def __init__(self, inserted: _Optional[int] = ..., unchanged: _Optional[int] = ..., conflicting: _Optional[int] = ..., last_open_time_ms: _Optional[int] = ...) -> None: ...

class PromoteModelRequest(_message.Message):
    __slots__ = ("model_id", "reason")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    reason: str
    def __init__(self, model_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackModelRequest(_message.Message):
    __slots__ = ("symbol", "timeframe", "reason")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    reason: str
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class StartTrainingRequest(_message.Message):
    __slots__ = ("symbol", "timeframe", "start_time", "end_time", "label", "params", "purpose", "feature_set")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SET_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    label: _common_pb2.LabelSpec
    params: _common_pb2.ModelParams
    purpose: TrainingPurpose
    feature_set: str
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ..., start_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., label: _Optional[_Union[_common_pb2.LabelSpec, _Mapping]] = ..., params: _Optional[_Union[_common_pb2.ModelParams, _Mapping]] = ..., purpose: _Optional[_Union[TrainingPurpose, str]] = ..., feature_set: _Optional[str] = ...) -> None: ...

class TrainingJob(_message.Message):
    __slots__ = ("job_id", "state", "progress", "stage", "error", "model_id", "request", "created_at", "started_at", "finished_at", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    progress: float
    stage: str
    error: str
    model_id: str
    request: StartTrainingRequest
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[float] = ..., stage: _Optional[str] = ..., error: _Optional[str] = ..., model_id: _Optional[str] = ..., request: _Optional[_Union[StartTrainingRequest, _Mapping]] = ..., created_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetTrainingJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelTrainingJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListTrainingJobsRequest(_message.Message):
    __slots__ = ("symbol", "timeframe", "states", "limit")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    states: _containers.RepeatedScalarFieldContainer[JobState]
    limit: int
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ..., states: _Optional[_Iterable[_Union[JobState, str]]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListTrainingJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[TrainingJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[TrainingJob, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("symbol", "timeframe")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ...) -> None: ...

class ListModelStageChangesRequest(_message.Message):
    __slots__ = ("symbol", "timeframe", "model_id", "limit")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    model_id: str
    limit: int
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ..., model_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ModelStageChange(_message.Message):
    __slots__ = ("model_id", "symbol", "timeframe", "stage", "reason", "changed_at")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    symbol: str
    timeframe: str
    stage: _common_pb2.ModelStage
    reason: str
    changed_at: _timestamp_pb2.Timestamp
    def __init__(self, model_id: _Optional[str] = ..., symbol: _Optional[str] = ..., timeframe: _Optional[str] = ..., stage: _Optional[_Union[_common_pb2.ModelStage, str]] = ..., reason: _Optional[str] = ..., changed_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListModelStageChangesResponse(_message.Message):
    __slots__ = ("changes",)
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[ModelStageChange]
    def __init__(self, changes: _Optional[_Iterable[_Union[ModelStageChange, _Mapping]]] = ...) -> None: ...
