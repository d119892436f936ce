from mlsignal.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("symbol", "timeframe", "model_id", "candles")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CANDLES_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    model_id: str
    candles: _containers.RepeatedCompositeFieldContainer[_common_pb2.Candle]
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ..., model_id: _Optional[str] = ..., candles: _Optional[_Iterable[_Union[_common_pb2.Candle, _Mapping]]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("open_time_ms", "ml_up_prob", "ml_down_prob", "ml_range_prob", "ready", "in_sample")
    OPEN_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    ML_UP_PROB_FIELD_NUMBER: _ClassVar[int]
    ML_DOWN_PROB_FIELD_NUMBER: _ClassVar[int]
    ML_RANGE_PROB_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    IN_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    open_time_ms: int
    ml_up_prob: float
    ml_down_prob: float
    ml_range_prob: float
    ready: bool
    in_sample: bool
    def __init__(self, open_time_ms: _Optional[int] = ..., ml_up_prob: _Optional[float] = ..., ml_down_prob: _Optional[float] = ..., ml_range_prob: _Optional[float] = ..., ready: bool = ..., in_sample: bool = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model_id", "predictions")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, model_id: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("symbol", "timeframe")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TIMEFRAME_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    timeframe: str
    def __init__(self, symbol: _Optional[str] = ..., timeframe: _Optional[str] = ...) -> None: ...
