"""StreamPredict sessions: each stream keeps its recent candles, so a message may carry only new ones.

The first message names the symbol and timeframe; later ones may repeat them but not change them. A model_id pins
the stream to that model from then on; otherwise each message is answered by the model serving at that moment, so
a newly promoted model takes over at a message boundary.
"""

from __future__ import annotations

from inference_service.domain import CandleBatch, CandleSource, Predictions
from inference_service.model_store import LoadedModel
from inference_service.predictor import predict_window, read_candles, require_optional_columns, validate
from inference_service.service import InferenceService, validate_key
from shared.errors import InvalidArgument

# Candles a stream keeps beyond the model's warm-up, so a newer model with a longer warm-up still has history.
MIN_HISTORY = 256


class StreamSession:
    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self.symbol = ""
        self.timeframe = ""
        self.timeframe_ms = 0
        self.model_id = ""  # the pinned model, or "" for the serving one
        self.window = CandleBatch.empty()

    def step(
        self, symbol: str, timeframe: str, model_id: str, candles: CandleSource
    ) -> tuple[LoadedModel, Predictions]:
        """Handle one message: validate, merge into the window, predict the message's candles.

        Empty symbol, timeframe and model_id mean "as before". A candle whose open time equals the window's last
        replaces it (a still-forming candle); every other candle must be later.
        """
        if not self.symbol:
            if not symbol or not timeframe:
                raise InvalidArgument(
                    "symbol, timeframe: the first message of a stream must name the symbol and timeframe",
                    field="symbol")
            self.timeframe_ms = validate_key(symbol, timeframe)
            self.symbol, self.timeframe = symbol, timeframe
        else:
            if symbol and symbol != self.symbol:
                raise InvalidArgument(
                    f"symbol: this stream is for {self.symbol}, a message may not switch to {symbol}",
                    field="symbol")
            if timeframe and timeframe != self.timeframe:
                raise InvalidArgument(
                    f"timeframe: this stream is for {self.timeframe}, a message may not switch to {timeframe}",
                    field="timeframe")
        if model_id:
            self.model_id = model_id
        model = self.service.model(self.symbol, self.timeframe, self.model_id)
        new = read_candles(model, candles, self.service.max_batch)
        last = int(self.window.open_time_ms[-1]) if len(self.window) else None
        validate(new, self.timeframe_ms, previous_ms=last)
        require_optional_columns(model, new)
        history = self.window
        if last is not None and int(new.open_time_ms[0]) == last:
            history = history.slice(0, len(history) - 1)  # the still-forming candle is replaced
        window = history.concat(new)
        predictions = predict_window(model, window, len(history))
        keep = max(model.record.warmup_bars, MIN_HISTORY)
        self.window = window.slice(max(0, len(window) - keep))
        self.service.predicted(model, len(new))
        return model, predictions
