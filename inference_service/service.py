"""The inference service's logic behind the gRPC layer: which model answers, and stateless predictions.

Predict checks in this order: the key (symbol and timeframe), then the model (NOT_FOUND or DATA_LOSS), then the batch
size, then each candle, then the optional columns the model needs. (The gRPC layer checks the batch size once more
before it converts a request at all: `converters.batch_from_request`.) A stream checks its candles before the model,
because a valid candle joins the stream's history whatever happens to its prediction (`stream_session`).

Every call that may need a model takes an optional `Resolved`: the model found in memory by the event loop
(`ModelStore.in_memory`), used as it is. Without one, the model is looked up and loaded, which may read the database
and the disk, so those calls run in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable

from inference_service.domain import CandleBatch, CandleSource, Predictions, is_columnar
from inference_service.model_store import LoadedModel, ModelStore, Resolved
from inference_service.predictor import predict_window, read_candles, require_optional_columns
from shared.candles import validate
from shared.errors import InvalidArgument
from shared.store.registry import ModelRecord
from shared.symbols import validate_symbol
from shared.timeframes import timeframe_ms

# Called after every answered request with the model that answered and the number of candles predicted.
OnPredicted = Callable[[LoadedModel, int], None]
# Called after every answered request with the model, its predictions and the candles the request carried (the
# prediction journal, `inference_service.journal`); it must only queue them.
OnServed = Callable[[LoadedModel, Predictions, CandleBatch], None]
# Called after every answered request with the model, its predictions, the window they were computed over (history
# first), the window's first answered row, and whether the model was pinned by model_id (the shadow models,
# `inference_service.shadows`); it must only queue them, and copy what it keeps.
OnAnswered = Callable[[LoadedModel, Predictions, CandleBatch, int, bool], None]


def validate_key(symbol: str, timeframe: str) -> int:
    """The timeframe's length in milliseconds, after checking that symbol and timeframe are well-formed."""
    try:
        validate_symbol(symbol)
    except InvalidArgument as exc:
        raise InvalidArgument(f"symbol: {exc}", field="symbol") from None
    try:
        return timeframe_ms(timeframe)
    except ValueError as exc:
        raise InvalidArgument(f"timeframe: {exc}", field="timeframe") from None


class InferenceService:
    def __init__(self, store: ModelStore, max_batch: int, on_predicted: OnPredicted | None = None,
                 on_served: OnServed | None = None, on_answered: OnAnswered | None = None) -> None:
        self.store = store
        self.max_batch = max_batch
        self.on_predicted = on_predicted
        self.on_served = on_served
        self.on_answered = on_answered

    def resolve(self, symbol: str, timeframe: str, model_id: str = "", found: Resolved | None = None) -> Resolved:
        """The model that answers for a validated key (the one pinned by model_id, else the one serving now) and the
        history a stream keeps: `found` when given, else looked up (blocking)."""
        return found if found is not None else self.store.resolve(symbol, timeframe, model_id)

    def serving_model(self, symbol: str, timeframe: str, found: Resolved | None = None) -> ModelRecord:
        """The record of the model serving a key now (loaded and verified on first use)."""
        validate_key(symbol, timeframe)
        return self.resolve(symbol, timeframe, "", found).model.record

    def predict(
        self, symbol: str, timeframe: str, model_id: str, candles: CandleSource, found: Resolved | None = None
    ) -> tuple[LoadedModel, Predictions]:
        """Stateless prediction: every candle's history is the candles before it in the same batch."""
        tf_ms = validate_key(symbol, timeframe)
        model = self.resolve(symbol, timeframe, model_id, found).model
        columnar = is_columnar(candles)
        batch = read_candles(model, candles, self.max_batch)
        validate(batch, tf_ms, columnar=columnar)
        require_optional_columns(model, batch, columnar)
        predictions = predict_window(model, batch, 0)
        self.predicted(model, len(batch))
        self.served(model, predictions, batch)
        self.answered(model, predictions, batch, 0, bool(model_id))
        return model, predictions

    def predicted(self, model: LoadedModel, n_candles: int) -> None:
        """Report an answered request to the `on_predicted` hook, when there is one."""
        if self.on_predicted is not None:
            self.on_predicted(model, n_candles)

    def served(self, model: LoadedModel, predictions: Predictions, candles: CandleBatch) -> None:
        """Report what an answer served, and the candles it was computed from, to the `on_served` hook."""
        if self.on_served is not None:
            self.on_served(model, predictions, candles)

    def answered(self, model: LoadedModel, predictions: Predictions, window: CandleBatch, first_row: int,
                 pinned: bool) -> None:
        """Report an answer with the window it was computed over to the `on_answered` hook, when there is one."""
        if self.on_answered is not None:
            self.on_answered(model, predictions, window, first_row, pinned)
