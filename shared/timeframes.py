"""Timeframes and UTC time conversions; candles are aligned to their timeframe."""

from __future__ import annotations

import re
from datetime import datetime, timezone

TIMEFRAME_MS: dict[str, int] = {
    "1m": 60_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "4h": 14_400_000,
    "1d": 86_400_000,
}


def timeframe_ms(timeframe: str) -> int:
    """Length of one candle in milliseconds; ValueError for an unknown timeframe."""
    try:
        return TIMEFRAME_MS[timeframe]
    except KeyError:
        raise ValueError(
            f"timeframe {timeframe!r} is not supported; expected one of {' '.join(TIMEFRAME_MS)}"
        ) from None


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def datetime_to_ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(round(dt.timestamp() * 1000))


def ms_to_iso(ms: int) -> str:
    return ms_to_datetime(ms).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> int:
    """ISO-8601 date or datetime (UTC unless it says otherwise) to epoch milliseconds."""
    s = text.strip()
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO-8601 date or datetime") from None
    return datetime_to_ms(dt)


_DURATION = re.compile(r"(\d+)\s*([mhdw])")
_UNIT_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}


def parse_duration(text: str) -> int:
    """Milliseconds of a duration like 365d, 12h, 90m or 2w (m = minutes)."""
    m = _DURATION.fullmatch(text.strip().lower())
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a positive duration; expected a number and a unit m, h, d or w, like 365d "
                         "or 12h")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]
