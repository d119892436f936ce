"""StreamPredict sessions: each stream keeps its recent candles, so a message may carry only new ones.

The first message names the symbol and timeframe; later ones may repeat them but not change them. A model_id pins
the stream to that model from then on; otherwise each message is answered by the model serving at that moment, so
a newly promoted model takes over at a message boundary.

What a stream keeps does not depend on the model answering now: every column the client sent (funding rate and
open interest included) and at least as many candles as the longest warm-up of any model registered for the market
(`ModelStore.max_warmup_bars`). After a swap to a model with other columns or a longer warm-up, the stream answers
exactly what one Predict with that model over the same candles answers.

A message is checked in full (key, size, every candle, times against the history, a pinned model's market) before
anything changes; a refused message (INVALID_ARGUMENT) leaves the stream as if it had not been sent. A valid candle
always joins the history, even when its prediction fails for a reason that is not the candle's fault (no model yet,
the database unreachable, a model that needs funding rate or open interest the history lacks): the message is
answered with that error, and the stream recovers by itself once the cause is gone, without a reconnect.
"""

from __future__ import annotations

import numpy as np

from inference_service.domain import CandleBatch, CandleSource, Predictions, candles_field, is_columnar
from inference_service.model_store import LoadedModel, Resolved
from inference_service.predictor import predict_window, require_optional_columns
from inference_service.service import InferenceService, validate_key
from shared.candles import check_batch_size, validate
from shared.errors import InvalidArgument, MlsignalError
from shared.features import FeatureSpec

# Spare rows a history holds beyond what it must keep, so that it moves its rows only once every SLACK messages.
MIN_SLACK = 32
# Candles a stream keeps while no model tells it how many it needs: the default feature set's warm-up.
DEFAULT_KEEP = FeatureSpec().warmup_bars


class History:
    """A stream's candles, oldest first, in preallocated arrays: open times (int64) and the seven value columns
    (float64, NaN where missing) in CANDLE_FIELDS order.

    New candles are written after the last row; when the arrays are full, the rows still needed move to the front
    (once every `slack` candles), so a one-candle step copies no history. `window` gives views, never copies.
    """

    __slots__ = ("size", "times", "values")

    def __init__(self, capacity: int) -> None:
        self.times = np.empty(capacity, dtype=np.int64)
        self.values = np.empty((7, capacity), dtype=np.float64)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    @property
    def capacity(self) -> int:
        return len(self.times)

    @property
    def nbytes(self) -> int:
        return self.times.nbytes + self.values.nbytes

    def last_ms(self) -> int | None:
        return int(self.times[self.size - 1]) if self.size else None

    def window(self, stop: int) -> CandleBatch:
        """Rows 0..stop-1 as a batch of views."""
        return CandleBatch(self.times[:stop], *self.values[:, :stop])

    def make_room(self, n_new: int, keep: int) -> None:
        """Make room for n_new rows after the last, dropping all but the newest `keep` rows if rows must move.

        The rows kept are the same data at new positions: what the stream holds does not change in meaning.
        """
        if self.size + n_new <= self.capacity:
            return
        h = min(self.size, keep)
        comfortable = keep + max(MIN_SLACK, keep // 4)
        needed = h + n_new
        if needed > self.capacity or (self.capacity > 2 * comfortable and needed <= comfortable):
            capacity = max(needed, comfortable)
            times, values = np.empty(capacity, dtype=np.int64), np.empty((7, capacity), dtype=np.float64)
            times[:h] = self.times[self.size - h:self.size]
            values[:, :h] = self.values[:, self.size - h:self.size]
            self.times, self.values = times, values
        else:
            self.times[:h] = self.times[self.size - h:self.size]  # numpy copies overlapping ranges correctly
            self.values[:, :h] = self.values[:, self.size - h:self.size]
        self.size = h

    def write(self, at: int, batch: CandleBatch) -> None:
        """Put batch's candles at rows at.. (the caller has made room); `size` is left to the caller."""
        stop = at + len(batch)
        self.times[at:stop] = batch.open_time_ms
        v = self.values
        v[0, at:stop] = batch.open
        v[1, at:stop] = batch.high
        v[2, at:stop] = batch.low
        v[3, at:stop] = batch.close
        v[4, at:stop] = batch.volume
        v[5, at:stop] = batch.funding_rate
        v[6, at:stop] = batch.open_interest


class StreamSession:
    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self.symbol = ""
        self.timeframe = ""
        self.timeframe_ms = 0
        self.model_id = ""  # the pinned model, or "" for the serving one
        self.keep = 0  # candles of history to keep, from the last model that answered (0: none yet)
        self.history: History | None = None

    @property
    def window(self) -> CandleBatch:
        """The candles the stream holds now, oldest first."""
        return self.history.window(len(self.history)) if self.history is not None else CandleBatch.empty()

    @property
    def nbytes(self) -> int:
        """Bytes of candle history this stream holds."""
        return self.history.nbytes if self.history is not None else 0

    def step(
        self, symbol: str, timeframe: str, model_id: str, candles: CandleSource, found: Resolved | None = None
    ) -> tuple[LoadedModel, Predictions]:
        """Handle one message: validate it in full, merge it into the history, predict the message's candles.

        Empty symbol, timeframe and model_id mean "as before". A candle whose open time equals the history's last
        replaces it (a still-forming candle); every other candle must be later. `found` is the model the event loop
        found in memory; without it the model is looked up (which may block). A refused message (INVALID_ARGUMENT)
        leaves the stream as it was; after any other error the message's candles are part of the history.
        """
        # 1. The whole message is checked; nothing of the stream changes here.
        if not self.symbol:
            if not symbol or not timeframe:
                raise InvalidArgument(
                    "symbol, timeframe: the first message of a stream must name the symbol and timeframe",
                    field="symbol")
            timeframe_ms = validate_key(symbol, timeframe)
        else:
            if symbol and symbol != self.symbol:
                raise InvalidArgument(
                    f"symbol: this stream is for {self.symbol}, a message may not switch to {symbol}",
                    field="symbol")
            if timeframe and timeframe != self.timeframe:
                raise InvalidArgument(
                    f"timeframe: this stream is for {self.timeframe}, a message may not switch to {timeframe}",
                    field="timeframe")
            symbol, timeframe, timeframe_ms = self.symbol, self.timeframe, self.timeframe_ms
        columnar = is_columnar(candles)
        check_batch_size(len(candles), self.service.max_batch, candles_field(columnar))
        new = candles.read(True, True)  # every column: kept for whichever model answers later
        history = self.history
        last = history.last_ms() if history is not None else None
        validate(new, timeframe_ms, previous_ms=last, columnar=columnar)
        pin = model_id or self.model_id
        resolved: Resolved | None = None
        failure: MlsignalError | None = None
        try:
            resolved = self.service.resolve(symbol, timeframe, pin, found)
        except InvalidArgument:  # a pinned model of another market: the message is refused
            raise
        except MlsignalError as exc:  # not the candles' fault: they join the history all the same
            failure = exc

        # 2. The candles join the history: rows may move, but the stream still holds the same candles.
        keep = resolved.keep if resolved is not None else max(self.keep, DEFAULT_KEEP)
        n = len(new)
        if history is None:
            history = History(max(keep + max(MIN_SLACK, keep // 4), n + 1))
        elif history.size + n > history.capacity:
            history.make_room(n, keep + 1)  # + 1: this message may replace the last candle
        replaces = last is not None and int(new.open_time_ms[0]) == last
        base = history.size - 1 if replaces else history.size
        history.write(base, new)
        history.size = base + n
        self.history = history
        if not self.symbol:
            self.symbol, self.timeframe, self.timeframe_ms = symbol, timeframe, timeframe_ms
        if failure is not None or resolved is None:
            assert failure is not None
            raise failure
        self.keep, self.model_id = resolved.keep, pin

        # 3. Predict the message's candles over the history.
        model = resolved.model
        require_optional_columns(model, new, columnar)
        predictions = predict_window(model, history.window(base + n), base)
        self.service.predicted(model, n)
        self.service.served(model, predictions, new)
        self.service.answered(model, predictions, history.window(base + n), base, bool(pin))
        return model, predictions
