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
# A candle the server names in a message: `candles[5].open_time_ms: ...` or `columns.close[5]: ...`.
_CANDLE_FIELD = re.compile(r"(?:candles\[(?P<i>\d+)\]\.(?P<name>\w+)|columns\.(?P<cname>\w+)\[(?P<ci>\d+)\]):?\s*")
# The frame rows of one request of several (InferenceClient.predict's note).
_REQUEST_ROWS = re.compile(r"frame rows (\d+)\.\.")


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
            "before it). A candle the service refuses is named by its file line and open time, like `line 52 "
            "(2019-09-03T02:30:00Z): open_time_ms ... is not aligned to the timeframe`. Warnings on stderr say when "
            "no row is ready (the history the model needs and the file's) and when the candles have gaps (how many "
            "candles are missing and where the first gap starts)."
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


def first_data_line(path: Path) -> int:
    """The file line of the first candle: 2 below a header, 1 for a Binance kline file without one."""
    import pandas as pd

    from shared.errors import MlsignalError
    from shared.store.importers import detect_format

    try:
        if detect_format(path) != "binance":
            return 2
        first = pd.read_csv(path, header=None, nrows=1, dtype=str, compression="infer")
    except (MlsignalError, ValueError, OSError, EOFError):
        return 2
    return 1 if _DIGITS.fullmatch(str(first.iat[0, 0]).strip()) else 2


def refused_candle(details: str, lines, times_ms, offset: int = 0) -> str | None:
    """`line L (ISO time): <what>` for a server message that names a candle by its index in the request
    (`candles[i].field: ...`), with the index mapped back to the file line; None when it names no candle.

    `lines[k]` and `times_ms[k]` are the file line and open time of candle k; `offset` is the index of the request's
    first candle among them."""
    from shared.timeframes import ms_to_iso

    m = _CANDLE_FIELD.search(details)
    if m is None:
        return None
    k = offset + int(m.group("i") or m.group("ci"))
    if not 0 <= k < len(lines):
        return None
    name = m.group("name") or m.group("cname")
    what = details[:m.start()] + f"{name} " + details[m.end():]
    return f"line {int(lines[k])} ({ms_to_iso(int(times_ms[k]))}): {what.strip()}"


def gaps_warning(times_ms, timeframe: str) -> str | None:
    """`warning: ...` naming how many candles are missing between the given open times and the first gap."""
    import numpy as np

    from shared.timeframes import ms_to_iso

    tf_ms = TIMEFRAME_MS[timeframe]
    t = np.unique(np.asarray(times_ms, dtype=np.int64))
    if t.size < 2:
        return None
    steps = np.diff(t)
    holes = np.flatnonzero(steps > tf_ms)
    if not holes.size:
        return None
    missing = int(sum(int(steps[i]) // tf_ms - 1 for i in holes))
    first = ms_to_iso(int(t[holes[0]]) + tf_ms)
    gaps = "1 gap" if holes.size == 1 else f"{holes.size} gaps"
    return (f"warning: the input has gaps: {missing} {timeframe} candle{'s' if missing != 1 else ''} missing in "
            f"{gaps}, the first at {first}; features after a gap span it")


def not_ready_warning(client, symbol: str, timeframe: str, model_id: str, candles: int) -> str:
    """`warning: no row is ready: ...` with the history the model needs (when the service says) and the input's."""
    from mlsignal.client import MlsignalClientError

    needed = None
    try:
        model = client.get_model(symbol, timeframe)
        if not model_id or model.model_id == model_id:
            needed = int(model.warmup_bars)
    except MlsignalClientError:
        pass
    have = f"the file has {candles}"
    if needed:
        return f"warning: no row is ready: the model needs {needed} candles of history, {have}"
    return f"warning: no row is ready: the model needs more candles of history than the file has ({candles})"


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
    from mlsignal.client import ML_COLUMNS, InferenceClient, MlsignalClientError
    from mlsignal.client.frames import frame_times_ms
    from shared.settings import Settings

    frame, raw = read_candle_file(args.csv, args.timeframe)
    times = frame_times_ms(frame)
    lines = [first_data_line(args.csv) + i for i in range(len(frame))]
    gaps = gaps_warning(times, args.timeframe)
    if gaps:
        print(gaps, file=sys.stderr)
    target = args.target or Settings.from_env().inference_addr
    with InferenceClient(target, **security_kwargs(args)) as client:
        try:
            out = client.predict(frame, args.symbol, args.timeframe, model_id=args.model_id)
        except MlsignalClientError as exc:
            rows = _REQUEST_ROWS.search(exc.note)
            where = refused_candle(exc.details, lines, times, int(rows.group(1)) if rows else 0)
            if where is None:
                raise
            raise type(exc)(exc.code, f"{args.csv} {where}") from exc
        if not out["ML_READY"].any():
            print(not_ready_warning(client, args.symbol, args.timeframe, args.model_id, len(out)), file=sys.stderr)
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
