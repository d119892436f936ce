"""Parsing and validation of market-data files: pure functions, no database.

Every row of a file is checked, and the first bad row rejects the whole file with its 1-based line number (the header
line counts). A half-imported or silently repaired file would corrupt features and labels downstream without anyone
noticing, so nothing is dropped, clipped or filled here. The checks are vectorised with numpy; only the message for the
offending row is built in Python.

Accepted layouts:

* generic CSV with a header containing ``timestamp,open,high,low,close,volume`` (any order, extra columns ignored);
  timestamps are ISO-8601 (UTC unless an offset is given) or epoch milliseconds, decided by the first data row;
* Binance public kline CSV: 12 columns (open_time, open, high, low, close, volume, close_time, quote_volume, trades,
  taker_buy_base, taker_buy_quote, ignore), with or without a header row; times in milliseconds or, in newer spot
  files, microseconds (told apart by magnitude, per row);
* series CSV ``timestamp,value`` for funding rates and open interest.

Any of them may be compressed (``.gz``, ``.zip``, ...; pandas infers it from the file name).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from shared.errors import InvalidArgument
from shared.timeframes import format_duration, ms_to_iso, parse_time, timeframe_ms

FORMATS = ("auto", "csv", "binance")
SERIES_KINDS = ("funding-rate", "open-interest")
PRICE_COLUMNS = ("open", "high", "low", "close")
CANDLE_COLUMNS = ("open_time_ms", *PRICE_COLUMNS, "volume")
SERIES_COLUMNS = ("time_ms", "value")
BINANCE_COLUMNS = (
    "open_time", "open", "high", "low", "close", "volume", "close_time",
    "quote_volume", "trades", "taker_buy_base", "taker_buy_quote", "ignore",
)  # fmt: skip

# Plausible epoch-millisecond range. It rejects seconds or microseconds mistaken for milliseconds instead of storing
# candles in 1970 or the year 50000.
MIN_TIME_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_TIME_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z
# Binance open times at or above this are microseconds (2000..2100 in ms is below 4.2e12, in µs above 9.4e14).
BINANCE_MICROS_FROM = 10**14

_DIGITS = re.compile(r"\s*\d+\s*")
_ISO_EXAMPLE = "2017-07-01T11:00:00Z"


class ImportRejected(InvalidArgument):
    """A file that cannot be imported as a whole; `line` is 1-based and counts the header line."""

    def __init__(self, line: int, reason: str, field: str | None = None):
        super().__init__(f"line {line}: {reason}", field=field)
        self.line = line
        self.reason = reason


# --------------------------------------------------------------------------------------------------------------------
# reading


def detect_format(path: str | Path) -> str:
    """'binance' for a 12-field kline file (numeric first field or open_time header), 'csv' for a timestamp header."""
    raw = _read_raw(path, header=False, nrows=1)
    if raw.empty:
        raise InvalidArgument(f"{path} is empty", field="file")
    fields = [str(v).strip() for v in raw.iloc[0].tolist()]
    first = fields[0].lower()
    if len(fields) == len(BINANCE_COLUMNS) and (_DIGITS.fullmatch(fields[0]) or first.replace(" ", "_") == "open_time"):
        return "binance"
    if "timestamp" in (f.lower() for f in fields):
        return "csv"
    raise ImportRejected(
        1,
        "cannot tell the file format from the first line: expected a header with "
        "timestamp,open,high,low,close,volume or a 12-field Binance kline row; pass --format csv or --format binance",
        field="format",
    )


def read_candles(
    path: str | Path, timeframe: str, fmt: str = "auto", *, closed_by_ms: int | None = None,
    check_spacing: bool = False,
) -> pd.DataFrame:
    """Validated candles of a file, sorted by time: columns open_time_ms (int64) and open..volume (float64).

    With `closed_by_ms` (an import: the clock now) every candle must have closed by then, open time + one timeframe
    <= closed_by_ms; the line of a still-forming candle rejects the file. With `check_spacing`, a file whose most
    common step between candles is not the timeframe raises TimeframeMismatch before any row check.
    """
    tf_ms = _timeframe_ms(timeframe)
    if fmt not in FORMATS:
        raise InvalidArgument(f"format {fmt!r} is not supported; expected one of {', '.join(FORMATS)}", field="format")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "binance":
        return _read_binance(path, timeframe, tf_ms, closed_by_ms, check_spacing)
    return _read_generic(path, timeframe, tf_ms, closed_by_ms, check_spacing)


def read_series(path: str | Path, kind: str) -> pd.DataFrame:
    """Validated `timestamp,value` series, sorted by time: columns time_ms (int64) and value (float64)."""
    if kind not in SERIES_KINDS:
        raise InvalidArgument(f"kind {kind!r} is not a series; expected one of {', '.join(SERIES_KINDS)}", field="kind")
    raw = _read_raw(path, header=True)
    cols = _require_columns(raw, ("timestamp", "value"), "timestamp,value")
    checks = _Checks(len(raw), first_line=2)
    ts = _timestamps(raw[cols["timestamp"]], checks, "timestamp")
    value = _numbers(raw[cols["value"]], checks, "value")
    if kind == "open-interest":
        checks.add(value <= 0, lambda i: f"open interest is {_raw(raw, cols['value'], i)}; it must be > 0", "value")
    _check_duplicates(ts, checks, "timestamp")
    checks.raise_first()
    order = np.argsort(ts, kind="stable")
    return pd.DataFrame({"time_ms": ts[order], "value": value[order]})


def _read_generic(path, timeframe: str, tf_ms: int, closed_by_ms: int | None, check_spacing: bool = False
                  ) -> pd.DataFrame:
    raw = _read_raw(path, header=True)
    cols = _require_columns(raw, ("timestamp", *PRICE_COLUMNS, "volume"), "timestamp,open,high,low,close,volume")
    checks = _Checks(len(raw), first_line=2)
    ts = _timestamps(raw[cols["timestamp"]], checks, "timestamp")
    values = {name: _numbers(raw[cols[name]], checks, name) for name in (*PRICE_COLUMNS, "volume")}
    return _finish_candles(raw, cols, ts, values, checks, timeframe, tf_ms, "timestamp", closed_by_ms, check_spacing)


def _read_binance(path, timeframe: str, tf_ms: int, closed_by_ms: int | None, check_spacing: bool = False
                  ) -> pd.DataFrame:
    first = _read_raw(path, header=False, nrows=1)
    has_header = not first.empty and not _DIGITS.fullmatch(str(first.iloc[0, 0]))
    raw = _read_raw(path, header=has_header)
    first_line = 2 if has_header else 1
    if raw.empty:
        raise ImportRejected(first_line, "the file has no kline rows")
    if raw.shape[1] != len(BINANCE_COLUMNS):
        raise ImportRejected(
            first_line,
            f"a Binance kline row has {len(BINANCE_COLUMNS)} fields ({','.join(BINANCE_COLUMNS)}); "
            f"this one has {raw.shape[1]}",
        )
    raw.columns = list(BINANCE_COLUMNS)
    cols = {c: c for c in BINANCE_COLUMNS}
    checks = _Checks(len(raw), first_line=first_line)

    open_raw = _integers(raw["open_time"], checks, "open_time")
    close_raw = _integers(raw["close_time"], checks, "close_time")
    # Per row: microseconds are told apart from milliseconds by magnitude; they must be whole milliseconds.
    unit = np.where(open_raw >= BINANCE_MICROS_FROM, 1000, 1)
    checks.add(
        open_raw % unit != 0,
        lambda i: f"open_time {open_raw[i]} (microseconds) is not a whole millisecond",
        "open_time",
    )
    ts = open_raw // unit
    _check_range(ts, checks, "open_time", lambda i: str(open_raw[i]))
    values = {name: _numbers(raw[name], checks, name) for name in (*PRICE_COLUMNS, "volume")}
    # close_time is open_time + timeframe - 1 (earlier when trading halted inside the candle); a later one means the
    # file holds longer candles than --timeframe says.
    span = close_raw - open_raw
    checks.add(
        (span <= 0) | (span > tf_ms * unit - 1),
        lambda i: (
            f"close_time {close_raw[i]} does not fall inside a {timeframe} candle opening at {open_raw[i]} "
            f"(expected at most {open_raw[i] + tf_ms * unit[i] - 1}); is --timeframe right?"
        ),
        "close_time",
    )
    return _finish_candles(raw, cols, ts, values, checks, timeframe, tf_ms, "open_time", closed_by_ms, check_spacing)


def _finish_candles(raw, cols, ts, values, checks, timeframe, tf_ms, time_field, closed_by_ms,
                    check_spacing: bool = False) -> pd.DataFrame:
    """Row checks common to all candle layouts, then the sorted frame."""
    if check_spacing:
        check_timeframe_spacing(ts[(ts >= MIN_TIME_MS) & (ts < MAX_TIME_MS)], timeframe)
    _check_candle_values(values, checks, lambda name, i: _raw(raw, cols[name], i))
    checks.add(
        ts % tf_ms != 0,
        lambda i: f"{time_field} {ms_to_iso(int(ts[i]))} is not aligned to the {timeframe} timeframe",
        time_field,
    )
    if closed_by_ms is not None:
        checks.add(
            ts + tf_ms > closed_by_ms,
            lambda i: (
                f"the {timeframe} candle opening at {ms_to_iso(int(ts[i]))} is still forming: it closes at "
                f"{ms_to_iso(int(ts[i]) + tf_ms)}, after now ({ms_to_iso(closed_by_ms)}); only closed candles "
                "are imported"
            ),
            time_field,
        )
    _check_duplicates(ts, checks, time_field)
    checks.raise_first()
    order = np.argsort(ts, kind="stable")
    out = {"open_time_ms": ts[order]}
    out.update({name: values[name][order] for name in (*PRICE_COLUMNS, "volume")})
    return pd.DataFrame(out)


def _read_raw(path, header: bool, nrows: int | None = None) -> pd.DataFrame:
    """Every field as a string, one row per line (blank lines kept so that row i is line i + header + 1).

    The header is read as an ordinary row and then taken off: that way a data row with more fields than the first
    line is a parser error naming its line, instead of pandas quietly turning the first column into an index.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"{path}: no such file", field="file")
    try:
        df = pd.read_csv(
            p,
            header=None,
            index_col=False,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            skip_blank_lines=False,
            compression="infer",
            nrows=nrows,
        )
    except pd.errors.EmptyDataError:
        raise InvalidArgument(f"{path} is empty", field="file") from None
    except pd.errors.ParserError as exc:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if m:
            expected, line, saw = (int(g) for g in m.groups())
            raise ImportRejected(line, f"expected {expected} fields, found {saw}") from None
        raise InvalidArgument(f"{path}: cannot parse as CSV: {exc}", field="file") from None
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path}: not a UTF-8 text file ({exc.reason})", field="file") from None
    except (OSError, EOFError) as exc:  # corrupt or truncated compressed file
        raise InvalidArgument(f"{path}: cannot read: {exc}", field="file") from None
    if header:
        if df.empty:
            raise InvalidArgument(f"{path} is empty", field="file")
        df = df.iloc[1:].set_axis([str(c).strip() for c in df.iloc[0]], axis=1).reset_index(drop=True)
    # Blank lines at the very end are formatting, not data; blank lines elsewhere are rejected as empty rows.
    if len(df):
        blank = (df == "").all(axis=1).to_numpy()
        keep = len(df) - int(np.argmin(blank[::-1])) if not blank.all() else 0
        df = df.iloc[:keep]
    return df


def _require_columns(raw: pd.DataFrame, names: tuple[str, ...], layout: str) -> dict[str, str]:
    """Map each required (case-insensitive) column name to the header's spelling; reject on line 1 if one is missing."""
    found: dict[str, str] = {}
    for col in raw.columns:
        key = col.lower()
        if key in found:
            raise ImportRejected(1, f"column {key!r} appears twice in the header", field=key)
        found[key] = col
    missing = [n for n in names if n not in found]
    if missing:
        raise ImportRejected(
            1, f"header lacks column(s) {', '.join(missing)}; expected a header like {layout}", field=missing[0]
        )
    if raw.empty:
        raise ImportRejected(2, "the file has a header but no data rows")
    return {n: found[n] for n in names}


class TimeframeMismatch(InvalidArgument):
    """The candles of a file are `spacing_ms` apart (the most common step between them), not one `timeframe`."""

    def __init__(self, timeframe: str, spacing_ms: int):
        super().__init__(f"the candles are {format_duration(spacing_ms)} apart, not {timeframe}", field="timeframe")
        self.timeframe = timeframe
        self.spacing_ms = spacing_ms


def candle_spacing_ms(open_times_ms) -> int | None:
    """The most common step between distinct open times (the smallest on a tie); None for fewer than two."""
    t = np.unique(np.asarray(open_times_ms, dtype=np.int64))
    if t.size < 2:
        return None
    steps, counts = np.unique(np.diff(t), return_counts=True)
    return int(steps[np.argmax(counts)])


def check_timeframe_spacing(open_times_ms, timeframe: str) -> None:
    """TimeframeMismatch when the most common step between the candles is another timeframe than the given one (gaps
    are fine; a step that is no timeframe at all is left to the row checks, which name the line at fault)."""
    from shared.timeframes import TIMEFRAME_MS

    spacing = candle_spacing_ms(open_times_ms)
    if spacing is not None and spacing != _timeframe_ms(timeframe) and spacing in TIMEFRAME_MS.values():
        raise TimeframeMismatch(timeframe, spacing)


# --------------------------------------------------------------------------------------------------------------------
# vectorised checks


class _Checks:
    """Collects vectorised row checks and keeps the earliest failing row; on a tie the check added first wins."""

    def __init__(self, n_rows: int, first_line: int):
        self.first_line = first_line
        self._row = n_rows
        self._describe: Callable[[int], str] | None = None
        self._field: str | None = None

    def add(self, bad: np.ndarray, describe: Callable[[int], str], field: str) -> None:
        idx = np.flatnonzero(bad)
        if idx.size and idx[0] < self._row:
            self._row, self._describe, self._field = int(idx[0]), describe, field

    def first(self) -> tuple[int, str, str] | None:
        """(row index, reason, field) of the first failing row, or None."""
        if self._describe is None:
            return None
        return self._row, self._describe(self._row), self._field or ""

    def raise_first(self) -> None:
        found = self.first()
        if found is not None:
            row, reason, field = found
            raise ImportRejected(row + self.first_line, reason, field=field)


def _raw(raw: pd.DataFrame, col: str, i: int) -> str:
    return str(raw[col].iat[i]).strip()


def _numbers(col: pd.Series, checks: _Checks, name: str) -> np.ndarray:
    """Floats of a string column; empty, unparseable and non-finite fields fail the check."""
    values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)

    def describe(i: int) -> str:
        text = str(col.iat[i]).strip()
        if text == "":
            return f"{name} is missing"
        try:
            float(text)
        except ValueError:
            return f"cannot parse {name} {text!r} as a number"
        return f"{name} is {text}; expected a finite number"

    checks.add(~np.isfinite(values), describe, name)
    return values


def _integers(col: pd.Series, checks: _Checks, name: str) -> np.ndarray:
    """Non-negative integers of a string column (epoch times); anything else fails the check and reads as 0."""
    s = col.astype(str)
    ok = s.str.fullmatch(_DIGITS.pattern).to_numpy(dtype=bool, na_value=False) & (
        s.str.strip().str.len().to_numpy() <= 18  # fits int64
    )
    checks.add(~ok, lambda i: f"cannot parse {name} {str(col.iat[i]).strip()!r} as an integer epoch time", name)
    out = np.zeros(len(s), dtype=np.int64)
    out[ok] = s[ok].str.strip().astype(np.int64).to_numpy()
    return out


def _timestamps(col: pd.Series, checks: _Checks, name: str) -> np.ndarray:
    """Epoch milliseconds of an ISO-8601 or epoch-ms column; the first data row decides which of the two it is."""
    if len(col) and _DIGITS.fullmatch(str(col.iat[0])):
        ms = _integers(col, checks, name)
        _check_range(ms, checks, name, lambda i: f"{ms[i]} (read as epoch milliseconds)")
        return ms

    parsed = pd.to_datetime(col, format="ISO8601", utc=True, errors="coerce")
    naive = parsed.dt.tz_convert(None).to_numpy()  # UTC datetime64 in pandas' unit; NaT where unparsed
    i8 = naive.view(np.int64)
    valid = ~np.asarray(parsed.isna(), dtype=bool)
    per_ms = {"s": None, "ms": 1, "us": 1_000, "ns": 1_000_000}[np.datetime_data(naive.dtype)[0]]
    if per_ms is None:
        ms = i8 * 1000
        whole = np.ones(len(i8), dtype=bool)
    else:
        ms = i8 // per_ms
        whole = i8 % per_ms == 0

    def describe(i: int) -> str:
        text = str(col.iat[i]).strip()
        if text == "":
            return f"{name} is missing"
        try:
            outside = not MIN_TIME_MS <= parse_time(text) < MAX_TIME_MS
        except (ValueError, OverflowError):
            outside = False
        if outside:
            return f"{name} {text!r} is outside {ms_to_iso(MIN_TIME_MS)}..{ms_to_iso(MAX_TIME_MS)}"
        return f"cannot parse {name} {text!r}; expected ISO-8601 UTC like {_ISO_EXAMPLE} (as on the first row)"

    checks.add(~valid, describe, name)
    checks.add(valid & ~whole, lambda i: f"{name} {str(col.iat[i]).strip()!r} is not a whole millisecond", name)
    ms = np.where(valid, ms, 0)
    _check_range(np.where(valid, ms, MIN_TIME_MS), checks, name, lambda i: repr(str(col.iat[i]).strip()))
    return ms


def _check_range(ms: np.ndarray, checks: _Checks, name: str, shown: Callable[[int], str]) -> None:
    checks.add(
        (ms < MIN_TIME_MS) | (ms >= MAX_TIME_MS),
        lambda i: (
            f"{name} {shown(i)} is outside {ms_to_iso(MIN_TIME_MS)}..{ms_to_iso(MAX_TIME_MS)}; "
            "expected epoch milliseconds or ISO-8601"
        ),
        name,
    )


def _check_candle_values(
    values: dict[str, np.ndarray], checks: _Checks, shown: Callable[[str, int], str]
) -> None:
    """Prices finite and positive, volume finite and non-negative, high >= low (finiteness is checked on parsing)."""
    for name in PRICE_COLUMNS:

        def not_positive(i: int, n: str = name) -> str:
            return f"{n} is {shown(n, i)}; prices must be positive"

        checks.add(values[name] <= 0, not_positive, name)
    checks.add(
        values["volume"] < 0, lambda i: f"volume is {shown('volume', i)}; volume must not be negative", "volume"
    )
    checks.add(
        values["high"] < values["low"],
        lambda i: f"high {shown('high', i)} is below low {shown('low', i)}",
        "high",
    )
    # A consistent candle has low <= min(open, close) and max(open, close) <= high.
    for name in ("open", "close"):

        def outside(i: int, n: str = name) -> str:
            side, bound = ("below", "low") if values[n][i] < values["low"][i] else ("above", "high")
            return f"{n} {shown(n, i)} is {side} {bound} {shown(bound, i)}; expected low <= {n} <= high"

        checks.add((values[name] < values["low"]) | (values[name] > values["high"]), outside, name)


def _check_duplicates(ts: np.ndarray, checks: _Checks, name: str) -> None:
    dup = pd.Series(ts).duplicated(keep="first").to_numpy()

    def describe(i: int) -> str:
        first = int(np.flatnonzero(ts == ts[i])[0])
        return f"duplicate {name} {ms_to_iso(int(ts[i]))} (also on line {first + checks.first_line})"

    checks.add(dup, describe, name)


# --------------------------------------------------------------------------------------------------------------------
# frames built in code (not read from a file)


def check_candles(df: pd.DataFrame, timeframe: str) -> pd.DataFrame:
    """Validate a candle frame built in code; returns it with canonical dtypes. Errors name the 0-based row."""
    tf_ms = _timeframe_ms(timeframe)
    missing = [c for c in CANDLE_COLUMNS if c not in df.columns]
    if missing:
        raise InvalidArgument(f"candles lack column(s) {', '.join(missing)}", field=missing[0])
    checks = _Checks(len(df), first_line=0)
    ts = _int_column(df["open_time_ms"], "open_time_ms")
    values = {}
    for name in (*PRICE_COLUMNS, "volume"):
        v = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)

        def not_finite(i: int, n: str = name, v: np.ndarray = v) -> str:
            return f"{n} is {v[i]}; expected a finite number"

        checks.add(~np.isfinite(v), not_finite, name)
        values[name] = v
    _check_candle_values(values, checks, lambda n, i: repr(float(values[n][i])))
    checks.add(
        ts % tf_ms != 0,
        lambda i: f"open_time_ms {ts[i]} is not aligned to the {timeframe} timeframe",
        "open_time_ms",
    )
    dup = pd.Series(ts).duplicated().to_numpy()
    checks.add(dup, lambda i: f"duplicate open_time_ms {ts[i]}", "open_time_ms")
    _raise_row(checks, "candles")
    out = {"open_time_ms": ts}
    out.update({name: values[name] for name in (*PRICE_COLUMNS, "volume")})
    return pd.DataFrame(out)


def check_series(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Validate a `time_ms,value` frame built in code; returns it with canonical dtypes. Errors name the 0-based row."""
    if kind not in SERIES_KINDS:
        raise InvalidArgument(f"kind {kind!r} is not a series; expected one of {', '.join(SERIES_KINDS)}", field="kind")
    missing = [c for c in SERIES_COLUMNS if c not in df.columns]
    if missing:
        raise InvalidArgument(f"{kind} series lacks column(s) {', '.join(missing)}", field=missing[0])
    checks = _Checks(len(df), first_line=0)
    ts = _int_column(df["time_ms"], "time_ms")
    v = pd.to_numeric(df["value"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    checks.add(~np.isfinite(v), lambda i: f"value is {v[i]}; expected a finite number", "value")
    if kind == "open-interest":
        checks.add(v <= 0, lambda i: f"open interest is {v[i]}; it must be > 0", "value")
    checks.add(pd.Series(ts).duplicated().to_numpy(), lambda i: f"duplicate time_ms {ts[i]}", "time_ms")
    _raise_row(checks, f"{kind} series")
    return pd.DataFrame({"time_ms": ts, "value": v})


def _int_column(col: pd.Series, name: str) -> np.ndarray:
    if not pd.api.types.is_integer_dtype(col.dtype):
        raise InvalidArgument(f"{name} must be an integer column of epoch milliseconds, not {col.dtype}", field=name)
    ts = col.to_numpy(dtype=np.int64)
    bad = np.flatnonzero((ts < MIN_TIME_MS) | (ts >= MAX_TIME_MS))
    if bad.size:
        i = int(bad[0])
        raise InvalidArgument(
            f"row {i}: {name} {ts[i]} is outside {ms_to_iso(MIN_TIME_MS)}..{ms_to_iso(MAX_TIME_MS)} "
            "(expected epoch milliseconds)",
            field=name,
        )
    return ts


def _raise_row(checks: _Checks, what: str) -> None:
    found = checks.first()
    if found is not None:
        row, reason, field = found
        raise InvalidArgument(f"{what} row {row}: {reason}", field=field)


# --------------------------------------------------------------------------------------------------------------------
# derived data


def resample(df: pd.DataFrame, from_tf: str, to_tf: str) -> pd.DataFrame:
    """Aggregate sorted, aligned candles to a coarser timeframe, keeping only buckets with every constituent candle.

    A bucket with a missing candle would have a wrong open, close, range or volume, so it is left out rather than
    approximated.
    """
    from_ms, to_ms = _timeframe_ms(from_tf), _timeframe_ms(to_tf, field="resample")
    if to_ms <= from_ms or to_ms % from_ms:
        raise InvalidArgument(
            f"cannot resample {from_tf} to {to_tf}: the target must be a longer timeframe and a whole multiple of "
            f"{from_tf}",
            field="resample",
        )
    t = df["open_time_ms"].to_numpy(dtype=np.int64)
    if t.size == 0:
        return pd.DataFrame({c: np.array([], dtype=np.int64 if c == "open_time_ms" else float) for c in CANDLE_COLUMNS})
    if np.any(np.diff(t) <= 0):
        raise InvalidArgument("resample needs candles sorted by open_time_ms without duplicates", field="open_time_ms")
    if np.any(t % from_ms):
        raise InvalidArgument(f"resample needs candles aligned to {from_tf}", field="open_time_ms")
    bucket = t - t % to_ms
    starts, first, counts = np.unique(bucket, return_index=True, return_counts=True)
    last = first + counts - 1
    complete = counts == to_ms // from_ms
    cols = {name: df[name].to_numpy(dtype=np.float64) for name in (*PRICE_COLUMNS, "volume")}
    out = pd.DataFrame(
        {
            "open_time_ms": starts,
            "open": cols["open"][first],
            "high": np.maximum.reduceat(cols["high"], first),
            "low": np.minimum.reduceat(cols["low"], first),
            "close": cols["close"][last],
            "volume": np.add.reduceat(cols["volume"], first),
        }
    )
    return out[complete].reset_index(drop=True)


def find_gaps(open_times_ms, tf_ms: int) -> list[tuple[int, int]]:
    """(first missing open time, number of missing candles) for each hole in sorted, unique open times."""
    t = np.asarray(open_times_ms, dtype=np.int64)
    if t.size < 2:
        return []
    d = np.diff(t)
    idx = np.flatnonzero(d > tf_ms)
    return [(int(t[i] + tf_ms), int(d[i] // tf_ms - 1)) for i in idx]


def _timeframe_ms(timeframe: str, field: str = "timeframe") -> int:
    try:
        return timeframe_ms(timeframe)
    except ValueError as exc:
        raise InvalidArgument(str(exc), field=field) from None
