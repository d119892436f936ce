"""`mlsignal stream`: replay a candle CSV over the live prediction stream, like a feed, one printed line per candle."""

from __future__ import annotations

import collections
import csv
import math
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlsignal.cli.inference import (
    OPTIONAL,
    REQUIRED,
    first_data_line,
    gaps_warning,
    not_ready_warning,
    read_candle_file,
    refused_candle,
)
from mlsignal.cli.training import client_errors
from shared.timeframes import TIMEFRAME_MS

COMPRESSED = (".gz", ".bz2", ".xz", ".zip", ".zst", ".tar")
BINANCE_FIELDS = 12


def register(sub) -> None:
    from mlsignal.cli.security import add_security_arguments

    p = sub.add_parser(
        "stream",
        help="replay a candle CSV over the live prediction stream and print each prediction as it arrives",
        description=(
            "Send the candles of FILE (the layouts `predict --csv` reads) to the inference service's live stream "
            "(StreamPredict), one candle per message, in file order, as a live feed would: the warm-up history is "
            "not sent in a first batch, so the first warmup_bars - 1 candles are printed as not ready. Each answer "
            "is printed as it arrives, one line per candle: the open time (ISO-8601 UTC), up=, down=, range= (the "
            "probabilities, - while not ready), ready=, in_sample=, model= and, when the model has one, ood_score= "
            "and ood=. A candle the service refuses is reported on stderr as `line L (time): <reason>` and the "
            "stream goes on. Without --follow every row is checked before anything is sent. With --follow the "
            "file is read line by line and then watched for new lines (a bad line is reported and skipped) until "
            "Ctrl-C or --max-candles. A summary goes to stderr at the end, with warnings when no candle was ready or "
            "the candles have gaps. Exit 0 (also after Ctrl-C); 2 when the file cannot be read or the stream fails."
        ),
    )
    p.add_argument("--symbol", required=True, help="market symbol, like BTC/USDT")
    p.add_argument("--timeframe", required=True, metavar="TF", help=f"one of {' '.join(TIMEFRAME_MS)}")
    p.add_argument("--csv", required=True, type=Path, metavar="FILE", help="candle CSV (compressed only without "
                   "--follow)")
    p.add_argument("--target", metavar="ADDR",
                   help="inference service address (default: MLSIGNAL_INFERENCE_ADDR, 127.0.0.1:50052)")
    p.add_argument("--model-id", default="", metavar="ID", help="use this model instead of the one serving now")
    p.add_argument("--follow", action="store_true",
                   help="keep reading lines appended to FILE, like tail -f (stop with Ctrl-C)")
    p.add_argument("--poll", type=float, default=1.0, metavar="SECONDS",
                   help="with --follow: how often to look for new lines (default 1)")
    p.add_argument("--max-candles", type=int, metavar="N",
                   help="stop once N candles have been answered (predicted or refused)")
    add_security_arguments(p)
    p.set_defaults(func=_stream)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def prediction_line(p) -> str:
    """One printed line for a LivePrediction."""
    from shared.timeframes import ms_to_iso

    yes = {True: "yes", False: "no"}
    text = (f"{ms_to_iso(p.open_time_ms)} up={_fmt(p.up)} down={_fmt(p.down)} range={_fmt(p.range)} "
            f"ready={yes[bool(p.ready)]} in_sample={yes[bool(p.in_sample)]} model={p.model_id}")
    if not math.isnan(p.ood_score):
        text += f" ood_score={p.ood_score:.3f} ood={yes[bool(p.ood)]}"
    return text


class FileFollower:
    """Complete lines of a growing (uncompressed) candle file as Candle messages, with their line numbers.

    Reads the generic CSV layout (a header with timestamp,open,high,low,close,volume[,funding_rate,open_interest])
    or Binance klines (12 fields, with or without a header). A line that cannot be read is reported on stderr as
    `line L: <reason>` and skipped.
    """

    def __init__(self, path: Path):
        if str(path).lower().endswith(COMPRESSED):
            raise ValueError(f"{path}: --follow reads plain text files; a compressed file cannot grow line by line")
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        self.path = path
        self.offset = 0
        self.line = 0
        self.layout: str | None = None
        self.columns: dict[str, int] = {}
        self.last_ms: int | None = None

    def poll(self) -> Iterator[tuple[int, Any]]:
        """The candles of the lines completed since the last call."""
        size = self.path.stat().st_size
        if size < self.offset:
            raise ValueError(f"{self.path} shrank from {self.offset} to {size} bytes while followed")
        if size == self.offset:
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        end = data.rfind(b"\n")
        if end < 0:
            return  # the line being written is not complete yet
        self.offset += end + 1
        for raw in data[:end].split(b"\n"):
            self.line += 1
            text = raw.decode("utf-8", "replace").strip()
            if not text:
                continue
            try:
                candle = self._candle(next(csv.reader([text])))
            except ValueError as exc:
                print(f"line {self.line}: {exc}", file=sys.stderr)
                continue
            if candle is not None:
                yield self.line, candle

    def _candle(self, fields: list[str]):
        from mlsignal.v1 import common_pb2

        fields = [f.strip() for f in fields]
        if self.layout is None:
            lower = [f.lower() for f in fields]
            if "timestamp" in lower:
                missing = [c for c in REQUIRED if c not in lower]
                if missing:
                    raise ValueError(f"header lacks {', '.join(missing)}; expected timestamp,open,high,low,close,"
                                     "volume[,funding_rate,open_interest]")
                self.layout = "csv"
                self.columns = {c: lower.index(c) for c in (*REQUIRED, *OPTIONAL) if c in lower}
                return None
            if len(fields) == BINANCE_FIELDS:
                self.layout = "binance"
                self.columns = {c: i for i, c in enumerate(REQUIRED)}
                if lower[0].replace(" ", "_") == "open_time":
                    return None
            else:
                raise ValueError("expected a header with timestamp,open,high,low,close,volume or a 12-field Binance "
                                 "kline row")
        if len(fields) < len(self.columns) or (self.layout == "binance" and len(fields) != BINANCE_FIELDS):
            raise ValueError(f"expected {BINANCE_FIELDS if self.layout == 'binance' else len(self.columns)} fields, "
                             f"found {len(fields)}")
        ms = _time_ms(fields[self.columns["timestamp"]])
        values = {}
        for name in REQUIRED[1:]:
            values[name] = _number(fields[self.columns[name]], name)
        o, h, lo, c, v = (values[n] for n in ("open", "high", "low", "close", "volume"))
        if not all(math.isfinite(x) and x > 0 for x in (o, h, lo, c)):
            raise ValueError("prices must be finite and positive")
        if not lo <= min(o, c) or not max(o, c) <= h:
            raise ValueError(f"open and close must lie between low and high (open {o:g}, high {h:g}, low {lo:g}, "
                             f"close {c:g})")
        if not (math.isfinite(v) and v >= 0):
            raise ValueError("volume must be finite and not negative")
        if self.last_ms is not None and ms < self.last_ms:
            raise ValueError("the time is before the previous line's; lines must be in time order (the same time "
                             "replaces the previous candle)")
        self.last_ms = ms
        candle = common_pb2.Candle(open_time_ms=ms, **values)
        for name in OPTIONAL:
            if name in self.columns and self.columns[name] < len(fields) and fields[self.columns[name]]:
                setattr(candle, name, _number(fields[self.columns[name]], name))
        return candle


def _time_ms(text: str) -> int:
    import pandas as pd

    if text.lstrip("-").isdigit():
        ms = int(text)
        if ms >= 10**14:  # Binance microseconds
            ms //= 1000
        if ms < 10**11:
            raise ValueError(f"timestamp {text} is before 1973 as epoch milliseconds")
        return ms
    try:
        t = pd.Timestamp(text)
    except ValueError:
        raise ValueError(f"cannot parse timestamp {text!r}; expected ISO-8601 UTC or epoch milliseconds") from None
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return int(t.value // 1_000_000)


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number") from None


def _file_candles(path: Path, timeframe: str) -> Iterator[tuple[int, Any]]:
    """(line, candle) of a whole file, checked row by row before the first is sent."""
    frame, _ = read_candle_file(path, timeframe)
    first = first_data_line(path)
    records = frame.reset_index(drop=True)
    from mlsignal.client.frames import candle_from_item, frame_times_ms

    times = frame_times_ms(frame)
    for i, row in enumerate(records.itertuples(index=False)):
        item = {"open_time_ms": int(times[i])}
        item.update({name: getattr(row, name) for name in (*REQUIRED[1:], *OPTIONAL) if hasattr(row, name)})
        yield first + i, candle_from_item(item)


@client_errors
def _stream(args) -> int:
    from mlsignal.cli.security import security_kwargs
    from mlsignal.client import InferenceClient, MlsignalClientError
    from shared.settings import Settings

    if args.timeframe not in TIMEFRAME_MS:
        raise ValueError(f"timeframe {args.timeframe!r} is not one of {' '.join(TIMEFRAME_MS)}")
    if args.max_candles is not None and args.max_candles < 1:
        raise ValueError("--max-candles must be at least 1")
    if args.poll <= 0:
        raise ValueError("--poll must be a positive number of seconds")
    stop = threading.Event()
    if args.follow:
        follower = FileFollower(args.csv)

        def source() -> Iterator[tuple[int, Any]]:
            while not stop.is_set():
                yield from follower.poll()
                stop.wait(args.poll)
    else:
        checked = list(_file_candles(args.csv, args.timeframe))  # every row checked before anything is sent

        def source() -> Iterator[tuple[int, Any]]:
            yield from checked

    # (line, open time) of each candle sent and not answered yet: answers come back in the order candles were sent.
    pending: collections.deque[tuple[int, int]] = collections.deque()
    sent_times: list[int] = []

    def candles() -> Iterator[Any]:
        for line, candle in source():
            if stop.is_set():
                return
            ms = int(candle.open_time_ms)
            pending.append((line, ms))
            sent_times.append(ms)
            yield candle

    answered = ready = refused = 0

    def on_error(exc: MlsignalClientError) -> None:
        nonlocal answered, refused
        line, ms = pending.popleft() if pending else (0, 0)
        where = refused_candle(exc.details, [line], [ms])
        if where is None:
            from shared.timeframes import ms_to_iso

            where = f"line {line} ({ms_to_iso(ms)}): {exc.details}"
        print(where, file=sys.stderr, flush=True)
        answered += 1
        refused += 1
        if args.max_candles is not None and answered >= args.max_candles:
            stop.set()

    target = args.target or Settings.from_env().inference_addr
    interrupted = False
    with InferenceClient(target, **security_kwargs(args)) as client:
        try:
            for p in client.stream(candles(), args.symbol, args.timeframe, model_id=args.model_id,
                                   on_error=on_error):
                if pending:
                    pending.popleft()
                answered += 1
                ready += bool(p.ready)
                print(prediction_line(p), flush=True)
                if args.max_candles is not None and answered >= args.max_candles:
                    stop.set()
                if stop.is_set():
                    break
        except KeyboardInterrupt:
            interrupted = True
        finally:
            stop.set()
        gaps = gaps_warning(sent_times, args.timeframe)
        if gaps:
            print(gaps, file=sys.stderr)
        if answered and not ready:
            print(not_ready_warning(client, args.symbol, args.timeframe, args.model_id, len(set(sent_times))),
                  file=sys.stderr)
    summary = f"{answered} candles answered, {ready} ready, {refused} refused"
    if interrupted:
        summary = f"stopped: {summary}"
    print(summary, file=sys.stderr)
    return 0
