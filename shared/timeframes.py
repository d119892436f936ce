"""Timeframes and UTC time conversions; candles are aligned to their timeframe.

This module owns every conversion between epoch milliseconds and other time representations, so the services, the
client SDK and the command line agree on one rule: a `datetime` must carry its time zone (a naive one is refused,
because nothing says which zone it is in), while ISO-8601 text without an offset is UTC by convention.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import overload

from google.protobuf.timestamp_pb2 import Timestamp

TIMEFRAME_MS: dict[str, int] = {
    "1m": 60_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "4h": 14_400_000,
    "1d": 86_400_000,
}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def timeframe_ms(timeframe: str) -> int:
    """Length of one candle in milliseconds; ValueError for an unknown timeframe."""
    try:
        return TIMEFRAME_MS[timeframe]
    except KeyError:
        raise ValueError(
            f"timeframe {timeframe!r} is not supported; expected one of {' '.join(TIMEFRAME_MS)}"
        ) from None


def ms_to_datetime(ms: int) -> datetime:
    """A tz-aware UTC datetime, so it can never be mistaken for local time."""
    return _EPOCH + timedelta(milliseconds=int(ms))


def datetime_to_ms(dt: datetime) -> int:
    """Exact UTC epoch milliseconds of a tz-aware datetime (pandas Timestamps included).

    A naive datetime raises ValueError: guessing its zone would silently shift every candle by the local offset.
    Sub-millisecond precision raises too, since candle times are whole milliseconds and rounding would hide a
    misaligned value.
    """
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{dt!r} has no time zone; use a tz-aware value such as datetime(..., tzinfo=timezone.utc) "
                         "or pd.Timestamp(..., tz='UTC')")
    ms, rest = divmod(dt - _EPOCH, _ONE_MS)
    if rest:
        raise ValueError(f"{dt!r} has sub-millisecond precision; candle times are whole milliseconds")
    return int(ms)


def ms_to_iso(ms: int) -> str:
    """Second-resolution ISO-8601 UTC text (``2019-01-01T00:00:00Z``) for messages and reports."""
    return ms_to_datetime(ms).strftime("%Y-%m-%dT%H:%M:%SZ")


@overload
def ms_to_timestamp(ms: int) -> Timestamp: ...


@overload
def ms_to_timestamp(ms: None) -> None: ...


def ms_to_timestamp(ms: int | None) -> Timestamp | None:
    """A protobuf Timestamp; None stays None, which leaves an optional message field unset."""
    if ms is None:
        return None
    t = Timestamp()
    t.FromMilliseconds(int(ms))
    return t


def parse_time(text: str) -> int:
    """ISO-8601 date or datetime to epoch milliseconds; text without an offset is UTC."""
    s = text.strip()
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO-8601 date or datetime") from None
    fraction = re.search(r"[.,](\d+)", s)
    if fraction and fraction.group(1)[3:].strip("0"):  # fromisoformat would drop digits past the microsecond
        raise ValueError(f"{text!r} has sub-millisecond precision; candle times are whole milliseconds")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        return datetime_to_ms(dt)
    except ValueError:
        raise ValueError(f"{text!r} has sub-millisecond precision; candle times are whole milliseconds") from None


_DURATION = re.compile(r"(\d+)\s*([mhdw])")
_UNIT_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}


def parse_duration(text: str) -> int:
    """Milliseconds of a duration like 365d, 12h, 90m or 2w (m = minutes)."""
    m = _DURATION.fullmatch(text.strip().lower())
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a positive duration; expected a number and a unit m, h, d or w, like 365d "
                         "or 12h")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


def format_duration(ms: int) -> str:
    """A duration in the largest unit that divides it (d, h, m, s, else ms), e.g. 365d, 36h, 90m; `parse_duration`
    reads back the d, h and m forms."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
