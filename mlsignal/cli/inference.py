"""`mlsignal predict`: add ML_UP_PROB / ML_DOWN_PROB / ML_RANGE_PROB to a candle CSV through the inference service."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mlsignal.cli.training import client_errors
from shared.timeframes import TIMEFRAME_MS

REQUIRED = ("timestamp", "open", "high", "low", "close", "volume")
OPTIONAL = ("funding_rate", "open_interest")
_DIGITS = re.compile(r"-?\d+")


def register(sub) -> None:
    from mlsignal.cli.security import add_security_arguments

    p = sub.add_parser(
        "predict",
        help="add the ML probability columns to a candle CSV",
        description=(
            "Read candles from a CSV with the header timestamp,open,high,low,close,volume and optionally "
            "funding_rate,open_interest (timestamp ISO-8601 UTC or epoch milliseconds; .gz and other compressions "
            "are read by extension; an empty optional field means absent), or a Binance kline file (12 fields, "
            "no header, as `data import` reads it). Write the rows with ML_UP_PROB, ML_DOWN_PROB, "
            "ML_RANGE_PROB, ML_READY, ML_IN_SAMPLE, ML_MODEL_ID, ML_OOD_SCORE and ML_OOD added, and a one-line "
            "summary to stderr. Probabilities are empty while a row is not ready (fewer than warmup_bars candles "
            "before it)."
        ),
    )
    p.add_argument("--symbol", required=True, help="market symbol, like BTC/USDT")
    p.add_argument("--timeframe", required=True, metavar="TF", help=f"one of {' '.join(TIMEFRAME_MS)}")
    p.add_argument("--csv", required=True, type=Path, metavar="FILE", help="candle CSV, optionally compressed")
    p.add_argument("--out", metavar="FILE", help="output CSV (default: stdout)")
    p.add_argument("--target", metavar="ADDR",
                   help="inference service address (default: MLSIGNAL_INFERENCE_ADDR, 127.0.0.1:50052)")
    p.add_argument("--model-id", default="", metavar="ID", help="use this model instead of the one serving now")
    add_security_arguments(p)
    p.set_defaults(func=_predict)


def read_candle_file(path: Path, timeframe: str):
    """Candles of a generic CSV or a Binance kline file, as (frame for InferenceClient.predict, rows to write).

    Both layouts are checked row by row before anything is sent, so an error names the file's line, not a request
    row. ValueError names the line at fault.
    """
    from shared.errors import MlsignalError
    from shared.store.importers import detect_format, read_candles

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        fmt = detect_format(path)
    except MlsignalError:
        fmt = "csv"  # read_candle_csv says what is wrong with the header
    if fmt == "csv":
        frame, raw = read_candle_csv(path)
        _check_consistency(frame, path)
        return frame, raw
    import pandas as pd

    try:
        candles = read_candles(path, timeframe, "binance")
    except MlsignalError as exc:
        raise ValueError(f"{path}: {exc}") from None
    index = pd.DatetimeIndex(pd.to_datetime(candles["open_time_ms"].to_numpy(), unit="ms", utc=True))
    frame = candles.drop(columns=["open_time_ms"]).set_index(index)
    raw = pd.DataFrame({"timestamp": index.strftime("%Y-%m-%dT%H:%M:%SZ")})
    for name in REQUIRED[1:]:
        raw[name] = candles[name].to_numpy()
    return frame, raw


def _check_consistency(frame, path: Path) -> None:
    """low <= min(open, close) and max(open, close) <= high, prices positive, volume not negative."""
    import numpy as np

    o, h, lo, c, v = (frame[n].to_numpy() for n in ("open", "high", "low", "close", "volume"))
    problems = [
        (~((o > 0) & (h > 0) & (lo > 0) & (c > 0) & np.isfinite(o + h + lo + c)),
         "prices must be finite and positive"),
        (~(lo <= np.minimum(o, c)), "low must not be above open or close"),
        (~(np.maximum(o, c) <= h), "high must not be below open or close"),
        (~((v >= 0) & np.isfinite(v)), "volume must be finite and not negative"),
    ]
    found = [(int(np.flatnonzero(bad)[0]), what) for bad, what in problems if bad.any()]
    if found:
        i, what = min(found)
        raise ValueError(f"{path} line {i + 2}: {what} (open {o[i]:g}, high {h[i]:g}, low {lo[i]:g}, "
                         f"close {c[i]:g}, volume {v[i]:g})")


def read_candle_csv(path: Path):
    """The CSV as read (text columns kept verbatim) with a UTC DatetimeIndex and numeric candle columns.

    Returns (frame for InferenceClient.predict, the raw text frame). ValueError names the line at fault.
    """
    import numpy as np
    import pandas as pd

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, compression="infer")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read as CSV: {exc}") from None
    names = {str(c).strip().lower(): c for c in raw.columns}
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise ValueError(f"{path}: header lacks {', '.join(missing)}; expected timestamp,open,high,low,close,volume"
                         "[,funding_rate,open_interest]")
    if raw.empty:
        raise ValueError(f"{path}: no data rows")

    def line(i: int) -> int:
        return int(i) + 2  # header is line 1

    text = raw[names["timestamp"]].str.strip()
    if _DIGITS.fullmatch(str(text.iat[0])):
        ok = text.str.fullmatch(_DIGITS.pattern).to_numpy(dtype=bool)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"{path} line {line(i)}: timestamp {text.iat[i]!r} is not epoch milliseconds "
                             "like the first row")
        ms = text.astype(np.int64).to_numpy()
        if ms.min() < 10**11:
            i = int(np.argmin(ms))
            raise ValueError(f"{path} line {line(i)}: timestamp {text.iat[i]} is before 1973 as epoch milliseconds; "
                             "epoch seconds must be multiplied by 1000")
        index = pd.DatetimeIndex(pd.to_datetime(ms, unit="ms", utc=True))
    else:
        parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
        bad = np.flatnonzero(parsed.isna().to_numpy())
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{path} line {line(i)}: cannot parse timestamp {text.iat[i]!r}; expected ISO-8601 UTC "
                             "like 2019-01-01T00:00:00Z or epoch milliseconds")
        index = pd.DatetimeIndex(parsed)
    steps = np.diff(index.as_unit("ns").asi8)
    if np.any(steps <= 0):
        i = int(np.flatnonzero(steps <= 0)[0]) + 1
        raise ValueError(f"{path} line {line(i)}: timestamp {text.iat[i]} does not come after the previous row's "
                         f"{text.iat[i - 1]}; rows must be in increasing time order without duplicates")

    frame = pd.DataFrame(index=index)
    for name in REQUIRED[1:]:
        frame[name] = _numbers(raw[names[name]], name, path, line, allow_empty=False)
    for name in OPTIONAL:
        if name in names:
            frame[name] = _numbers(raw[names[name]], name, path, line, allow_empty=True)
    return frame, raw


def _numbers(col, name: str, path: Path, line, allow_empty: bool):
    import numpy as np
    import pandas as pd

    text = col.str.strip()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    empty = (text == "").to_numpy()
    bad = np.isnan(values) & ~(empty & allow_empty)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = "is empty" if empty[i] else f"{text.iat[i]!r} is not a number"
        raise ValueError(f"{path} line {line(i)}: {name} {what}")
    return values


@client_errors
def _predict(args) -> int:
    from mlsignal.cli.security import security_kwargs
    from mlsignal.client import ML_COLUMNS, InferenceClient
    from shared.settings import Settings

    frame, raw = read_candle_file(args.csv, args.timeframe)
    target = args.target or Settings.from_env().inference_addr
    with InferenceClient(target, **security_kwargs(args)) as client:
        out = client.predict(frame, args.symbol, args.timeframe, model_id=args.model_id)
    result = raw.copy()
    for col in ML_COLUMNS:
        result[col] = out[col].to_numpy()
    if args.out and args.out != "-":
        result.to_csv(args.out, index=False)
    else:
        result.to_csv(sys.stdout, index=False)
        sys.stdout.flush()
    ready = int(out["ML_READY"].sum())
    in_sample = int(out["ML_IN_SAMPLE"].sum())
    ids = sorted(set(out["ML_MODEL_ID"]))
    summary = f"{len(out)} rows, {ready} ready, model {', '.join(ids)}, {in_sample} in-sample"
    if out["ML_OOD_SCORE"].notna().any():
        summary += f", {int(out['ML_OOD'].sum())} out of distribution"
    if in_sample:
        summary += " (in-sample rows lie inside the training window: not an honest backtest)"
    print(summary, file=sys.stderr)
    return 0
