"""`mlsignal loadtest`: load-test the inference service (closed or open loop), with latency percentiles."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared.timeframes import TIMEFRAME_MS

RPC_NAMES = ("Predict", "StreamPredict", "Health")


def _seconds_arg(text: str) -> float:
    from mlsignal.loadtest import parse_seconds

    try:
        return parse_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _rpc_arg(text: str) -> str:
    for name in RPC_NAMES:
        if text.lower() == name.lower():
            return name
    raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(RPC_NAMES)}")


def register(sub) -> None:
    from mlsignal.cli.security import add_security_arguments

    p = sub.add_parser(
        "loadtest",
        help="load-test the inference service: throughput and latency percentiles",
        description=(
            "Send Predict, StreamPredict or grpc.health.v1 Check calls to an inference service and report the "
            "count, errors by status code, throughput (requests/s and candles/s), latency p50/p90/p95/p99/max and "
            "a histogram. Closed loop by default: --concurrency workers each send back to back. With --rate the "
            "loop is open: requests are scheduled at a fixed total rate and latency counts from the scheduled send "
            "time, so a server that falls behind shows in the tail; sends that leave late are counted. Predict "
            "sends --history candles (default: the serving model's warmup_bars - 1) before --batch candles, so every "
            "measured candle is ready; StreamPredict opens one stream per worker, warms it up with --history "
            "candles (not measured) and then sends --batch new candles per message. Candles come from --csv or "
            "from the database (MLSIGNAL_DATABASE_URL), cycled. The --warmup period is left out of every figure. "
            "Exit status 0 when every measured request succeeded, 1 when some failed, 2 when the test cannot run."
        ),
    )
    p.add_argument("--target", metavar="ADDR",
                   help="inference service address (default: MLSIGNAL_INFERENCE_ADDR, 127.0.0.1:50052)")
    add_security_arguments(p)
    p.add_argument("--rpc", type=_rpc_arg, default="Predict", metavar="RPC",
                   help=f"one of {', '.join(RPC_NAMES)} (default: Predict)")
    p.add_argument("--symbol", default="", help="market symbol, like BTC/USD (not needed for Health)")
    p.add_argument("--timeframe", default="", metavar="TF", help=f"one of {' '.join(TIMEFRAME_MS)}")
    p.add_argument("--batch", type=_positive_int, default=1, metavar="N",
                   help="measured candles per request or stream message (default: 1)")
    p.add_argument("--history", type=int, metavar="N",
                   help="candles of history per Predict request and in each stream's warm-up message "
                        "(default: the serving model's warmup_bars - 1)")
    p.add_argument("--concurrency", type=_positive_int, default=1, metavar="N",
                   help="workers; in open loop the most requests in flight (default: 1)")
    p.add_argument("--connections", type=_positive_int, default=1, metavar="N",
                   help="gRPC channels the workers share, round robin (default: 1)")
    how_long = p.add_mutually_exclusive_group()
    how_long.add_argument("--duration", type=_seconds_arg, metavar="DUR",
                          help="measure for this long after the warm-up, like 30s or 2m (default: 10s)")
    how_long.add_argument("--requests", type=_positive_int, metavar="N",
                          help="measure this many requests after the warm-up")
    p.add_argument("--rate", type=float, metavar="R", help="open loop: requests per second in total")
    p.add_argument("--warmup", type=_seconds_arg, default=2.0, metavar="DUR",
                   help="time at the start left out of the figures (default: 2s)")
    p.add_argument("--timeout", type=_seconds_arg, default=30.0, metavar="DUR",
                   help="deadline of one Predict or Health call (default: 30s)")
    p.add_argument("--csv", type=Path, metavar="FILE",
                   help="candles from this file (timestamp,open,high,low,close,volume or Binance klines, optionally "
                        "compressed) instead of the database")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.set_defaults(func=_loadtest)


def _candles(args):
    from mlsignal.loadtest import LoadTestError
    from shared.store.importers import read_candles

    if args.csv is not None:
        if not args.csv.is_file():
            raise LoadTestError(f"{args.csv}: no such file")
        return read_candles(args.csv, args.timeframe)

    from shared.errors import Unavailable, one_line
    from shared.server.startup import database_label
    from shared.settings import Settings
    from shared.store.db import make_engine
    from shared.store.marketdata import load_candles

    url = Settings.from_env().database_url
    engine = make_engine(url)
    try:
        frame = load_candles(engine, args.symbol, args.timeframe)
    except Unavailable as exc:
        reason = one_line(exc.__cause__ or exc)  # the store keeps the driver's error as the cause
        raise LoadTestError(f"cannot read candles from the database: {reason}") from None
    finally:
        engine.dispose()
    if frame.empty:
        raise LoadTestError(f"no {args.symbol} {args.timeframe} candles in {database_label(url)}; import some with "
                            "`mlsignal data import` or pass --csv")
    return frame


def _loadtest(args) -> int:
    from mlsignal.cli.security import security_kwargs
    from mlsignal.loadtest import LoadTestConfig, LoadTestError, format_result, run_loadtest
    from shared.settings import Settings

    try:
        if args.rpc != "Health":
            if not args.symbol or not args.timeframe:
                raise LoadTestError(f"--rpc {args.rpc} needs --symbol and --timeframe")
            if args.timeframe not in TIMEFRAME_MS:
                raise LoadTestError(f"--timeframe {args.timeframe!r} is not one of {' '.join(TIMEFRAME_MS)}")
        cfg = LoadTestConfig(
            security=security_kwargs(args),
            target=args.target or Settings.from_env().inference_addr,
            rpc=args.rpc,
            symbol=args.symbol,
            timeframe=args.timeframe,
            batch=args.batch,
            concurrency=args.concurrency,
            duration=args.duration if args.duration is not None or args.requests is not None else 10.0,
            requests=args.requests,
            rate=args.rate,
            warmup=args.warmup,
            history=args.history,
            timeout=args.timeout,
            connections=args.connections,
        )
        cfg.check()
        candles = _candles(args) if args.rpc != "Health" else None
        result = run_loadtest(cfg, candles)
    except LoadTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(format_result(result))
    sys.stdout.flush()
    return 1 if result.errors else 0
