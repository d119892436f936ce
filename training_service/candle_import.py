"""Candles pushed over gRPC (`ImportCandles`): the rules of one import call, on domain types.

A call is a stream of batches of one market. The first batch names the symbol and timeframe; later ones may leave
them empty ("as before") but may not name another market. Each batch is checked in full with the one definition of
a valid candle (`shared.candles.validate`, the one inference uses) plus one rule of its own: only closed candles are
stored, so a candle whose close (open time + one timeframe) is after the server's clock is refused. A batch is then
stored in one transaction (`shared.store.marketdata.import_candles`): whole or not at all. A refused batch ends the
call INVALID_ARGUMENT naming the message and the field; the batches before it stay stored, and sending them again is
harmless (identical candles count as unchanged).

Re-sent candles with other values than the stored ones are counted as conflicting and the stored ones kept; each
batch with conflicts logs one warning with their number and the first conflicting open time. The server's clock is
a callable (`now_ms`), so tests set it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import sqlalchemy as sa

from shared.candles import CandleBatch, candles_field, validate
from shared.errors import InvalidArgument
from shared.store.marketdata import ImportCounts, import_candles
from shared.symbols import validate_symbol
from shared.timeframes import ms_to_iso, timeframe_ms

log = logging.getLogger("mlsignal.training")

# Most candles in one ImportCandles message: one transaction's worth (a 16 MiB message holds about 250,000 candles
# as columns; the SDK and `mlsignal data push` send 10,000 per message).
MAX_IMPORT_BATCH = 100_000


def wall_clock_ms() -> int:
    """The server's clock: UTC epoch milliseconds now."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class ImportBatch:
    """One ImportCandles message: its market ("" = as in the first message) and its candles (optional columns NaN
    where missing). `columnar`: the candles came as `columns`, so errors name fields as `columns.<name>[i]`."""

    symbol: str
    timeframe: str
    candles: CandleBatch
    columnar: bool = False


@dataclass(frozen=True)
class ImportResult:
    """The answer of an import call: the counts over every message, and the newest open time received (0: none)."""

    inserted: int = 0
    unchanged: int = 0
    conflicting: int = 0
    last_open_time_ms: int = 0


class CandleImport:
    """One ImportCandles call: the market its first message named, and what was stored so far."""

    def __init__(self, engine: sa.Engine, now_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.engine = engine
        self.now_ms = now_ms
        self.symbol = ""
        self.timeframe = ""
        self.messages = 0
        self.counts = ImportCounts()
        self.last_open_time_ms = 0

    def add(self, batch: ImportBatch) -> ImportCounts:
        """Check one message in full, then store it in one transaction; returns what happened to its candles.

        InvalidArgument (naming the message and the field) when the message is refused: nothing of it is stored.
        """
        index = self.messages
        try:
            symbol, timeframe = self._market(batch)
            tf_ms = timeframe_ms(timeframe)
            field = candles_field(batch.columnar)
            n = len(batch.candles)
            if n == 0:
                raise InvalidArgument(f"{field}: the message holds no candles; send at least one", field=field)
            if n > MAX_IMPORT_BATCH:
                raise InvalidArgument(f"{field}: {n} candles in one message, the limit is {MAX_IMPORT_BATCH}; split "
                                      "the batch", field=field)
            now = self.now_ms()
            validate(batch.candles, tf_ms, columnar=batch.columnar, now_ms=now, closed_only=True)
            counts = import_candles(self.engine, symbol, timeframe, _frame(batch.candles), closed_by_ms=now)
        except InvalidArgument as exc:
            stored = ("nothing is stored" if index == 0 else "nothing of it is stored; the message before it is"
                      if index == 1 else f"nothing of it is stored; the {index} messages before it are")
            raise InvalidArgument(f"message {index}: {exc} ({stored})", field=exc.field) from None
        self.messages += 1
        self.symbol, self.timeframe = symbol, timeframe
        self.counts += counts
        self.last_open_time_ms = max(self.last_open_time_ms, int(batch.candles.open_time_ms.max()))
        if counts.conflicting:
            first = counts.first_conflict_ms
            log.warning(
                "ImportCandles %s %s: %d of %d candles in message %d differ from the stored ones (first at "
                "open_time_ms %d, %s); the stored values are kept", symbol, timeframe, counts.conflicting, n, index,
                first, ms_to_iso(first) if first is not None else "?")
        return counts

    def result(self) -> ImportResult:
        """The counts over every message stored; InvalidArgument when the call sent no message at all."""
        if self.messages == 0:
            raise InvalidArgument("the call sent no message; send at least one batch of candles naming symbol and "
                                  "timeframe", field="symbol")
        c = self.counts
        return ImportResult(c.inserted, c.unchanged, c.conflicting, self.last_open_time_ms)

    def _market(self, batch: ImportBatch) -> tuple[str, str]:
        """The message's market: the first message must name it, later ones may repeat it or leave it empty."""
        if not self.symbol:
            if not batch.symbol or not batch.timeframe:
                missing = "symbol" if not batch.symbol else "timeframe"
                raise InvalidArgument(f"{missing}: the first message must name the market (symbol and timeframe)",
                                      field=missing)
            try:
                validate_symbol(batch.symbol)
            except InvalidArgument as exc:
                raise InvalidArgument(f"symbol: {exc}", field="symbol") from None
            try:
                timeframe_ms(batch.timeframe)
            except ValueError as exc:
                raise InvalidArgument(f"timeframe: {exc}", field="timeframe") from None
            return batch.symbol, batch.timeframe
        for name, value, current in (("symbol", batch.symbol, self.symbol),
                                     ("timeframe", batch.timeframe, self.timeframe)):
            if value and value != current:
                raise InvalidArgument(
                    f"{name}: {value!r}, but this call imports {self.symbol} {self.timeframe}; a call imports one "
                    f"market (leave {name} empty or repeat it, and open another call for another market)",
                    field=name)
        return self.symbol, self.timeframe


def _frame(c: CandleBatch) -> pd.DataFrame:
    """The candle frame `import_candles` stores."""
    return pd.DataFrame({"open_time_ms": c.open_time_ms, "open": c.open, "high": c.high, "low": c.low,
                         "close": c.close, "volume": c.volume, "funding_rate": c.funding_rate,
                         "open_interest": c.open_interest})
