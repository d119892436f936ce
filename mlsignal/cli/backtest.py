"""`mlsignal backtest-signals|backtest`: walk-forward out-of-sample signals, and a long/flat backtest on them."""

from __future__ import annotations

import argparse
import sys

from mlsignal.cli.training import client_errors
from shared.timeframes import TIMEFRAME_MS, ms_to_iso, parse_duration, parse_time


def _duration_arg(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _time_arg(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub) -> None:
    from mlsignal.cli.security import add_security_arguments

    sig = sub.add_parser(
        "backtest-signals",
        help="walk-forward out-of-sample ML signals through the training and inference services",
        description=(
            "Cut [--start, --end) into steps of --step. For each step train a model on the --train-window of candles "
            "that ends horizon candles before the step (the purge: training labels look that far ahead), then "
            "predict the step's candles with that model pinned. Every row is out-of-sample for its model; this is "
            "checked, and a violation aborts without writing. Candles are read from MLSIGNAL_DATABASE_URL. The "
            "output (CSV, or Parquet with pyarrow) has one row per candle: OHLCV, ML_UP_PROB, ML_DOWN_PROB, "
            "ML_RANGE_PROB, ML_READY, ML_IN_SAMPLE, ML_MODEL_ID and the model's training window. Exit status 0 on "
            "success, 1 when the out-of-sample check fails or a training job fails, 2 when a request is refused."
        ),
    )
    sig.add_argument("--symbol", required=True, help="market symbol as stored, like BTC/USDT")
    sig.add_argument("--timeframe", required=True, metavar="TF", choices=list(TIMEFRAME_MS),
                     help=f"one of {' '.join(TIMEFRAME_MS)}")
    sig.add_argument("--start", required=True, type=_time_arg, help="first candle of the evaluation, ISO-8601 UTC")
    sig.add_argument("--end", required=True, type=_time_arg, help="end of the evaluation, exclusive, ISO-8601 UTC")
    sig.add_argument("--train-window", required=True, type=_duration_arg, metavar="DUR",
                     help="length of each training window, like 365d")
    sig.add_argument("--step", required=True, type=_duration_arg, metavar="DUR",
                     help="how long each model is used before the next retraining, like 30d")
    sig.add_argument("--horizon", type=int, default=0, metavar="BARS",
                     help="label horizon in candles (default: the service default, 24); also the purge")
    sig.add_argument("--threshold", type=float, default=0.0,
                     help="label threshold as a fraction, 0.02 means 2%% (default: the service default, 0.02)")
    sig.add_argument("--label", choices=("fixed-horizon", "triple-barrier"), default=None,
                     help="label of every step's model: the return --horizon candles later (fixed-horizon) or the "
                          "first of +-threshold crossed within --horizon candles (triple-barrier) "
                          "(default: fixed-horizon)")
    sig.add_argument("--trees", type=int, default=0, metavar="N", help="number of trees (default: 200)")
    sig.add_argument("--seed", type=int, help="random seed of every forest (default: the service default, 42)")
    sig.add_argument("--out", required=True, metavar="FILE", help="output file, .csv (or .csv.gz) or .parquet")
    sig.add_argument("--training-target", metavar="ADDR",
                     help="training service address (default: MLSIGNAL_TRAINING_ADDR, 127.0.0.1:50051)")
    sig.add_argument("--inference-target", metavar="ADDR",
                     help="inference service address (default: MLSIGNAL_INFERENCE_ADDR, 127.0.0.1:50052)")
    add_security_arguments(sig)
    sig.set_defaults(func=_signals, needs=("sqlalchemy",))

    bt = sub.add_parser(
        "backtest",
        help="long/flat backtest of walk-forward signals: strategy, RSI only and buy-and-hold",
        description=(
            "Read a signal file written by backtest-signals and print total return, max drawdown, annualised "
            "Sharpe, round trips, hit rate and exposure for: long when ML_UP_PROB - ML_DOWN_PROB > --edge-min (and, "
            "if given, ML_UP_PROB > --up-min) and RSI < --rsi-max; "
            "the same rule without the ML condition; and buy-and-hold. The position decided at a candle's close is "
            "held from --delay candles later; fees are charged per side on every change. The thresholds are fixed "
            "inputs: choose them before looking at the period, never by trying values on it."
        ),
    )
    bt.add_argument("--signals", required=True, metavar="FILE", help="signal file (.csv or .parquet)")
    # Calibrated probabilities stay near the class base rates (ML_UP_PROB rarely exceeds 0.45 with the default
    # label), so the default compares the classes with each other rather than with a fixed level.
    bt.add_argument("--up-min", type=_optional_float, default=None,
                    help="long only when ML_UP_PROB is above this; 'none' drops the condition (default: none)")
    bt.add_argument("--edge-min", type=_optional_float, default=0.0,
                    help="long only when ML_UP_PROB - ML_DOWN_PROB is above this; 'none' drops the condition "
                         "(default 0: up more likely than down)")
    bt.add_argument("--rsi-max", type=float, default=70.0, help="long only when RSI is below this (default 70)")
    bt.add_argument("--down-max", type=float, help="long only when ML_DOWN_PROB is below this (default: no filter)")
    bt.add_argument("--rsi-period", type=int, default=14, metavar="N", help="RSI window in candles (default 14)")
    bt.add_argument("--fee-bps", type=float, default=10.0, help="fee per side in basis points (default 10)")
    bt.add_argument("--delay", type=int, default=1, metavar="BARS",
                    help="candles between the decision and the first candle held, at least 1 (default 1)")
    bt.add_argument("--timeframe", metavar="TF", choices=list(TIMEFRAME_MS),
                    help="timeframe of the signals (default: read from the candle spacing)")
    bt.set_defaults(func=_backtest)


@client_errors
def _signals(args) -> int:
    from tqdm import tqdm

    from mlsignal.cli.security import security_kwargs
    from mlsignal.client import InferenceClient, TrainingClient, TrainingFailedError
    from mlsignal.walkforward import LeakageError, walk_forward, write_signals
    from shared.labels import LabelSpec
    from shared.settings import Settings
    from shared.store.db import make_engine
    from shared.store.marketdata import load_candles

    if args.start >= args.end:
        raise ValueError(f"--start {ms_to_iso(args.start)} must be before --end {ms_to_iso(args.end)}")
    settings = Settings.from_env()
    horizon = args.horizon or LabelSpec().horizon_bars
    purge_ms = horizon * TIMEFRAME_MS[args.timeframe]
    # The first training window is more history than any model's warm-up needs.
    engine = make_engine(settings.database_url)
    try:
        candles = load_candles(engine, args.symbol, args.timeframe, args.start - args.train_window - purge_ms,
                               args.end)
    finally:
        engine.dispose()
    if candles.empty:
        raise ValueError(f"no {args.symbol} {args.timeframe} candles stored for {ms_to_iso(args.start)} .. "
                         f"{ms_to_iso(args.end)} in the database")

    bar = tqdm(total=None, desc="steps", unit="step", file=sys.stderr)

    def on_progress(done: int, total: int, message: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(message.split(":")[0], refresh=False)
        bar.refresh()

    try:
        security = security_kwargs(args)
        with TrainingClient(args.training_target or settings.training_addr, **security) as training, \
                InferenceClient(args.inference_target or settings.inference_addr, **security) as inference:
            signals = walk_forward(
                training, inference, candles, args.symbol, args.timeframe, args.start, args.end,
                args.train_window, args.step, horizon_bars=horizon, threshold=args.threshold,
                n_estimators=args.trees, random_state=args.seed, label_kind=args.label, on_progress=on_progress,
            )
    except (LeakageError, TrainingFailedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    path = write_signals(signals, args.out)
    ready = int(signals["ML_READY"].sum())
    models = signals["ML_MODEL_ID"].nunique()
    times = signals["open_time_ms"].to_numpy()
    print(f"{len(signals)} rows {ms_to_iso(int(times[0]))} .. "
          f"{ms_to_iso(int(times[-1]))}, {models} models, {ready} ready, 0 in-sample, "
          f"horizon {horizon} bars purged -> {path}")
    return 0


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() == "none" else float(text)


@client_errors
def _backtest(args) -> int:
    from mlsignal.backtest import StrategyRule, format_report, run_backtest
    from mlsignal.walkforward import read_signals

    signals = read_signals(args.signals)
    rule = StrategyRule(up_min=args.up_min, rsi_max=args.rsi_max, down_max=args.down_max,
                        rsi_period=args.rsi_period, edge_min=args.edge_min)
    result = run_backtest(signals, rule, fee_bps=args.fee_bps, delay_bars=args.delay, timeframe=args.timeframe)
    print(format_report(result))
    if result.strategy.trades == 0:
        up = signals["ML_UP_PROB"].max()
        print(f"warning: the rule never fired (0 trades). The highest ML_UP_PROB in these signals is {up:.3f}; "
              "calibrated probabilities stay near the class base rates, so compare the classes (--edge-min) "
              "instead of a fixed level (--up-min).", file=sys.stderr)
    return 0
