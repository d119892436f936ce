"""StreamPredict sessions: each stream keeps the recent candles, so a message may carry only new ones."""

from __future__ import annotations

from shared.errors import InvalidArgument
from shared.store.marketdata import validate_symbol
from shared.timeframes import timeframe_ms
from inference_service.models import LoadedModel, ModelStore
from inference_service.predictor import (
    Candles,
    Result,
    model_candles,
    empty_candles,
    predict_window,
    require_optional_columns,
    validate,
)

# Candles a stream keeps beyond the model's warm-up, so a newer model with a longer warm-up still has history.
MIN_HISTORY = 256


def resolve_key(symbol: str, timeframe: str) -> tuple[str, int]:
    try:
        validate_symbol(symbol)
    except InvalidArgument as exc:
        raise InvalidArgument(f"symbol: {exc}", field="symbol") from None
    try:
        return timeframe, timeframe_ms(timeframe)
    except ValueError as exc:
        raise InvalidArgument(f"timeframe: {exc}", field="timeframe") from None


def select_model(store: ModelStore, symbol: str, timeframe: str, model_id: str) -> LoadedModel:
    return store.pinned(model_id, symbol, timeframe) if model_id else store.current(symbol, timeframe)


def predict_batch(store: ModelStore, request, max_batch: int) -> tuple[LoadedModel, Result]:
    """Stateless Predict: every candle's history is the candles before it in this request."""
    _, tf_ms = resolve_key(request.symbol, request.timeframe)
    model = select_model(store, request.symbol, request.timeframe, request.model_id)
    candles = model_candles(model, request.candles)
    validate(candles, tf_ms, max_batch)
    require_optional_columns(model, candles)
    return model, predict_window(model, candles, 0)


class StreamSession:
    def __init__(self, store: ModelStore, max_batch: int):
        self.store = store
        self.max_batch = max_batch
        self.symbol = ""
        self.timeframe = ""
        self.tf_ms = 0
        self.model_id = ""
        self.window: Candles = empty_candles()

    def step(self, request) -> tuple[LoadedModel, Result]:
        """Handle one message: validate, merge into the window, predict the message's candles."""
        if not self.symbol:
            if not request.symbol or not request.timeframe:
                raise InvalidArgument(
                    "symbol, timeframe: the first message of a stream must name the symbol and timeframe",
                    field="symbol")
            _, self.tf_ms = resolve_key(request.symbol, request.timeframe)
            self.symbol, self.timeframe = request.symbol, request.timeframe
        else:
            if request.symbol and request.symbol != self.symbol:
                raise InvalidArgument(
                    f"symbol: this stream is for {self.symbol}, a message may not switch to {request.symbol}",
                    field="symbol")
            if request.timeframe and request.timeframe != self.timeframe:
                raise InvalidArgument(
                    f"timeframe: this stream is for {self.timeframe}, a message may not switch to "
                    f"{request.timeframe}", field="timeframe")
        if request.model_id:
            self.model_id = request.model_id
        model = select_model(self.store, self.symbol, self.timeframe, self.model_id)
        new = model_candles(model, request.candles)
        last = int(self.window.open_time_ms[-1]) if len(self.window) else None
        validate(new, self.tf_ms, self.max_batch, previous_ms=last)
        require_optional_columns(model, new)
        history = self.window
        if last is not None and int(new.open_time_ms[0]) == last:
            history = history.slice(0, len(history) - 1)  # the still-forming candle is replaced
        window = history.concat(new)
        result = predict_window(model, window, len(history))
        keep = max(model.record.warmup_bars, MIN_HISTORY)
        self.window = window.slice(max(0, len(window) - keep))
        return model, result
