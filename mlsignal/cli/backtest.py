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
            "ML_RANGE_PROB, ML_READY, ML_IN_SAMPLE, ML_MODEL_ID, the model's training window and its label (what "
            "`mlsignal backtest` holds), and funding_rate when the candles have it. Exit status 0 on "
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
    sig.add_argument("--volatility-bars", type=int, default=0, metavar="BARS",
                     help="volatility-scaled barrier instead of --threshold: the standard deviation of the last BARS "
                          "1-bar returns (with --volatility-multiple)")
    sig.add_argument("--volatility-multiple", type=float, default=0.0, metavar="K",
                     help="the barrier is K x that volatility x sqrt(horizon)")
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
        help="backtest of walk-forward or predicted signals that trades the label: strategy, RSI only, buy-and-hold",
        description=(
            "Read a signal file (written by backtest-signals, or by predict --csv) and print total return, max "
            "drawdown, annualised Sharpe, trades, hit rate and exposure for: long when ML_UP_PROB - ML_DOWN_PROB > "
            "--edge-min (and, if given, ML_UP_PROB > --up-min) and RSI < --rsi-max; the same rule without the ML "
            "condition; and buy-and-hold; then the strategy's Sharpe ratio with its probabilistic and deflated "
            "Sharpe ratios and the number of trials (`sharpe 0.53  PSR 0.81  DSR 0.42  trials 12`), and a verdict. "
            "By default each entry is held for its model's label horizon (--hold label; a triple-barrier model "
            "exits at the first barrier crossed); --hold candle re-decides every candle. Fees are charged per side, "
            "funding where the file has a funding_rate column. Every row's model and training window is checked in "
            "the registry (the training service): a row the model was trained on, or predicted before its "
            "training window ended, is refused. Trials are the market's distinct research configurations in the "
            "registry plus the rules of this run (plus --extra-trials); without the registry the backtest refuses "
            "to run unless --trials is given and the file carries train_end_ms and the label columns. The "
            "thresholds are fixed inputs: choose them before looking at the period, never by trying values on it. "
            "Exit status 0 on success, 2 when the file or the registry refuses."
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
    bt.add_argument("--hold", type=_hold_arg, default="label", metavar="label|candle",
                    help="label: hold each entry for its model's label horizon, to the first barrier for a "
                         "triple-barrier model (default); candle (or 1): re-decide at every close, hold one candle")
    bt.add_argument("--overlap", choices=("ignore", "stack"), default="ignore",
                    help="holding the label, a signal while a position is open: ignore it (default), or stack: "
                         "every signal opens its own sleeve of 1/horizon of equity")
    bt.add_argument("--funding-interval", type=_duration_arg, default=8 * 3_600_000, metavar="DUR",
                    help="funding is settled every DUR from 00:00 UTC when the file has a funding_rate column "
                         "(default 8h)")
    bt.add_argument("--trials", type=_int_at_least(1), metavar="N",
                    help="the number of configurations tried, instead of counting them in the registry (needed "
                         "when the training service cannot be reached)")
    bt.add_argument("--extra-trials", type=_int_at_least(0), default=0, metavar="N",
                    help="rules already tried on these signals before this run, added to the trial count (default 0)")
    bt.add_argument("--symbol", help="the signals' market, to list only its models (default: every model)")
    bt.add_argument("--training-target", metavar="ADDR",
                    help="training service address, for the registry (default: MLSIGNAL_TRAINING_ADDR, "
                         "127.0.0.1:50051)")
    bt.add_argument("--timeframe", metavar="TF", choices=list(TIMEFRAME_MS),
                    help="timeframe of the signals (default: read from the candle spacing)")
    add_security_arguments(bt)
    bt.set_defaults(func=_backtest)


def _hold_arg(text: str) -> str:
    value = text.strip().lower()
    if value in ("candle", "1"):
        return "candle"
    if value == "label":
        return "label"
    raise argparse.ArgumentTypeError(f"expected label, candle or 1, got {text!r}")


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse


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
                n_estimators=args.trees, random_state=args.seed, label_kind=args.label,
                volatility_bars=args.volatility_bars, volatility_multiple=args.volatility_multiple,
                on_progress=on_progress,
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


def _model_ids(signals) -> list[str]:
    if "ML_MODEL_ID" not in signals.columns:
        return []
    ids = signals["ML_MODEL_ID"].dropna().astype(str)
    return sorted({i for i in ids if i and i.lower() != "nan"})


def _registry(args, signals):
    """The registry's models (ListModels on the training service), or the reason it could not be reached."""
    from mlsignal.cli.security import security_kwargs
    from mlsignal.client import DeadlineExceededError, TrainingClient, UnavailableError
    from shared.settings import Settings

    target = args.training_target or Settings.from_env().training_addr
    try:
        with TrainingClient(target, **security_kwargs(args)) as training:
            return training.list_models(args.symbol or "", ""), target, None
    except (UnavailableError, DeadlineExceededError) as exc:
        return None, target, exc


@client_errors
def _backtest(args) -> int:
    from mlsignal.backtest import (
        LABEL_COLUMNS,
        StrategyRule,
        TrialCount,
        attach_model_info,
        count_trials,
        format_report,
        run_backtest,
    )
    from mlsignal.walkforward import read_signals

    signals = read_signals(args.signals)
    rule = StrategyRule(up_min=args.up_min, rsi_max=args.rsi_max, down_max=args.down_max,
                        rsi_period=args.rsi_period, edge_min=args.edge_min)
    models, target, unreachable = _registry(args, signals)
    ids = _model_ids(signals)
    trials: TrialCount | int
    if models is None:
        needs = ["train_end_ms", *(LABEL_COLUMNS if args.hold == "label" else ())]
        lacking = [c for c in needs if c not in signals.columns]
        if args.trials is None or lacking:
            why = []
            if args.trials is None:
                why.append("to count the configurations tried on this market (or pass --trials N)")
            if lacking:
                why.append(f"to look up {', '.join(lacking)} of the signals' models by ML_MODEL_ID")
            print(f"error: the registry (training service at {target}) cannot be reached: {unreachable}; the "
                  f"backtest needs it {' and '.join(why)}", file=sys.stderr)
            return 2
        print(f"note: the registry (training service at {target}) cannot be reached; the training windows and "
              f"labels are the file's own, and trials {args.trials} as given", file=sys.stderr)
        trials = args.trials
    else:
        by_id = {m.model_id: m for m in models}
        if ids:
            signals = attach_model_info(signals, by_id)
        given = args.trials is not None
        trials = args.trials if given else count_trials(models, ids, rules=1, extra=args.extra_trials)
    result = run_backtest(signals, rule, fee_bps=args.fee_bps, delay_bars=args.delay, timeframe=args.timeframe,
                          hold=args.hold, overlap=args.overlap, funding_interval_ms=args.funding_interval,
                          trials=trials)
    print(format_report(result))
    if result.strategy.trades == 0:
        up = signals["ML_UP_PROB"].max()
        print(f"warning: the rule never fired (0 trades). The highest ML_UP_PROB in these signals is {up:.3f}; "
              "calibrated probabilities stay near the class base rates, so compare the classes (--edge-min) "
              "instead of a fixed level (--up-min).", file=sys.stderr)
    return 0
