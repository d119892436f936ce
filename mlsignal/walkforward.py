"""Walk-forward out-of-sample signals: retrain on a rolling window, predict only the candles that follow it.

The evaluation period [start, end) is cut into steps of `step_ms`. For step k, covering [s_k, s_k + step):

1. one model is trained (purpose "research": registered as RESEARCH, so it never changes the model that serves
   live) through the training service on the candles with open time in
   ``[s_k - train_window - purge, s_k - purge)``, where ``purge = horizon_bars * timeframe``. The label of a training
   candle looks `horizon_bars` candles ahead, so without the purge the labels of the last training candles would be
   computed from prices inside the step;
2. the step's candles are predicted with that model pinned (``model_id=``), preceded by enough earlier candles for the
   model's feature warm-up. The earlier candles are only history: they are not part of the output.

All trainings are submitted first and then awaited in order, so a service with several workers trains them
concurrently while the steps that are already trained are being predicted.

The result is checked before it is returned, and a failed check raises `LeakageError` instead of returning rows:
no row may be in-sample for its model (ML_IN_SAMPLE) and every row's open time must be later than its model's last
training candle plus the label horizon.

Example::

    >>> with TrainingClient("127.0.0.1:50051") as t, InferenceClient("127.0.0.1:50052") as c:   # doctest: +SKIP
    ...     candles = load_candles(engine, "BTC/USD", "1h", parse_time("2017-12-01"), parse_time("2019-07-01"))
    ...     signals = walk_forward(t, c, candles, "BTC/USD", "1h", parse_time("2019-01-01"), parse_time("2019-07-01"),
    ...                            train_window_ms=365 * DAY_MS, step_ms=30 * DAY_MS, random_state=42)
    >>> write_signals(signals, "signals.csv")                                                      # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlsignal.backtest import LABEL_COLUMNS, VOLATILITY_COLUMNS  # the label each row's model was trained on
from mlsignal.client import (
    InferenceClient,
    ResourceExhaustedError,
    TrainingClient,
    TrainingJobHandle,
    frame_times_ms,
    label_kind_name,
)
from shared.labels import LabelSpec, barriers
from shared.timeframes import ms_to_iso, timeframe_ms

__all__ = [
    "DAY_MS",
    "HOUR_MS",
    "LABEL_COLUMNS",
    "ML_SIGNAL_COLUMNS",
    "LeakageError",
    "Step",
    "check_out_of_sample",
    "plan_steps",
    "read_signals",
    "walk_forward",
    "write_signals",
]

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
ML_SIGNAL_COLUMNS = ("ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB", "ML_READY", "ML_IN_SAMPLE", "ML_MODEL_ID")
OUTPUT_COLUMNS = (
    "open_time_ms", "timestamp", "open", "high", "low", "close", "volume",
    *ML_SIGNAL_COLUMNS, "train_start_ms", "train_end_ms", *LABEL_COLUMNS, *VOLATILITY_COLUMNS, "ML_BARRIER", "step",
)  # fmt: skip (and funding_rate after volume when the candles carry funding rates)
_CANDLE_COLUMNS = ("open", "high", "low", "close", "volume")
_OPTIONAL_COLUMNS = ("funding_rate", "open_interest")
PARQUET_SUFFIXES = (".parquet", ".pq")

Progress = Callable[[int, int, str], None]


class LeakageError(RuntimeError):
    """A walk-forward row was predicted by a model whose training data reaches the row (or its label horizon)."""


@dataclass(frozen=True)
class Step:
    """One walk-forward step: predict [start_ms, end_ms) with a model trained on [train_start_ms, train_end_ms)."""

    index: int
    start_ms: int
    end_ms: int
    train_start_ms: int
    train_end_ms: int  # exclusive: the requested end_time

    def describe(self) -> str:
        return (f"step {self.index + 1}: {ms_to_iso(self.start_ms)} .. {ms_to_iso(self.end_ms)}, "
                f"trained on {ms_to_iso(self.train_start_ms)} .. {ms_to_iso(self.train_end_ms)}")


def plan_steps(start_ms: int, end_ms: int, train_window_ms: int, step_ms: int, purge_ms: int) -> list[Step]:
    """The steps covering [start_ms, end_ms); the last one is cut at end_ms.

    Example::

        >>> [(s.start_ms, s.end_ms, s.train_start_ms, s.train_end_ms) for s in plan_steps(100, 125, 50, 10, 5)]
        [(100, 110, 45, 95), (110, 120, 55, 105), (120, 125, 65, 115)]
    """
    for name, value in (("start_ms", start_ms), ("end_ms", end_ms), ("train_window_ms", train_window_ms),
                        ("step_ms", step_ms), ("purge_ms", purge_ms)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer number of milliseconds, got {value!r}")
    if start_ms >= end_ms:
        raise ValueError(f"start ({start_ms}) must be before end ({end_ms})")
    if train_window_ms <= 0 or step_ms <= 0:
        raise ValueError(f"train_window_ms and step_ms must be positive, got {train_window_ms} and {step_ms}")
    if purge_ms < 0:
        raise ValueError(f"purge_ms must not be negative, got {purge_ms}")
    steps: list[Step] = []
    s = int(start_ms)
    while s < end_ms:
        e = min(s + int(step_ms), int(end_ms))
        steps.append(Step(len(steps), s, e, s - int(purge_ms) - int(train_window_ms), s - int(purge_ms)))
        s = e
    return steps


def _candle_frame(candles: pd.DataFrame) -> pd.DataFrame:
    """Candles sorted by time with an int64 open_time_ms column and a UTC DatetimeIndex (what predict reads)."""
    if not isinstance(candles, pd.DataFrame):
        raise ValueError(f"candles must be a pandas DataFrame, got {type(candles).__name__}")
    missing = [c for c in _CANDLE_COLUMNS if c not in candles.columns]
    if missing:
        raise ValueError(f"candles lack column(s) {', '.join(missing)}; expected open_time_ms and "
                         f"{', '.join(_CANDLE_COLUMNS)}")
    if "open_time_ms" in candles.columns:
        times = candles["open_time_ms"].to_numpy(dtype=np.int64)
    else:
        times = frame_times_ms(candles)
    cols = [c for c in (*_CANDLE_COLUMNS, *_OPTIONAL_COLUMNS) if c in candles.columns]
    frame = pd.DataFrame({c: candles[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in cols})
    frame.insert(0, "open_time_ms", times)
    frame = frame.sort_values("open_time_ms", kind="stable").reset_index(drop=True)
    dup = frame["open_time_ms"].duplicated()
    if dup.any():
        raise ValueError(f"candles have a duplicate open time {ms_to_iso(int(frame['open_time_ms'][dup].iloc[0]))}")
    frame.index = pd.DatetimeIndex(pd.to_datetime(frame["open_time_ms"].to_numpy(), unit="ms", utc=True))
    return frame


def walk_forward(
    training: TrainingClient,
    inference: InferenceClient,
    candles: pd.DataFrame,
    symbol: str,
    timeframe: str,
    start_ms: int,
    end_ms: int,
    train_window_ms: int,
    step_ms: int,
    *,
    horizon_bars: int = 0,
    threshold: float = 0.0,
    n_estimators: int = 0,
    max_depth: int = 0,
    min_samples_leaf: int = 0,
    class_weight: str | None = None,
    random_state: int | None = None,
    label_kind: str | None = None,
    volatility_bars: int = 0,
    volatility_multiple: float = 0.0,
    on_progress: Progress | None = None,
) -> pd.DataFrame:
    """Walk-forward signals for the candles of `candles` with open time in [start_ms, end_ms).

    `candles` holds open_time_ms (or a tz-aware DatetimeIndex) and open, high, low, close, volume, optionally
    funding_rate and open_interest (NaN: absent), e.g. from `shared.store.marketdata.load_candles` or a CSV. It must
    include enough candles before `start_ms` for the model's warm-up (a model needs `warmup_bars`, about 100 hourly
    candles); rows without enough history come back with ML_READY false. The models themselves are trained by the
    training service on the candles stored in its database.

    Training parameters (0 / None: the service defaults) are the same for every step; `label_kind` is
    "fixed_horizon" or "triple_barrier" (None: the service default); `volatility_bars` and `volatility_multiple`
    (both or neither) make the barrier volatility-scaled instead of `threshold`. `on_progress(done_steps,
    total_steps, message)` is called once the jobs are submitted and after each step is trained and predicted.

    Returns one row per candle in [start_ms, end_ms), oldest first: open_time_ms, timestamp (UTC), open, high, low,
    close, volume, funding_rate (only when the candles carry funding rates: the rate as of each close, which a
    backtest charges a long position), ML_UP_PROB, ML_DOWN_PROB, ML_RANGE_PROB, ML_READY, ML_IN_SAMPLE (always
    false), ML_MODEL_ID, train_start_ms and train_end_ms (the model's first and last training candle, from its
    ModelInfo), the model's label ML_HORIZON_BARS, ML_THRESHOLD, ML_LABEL_KIND (fixed_horizon or triple_barrier),
    ML_VOLATILITY_BARS and ML_VOLATILITY_MULTIPLE (0: the fixed threshold), ML_BARRIER (the label's barrier at the
    row, a return: the threshold, or the volatility-scaled barrier from the closes up to the row, history before the
    period included; a backtest holds each position for this label) and step.

    Raises LeakageError if any row is in-sample for its model or is not later than its model's last training candle
    plus the label horizon; MlsignalClientError subclasses for refused calls (TrainingFailedError when a step's
    training fails). On an error the step trainings that have not finished are cancelled.
    """
    tf_ms = timeframe_ms(timeframe)
    horizon = int(horizon_bars) if horizon_bars else LabelSpec().horizon_bars
    if horizon < 1:
        raise ValueError(f"horizon_bars must be >= 1 (0 means the service default), got {horizon_bars}")
    purge_ms = horizon * tf_ms
    steps = plan_steps(start_ms, end_ms, train_window_ms, step_ms, purge_ms)
    frame = _candle_frame(candles)
    times = frame["open_time_ms"].to_numpy()
    bounds = [(int(np.searchsorted(times, s.start_ms)), int(np.searchsorted(times, s.end_ms))) for s in steps]
    work = [(s, b) for s, b in zip(steps, bounds, strict=True) if b[1] > b[0]]
    if not work:
        raise ValueError(f"candles have no rows in {ms_to_iso(start_ms)} .. {ms_to_iso(end_ms)}")
    total = len(work)
    report = on_progress or (lambda done, total, message: None)

    handles: list[TrainingJobHandle] = []
    try:
        for step, _ in work:
            handles.append(_submit(training, handles, symbol, timeframe, step, horizon, threshold, n_estimators,
                                   max_depth, min_samples_leaf, class_weight, random_state, label_kind,
                                   volatility_bars, volatility_multiple))
        report(0, total, f"submitted {total} training job(s)")

        infos: dict[str, object] = {}
        parts = []
        for done, ((step, (lo, hi)), handle) in enumerate(zip(work, handles, strict=True), start=1):
            job = handle.wait()
            info = _model_info(training, infos, symbol, timeframe, job.model_id)
            _check_model(info, step, symbol, timeframe, horizon)
            history = max(int(info.warmup_bars), 1)
            first = max(0, lo - history)
            chunk = frame.iloc[first:hi]
            predicted = inference.predict(chunk.drop(columns="open_time_ms"), symbol, timeframe,
                                          model_id=job.model_id)
            part = _output_rows(frame.iloc[lo:hi], predicted.iloc[lo - first:], info, step,
                                _row_barriers(frame, info)[lo:hi])
            check_out_of_sample(part, horizon * tf_ms)
            parts.append(part)
            report(done, total, f"{step.describe()}: model {job.model_id}")
    except BaseException:
        _cancel_unfinished(handles)
        raise

    out = pd.concat(parts, ignore_index=True)
    if "funding_rate" in out.columns and not np.isfinite(out["funding_rate"].to_numpy(dtype=np.float64)).any():
        out = out.drop(columns="funding_rate")  # no funding rate stored for these candles
    check_out_of_sample(out, purge_ms)
    return out


def _submit(training, handles, symbol, timeframe, step, horizon, threshold, n_estimators, max_depth,
            min_samples_leaf, class_weight, random_state, label_kind=None, volatility_bars=0,
            volatility_multiple=0.0) -> TrainingJobHandle:
    """Queue the step's training; when the service queue is full, wait for the oldest unfinished job and retry."""
    waited = 0
    while True:
        try:
            return training.train(
                symbol, timeframe, int(step.train_start_ms), int(step.train_end_ms),
                horizon_bars=horizon, threshold=threshold, n_estimators=n_estimators, max_depth=max_depth,
                min_samples_leaf=min_samples_leaf, class_weight=class_weight, random_state=random_state,
                purpose="research", label_kind=label_kind, volatility_bars=volatility_bars,
                volatility_multiple=volatility_multiple,
            )
        except ResourceExhaustedError:
            if waited >= len(handles):
                raise
            handles[waited].watch()
            waited += 1


def _model_info(training: TrainingClient, cache: dict, symbol: str, timeframe: str, model_id: str):
    if model_id not in cache:
        for m in training.list_models(symbol, timeframe):
            cache[m.model_id] = m
    try:
        return cache[model_id]
    except KeyError:
        raise LeakageError(f"model {model_id} is not listed by the training service, so its training window "
                           "cannot be checked") from None


def _check_model(info, step: Step, symbol: str, timeframe: str, horizon: int) -> None:
    start = info.train_start.ToMilliseconds()
    end = info.train_end.ToMilliseconds()
    problems = []
    if info.symbol != symbol or info.timeframe != timeframe:
        problems.append(f"it is for {info.symbol} {info.timeframe}, not {symbol} {timeframe}")
    if info.label.horizon_bars != horizon:
        problems.append(f"its label horizon is {info.label.horizon_bars} bars, the purge assumed {horizon}")
    if start < step.train_start_ms or end >= step.train_end_ms:
        problems.append(f"its training window {ms_to_iso(start)} .. {ms_to_iso(end)} is not inside the requested "
                        f"{ms_to_iso(step.train_start_ms)} .. {ms_to_iso(step.train_end_ms)}")
    if problems:
        raise LeakageError(f"model {info.model_id} for {step.describe()}: " + "; ".join(problems))


def _label_spec(info) -> LabelSpec:
    return LabelSpec(horizon_bars=int(info.label.horizon_bars), threshold=float(info.label.threshold),
                     kind=label_kind_name(info.label.kind),
                     volatility_bars=int(info.label.volatility_bars),
                     volatility_multiple=float(info.label.volatility_multiple))


def _row_barriers(frame: pd.DataFrame, info) -> np.ndarray:
    """The label's barrier at every candle of `frame` (shared.labels.barriers: from closes up to the candle)."""
    return barriers(frame["close"].to_numpy(dtype=np.float64), _label_spec(info))


def _output_rows(candles: pd.DataFrame, predicted: pd.DataFrame, info, step: Step,
                 barrier: np.ndarray) -> pd.DataFrame:
    times = candles["open_time_ms"].to_numpy(dtype=np.int64)
    got = frame_times_ms(predicted)
    if len(got) != len(times) or np.any(got != times):
        raise RuntimeError(f"{step.describe()}: predictions do not line up with the step's candles")
    label = _label_spec(info)
    funding = {"funding_rate": candles["funding_rate"].to_numpy()} if "funding_rate" in candles.columns else {}
    out = pd.DataFrame({
        "open_time_ms": times,
        "timestamp": pd.to_datetime(times, unit="ms", utc=True),
        **{c: candles[c].to_numpy() for c in _CANDLE_COLUMNS},
        **funding,
        **{c: predicted[c].to_numpy() for c in ML_SIGNAL_COLUMNS},
        "train_start_ms": np.int64(info.train_start.ToMilliseconds()),
        "train_end_ms": np.int64(info.train_end.ToMilliseconds()),
        "ML_HORIZON_BARS": np.int64(label.horizon_bars),
        "ML_THRESHOLD": label.threshold,
        "ML_LABEL_KIND": label.kind,
        "ML_VOLATILITY_BARS": np.int64(label.volatility_bars),
        "ML_VOLATILITY_MULTIPLE": label.volatility_multiple,
        "ML_BARRIER": barrier,
        "step": np.int64(step.index),
    })  # fmt: skip
    return out


def check_out_of_sample(out: pd.DataFrame, horizon_ms: int) -> None:
    """LeakageError unless no row is in-sample and every row is later than its model's train_end + horizon."""
    ins = out["ML_IN_SAMPLE"].to_numpy(dtype=bool)
    times = out["open_time_ms"].to_numpy(dtype=np.int64)
    train_end = out["train_end_ms"].to_numpy(dtype=np.int64)
    model_ids = out["ML_MODEL_ID"].to_numpy()
    if ins.any():
        i = int(np.flatnonzero(ins)[0])
        raise LeakageError(f"{int(ins.sum())} row(s) are in-sample for their model, the first "
                           f"{ms_to_iso(int(times[i]))} (model {model_ids[i]})")
    early = times <= train_end + horizon_ms
    if early.any():
        i = int(np.flatnonzero(early)[0])
        raise LeakageError(f"{int(early.sum())} row(s) are not later than their model's last training candle plus "
                           f"the label horizon: {ms_to_iso(int(times[i]))} with model {model_ids[i]} trained up to "
                           f"{ms_to_iso(int(train_end[i]))}")


def _cancel_unfinished(handles: list[TrainingJobHandle]) -> None:
    from mlsignal.client import MlsignalClientError, is_final

    for h in handles:
        if is_final(h.state):
            continue
        try:
            h.cancel()
        except MlsignalClientError:
            pass  # finished in the meantime, or the service is gone


# ----------------------------------------------------------------------------------------------------------------------
# files


def _parquet_available() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def _require_parquet(path: Path) -> None:
    if not _parquet_available():
        raise ValueError(f"{path}: writing or reading Parquet needs pyarrow, which is not installed "
                         "(pip install pyarrow), or use a .csv file")


def write_signals(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a signal frame as CSV (``.csv``, optionally ``.csv.gz`` etc.) or Parquet (``.parquet``, ``.pq``).

    In CSV the timestamp is ISO-8601 UTC and probabilities that are not ready are empty. Parquet needs pyarrow;
    without it a ValueError says so. Any other extension is a ValueError.
    """
    path = Path(path)
    if _is_parquet(path):
        _require_parquet(path)
        df.to_parquet(path, index=False)
        return path
    if ".csv" not in [s.lower() for s in path.suffixes]:
        raise ValueError(f"{path}: unknown signal file type; use .csv (optionally compressed, .csv.gz) or .parquet")
    out = df.copy()
    if "timestamp" in out.columns and isinstance(out["timestamp"].dtype, pd.DatetimeTZDtype):
        out["timestamp"] = out["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    out.to_csv(path, index=False, float_format="%.17g")
    return path


def read_signals(path: str | Path) -> pd.DataFrame:
    """Read a file written by `write_signals` back: exact probabilities, bool ML_READY / ML_IN_SAMPLE, UTC times."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if _is_parquet(path):
        _require_parquet(path)
        df = pd.read_parquet(path)
    else:
        try:
            df = pd.read_csv(path, dtype={"ML_MODEL_ID": str}, compression="infer")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as exc:
            raise ValueError(f"{path}: cannot read as CSV: {exc}") from None
    for col in ("ML_READY", "ML_IN_SAMPLE"):
        if col in df.columns and df[col].dtype != bool:
            text = df[col].astype(str).str.strip().str.lower()
            if not text.isin(("true", "false", "1", "0")).all():
                raise ValueError(f"{path}: column {col} must hold true/false")
            df[col] = text.isin(("true", "1"))
    if "timestamp" in df.columns:
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
    if "open_time_ms" not in df.columns and "timestamp" in df.columns:
        df.insert(0, "open_time_ms", pd.DatetimeIndex(df["timestamp"]).as_unit("ms").asi8)
    return df
