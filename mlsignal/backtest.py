"""A long/flat evaluation of a signal frame (e.g. from `mlsignal.walkforward.walk_forward`) that trades the label.

The rule is decided at each candle's close from what is known at that close only:

    enter at t  <=>  ML_READY[t] and ML_UP_PROB[t] - ML_DOWN_PROB[t] > edge_min and RSI[t] < rsi_max
                     [and ML_UP_PROB[t] > up_min] [and ML_DOWN_PROB[t] < down_max]

and is compared with the same rule without the ML condition (RSI only) and with buy-and-hold. Honesty, step by step:

* **Holding the label (hold="label", the default).** The probabilities answer a question about the next
  `horizon_bars` candles (the label of each row's model: ML_HORIZON_BARS, ML_THRESHOLD, ML_LABEL_KIND), so a
  position entered on a signal is held for exactly that question: from the fill at the close of candle f (the
  decision candle when delay_bars=1) to the close of candle f + horizon_bars, the label's end point (a span of
  time: across missing candles, the first close at or after it). For a
  triple-barrier model it exits earlier, at the close of the first candle f + k (k = 1 .. horizon_bars) whose return
  ``close[f + k] / close[f] - 1`` is above +threshold (take profit) or below -threshold (stop), with the same
  close-based comparison and tolerance as `shared.labels` (a move of exactly the threshold does not exit). A position
  still open at the last candle is closed at its close ("end of data").
* **Overlapping entries.** A signal on consecutive candles asks the same question again. ``overlap="ignore"``: a new
  entry signal while a position is open is ignored (one position of size 1 at a time; a signal at the candle where a
  position exits may open the next one). ``overlap="stack"``: every entry signal opens its own sleeve of size
  1/H (H = the longest horizon among the rows), held by the same exit rule as above, as in López de Prado's averaging
  of overlapping bets: the exposure over a candle is the number of open sleeves / H, at most 1. Sleeves are weighted
  at 1/H of the current equity over every candle (rebalanced without cost); each sleeve pays the fee on its own
  entry and exit, so the fees of a sleeve are 1/H of those of a full position.
* **One candle (hold="candle").** The original mode: the rule is re-decided at every close and the position is held
  over the next candle only, so a signal that stays on keeps the position open without new fees. It ignores the
  label's horizon.
* **Execution delay.** The position decided at the close of candle t is held from candle t + delay_bars. A candle's
  return is close-to-close, ``close[i] / close[i-1] - 1``, and it is earned by the position held over candle i. With
  delay_bars=1 the decision at t's close earns from t's close to (t+1)'s close: it is filled at the price that was
  just observed (in practice the next candle's open), which is the earliest fill that does not use the future.
  delay_bars=2 fills one whole candle later. delay_bars=0 would earn candle t's return with a decision taken at its
  close, which is look-ahead, and is refused.
* **Fees.** fee_bps per side on every entry and exit. Holding the label: the entry fee is charged on the first candle
  held, the exit fee on the candle at whose close the position exits. One candle: on every position change, at the
  candle where the new position starts, and a position still open at the last candle pays its exit fee there.
  Buy-and-hold is the plain price benchmark, close[-1] / close[0] - 1, without fees or funding.
* **Funding.** Where the signals carry a funding_rate column with values (the rate as of each candle's close, as
  `load_candles` joins it), a long pays the funding rate at every funding timestamp it holds through: funding is
  settled at the multiples of `funding_interval_ms` since 1970-01-01 UTC (8 h: 00:00, 08:00 and 16:00 UTC), and a
  timestamp T falls in the candle with open < T <= close. A position held over that candle pays its exposure times
  that candle's funding_rate (a negative rate is received). A held funding timestamp without a rate is an error.
* **No trades without a model, and no row the model could have seen.** Where ML_READY is false no position is
  entered, in the strategy and in the RSI-only baseline alike. Every ready row needs its model's training window:
  a row whose model's last training candle (train_end_ms) is at or after the row's open time, that is a window that
  contains the row or ends after it, is refused, and so is any row with ML_IN_SAMPLE true. `attach_model_info` fills
  the window and the label from the registry's ModelInfo by ML_MODEL_ID (what `mlsignal backtest` does for the
  output of `mlsignal predict --csv`).
* **Fixed thresholds, and counted trials.** up_min, rsi_max and down_max are fixed parameters chosen before the
  evaluation period; they are never optimised on it. The strategy's Sharpe ratio comes with its probabilistic
  Sharpe ratio (PSR, against 0) and its deflated Sharpe ratio (DSR) for the number of trials, the configurations
  tried on the market (`count_trials`), see `mlsignal.stats`.
* **RSI** is the shared feature code's RSI (Cutler's RSI, a finite-window RSI, `shared.features.rsi`), the same RSI the
  models see as a feature; it is not computed a second way here.

Metrics per row: total return, max drawdown (largest peak-to-trough fall of the equity curve, as a positive fraction),
annualised Sharpe ratio of the per-candle net returns (mean / sample std * sqrt(candles per year), candles per year
from the timeframe, markets open 365 days a year, no risk-free rate), trades (round trips, or sleeves), hit rate
(fraction of trades with a positive net return at their own size, fees and funding included), exposure (mean
fraction of equity in the market over the candles) and the equity curve.

Example::

    >>> signals = read_signals("signals.csv")                                                  # doctest: +SKIP
    >>> result = run_backtest(signals, StrategyRule(edge_min=0.0, rsi_max=70), trials=12)       # doctest: +SKIP
    >>> print(format_report(result))                                                            # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from mlsignal.stats import SharpeStats, sharpe_stats
from shared.features import rsi
from shared.labels import FIXED_HORIZON, THRESHOLD_TOLERANCE, TRIPLE_BARRIER
from shared.timeframes import TIMEFRAME_MS, ms_to_iso, timeframe_ms

__all__ = [
    "FUNDING_INTERVAL_MS",
    "HOLD_CANDLE",
    "HOLD_LABEL",
    "LABEL_COLUMNS",
    "OVERLAP_IGNORE",
    "OVERLAP_STACK",
    "VOLATILITY_COLUMNS",
    "WINDOW_COLUMNS",
    "BacktestResult",
    "LabelKey",
    "StrategyRule",
    "StrategyStats",
    "TrialCount",
    "annualised_sharpe",
    "attach_model_info",
    "bars_per_year",
    "count_trials",
    "format_report",
    "max_drawdown",
    "run_backtest",
    "verdict",
]

YEAR_MS = 365 * 86_400_000
HOLD_LABEL, HOLD_CANDLE = "label", "candle"
HOLDS = (HOLD_LABEL, HOLD_CANDLE)
OVERLAP_IGNORE, OVERLAP_STACK = "ignore", "stack"
OVERLAPS = (OVERLAP_IGNORE, OVERLAP_STACK)
FUNDING_INTERVAL_MS = 8 * 3_600_000
# The label of each row's model, as walk-forward writes it (and `attach_model_info` fills it from the registry).
LABEL_COLUMNS = ("ML_HORIZON_BARS", "ML_THRESHOLD", "ML_LABEL_KIND")
# A volatility-scaled label (0 or absent: the fixed threshold), and optionally its barrier per row (a return).
VOLATILITY_COLUMNS = ("ML_VOLATILITY_BARS", "ML_VOLATILITY_MULTIPLE")
# The first and last training candle of each row's model (open times, ms).
WINDOW_COLUMNS = ("train_start_ms", "train_end_ms")
EXIT_REASONS = ("horizon", "up barrier", "down barrier", "end of data")
# Research retention retires old research models but keeps their rows; they were tried all the same.
RESEARCH_RETENTION_REASON = "research retention"


@dataclass(frozen=True)
class StrategyRule:
    """Long when ML_UP_PROB > up_min and RSI < rsi_max (and ML_DOWN_PROB < down_max, and
    ML_UP_PROB - ML_DOWN_PROB > edge_min, when set); flat otherwise.

    use_ml=False drops the ML conditions (RSI only); up_min=None or rsi_max=None drop that condition. rsi_period is
    the RSI window in candles. These are fixed parameters: set them before looking at the evaluation period, never
    fit them to it.

    Calibrated probabilities stay near the class prior (an up-move of 2 % in 24 h is roughly a 30 % event), so an
    absolute threshold such as up_min=0.6 may never be reached. edge_min compares the two directions instead and
    needs no knowledge of the probability scale: edge_min=0 means "the model thinks up is more likely than down".
    """

    up_min: float | None = None
    rsi_max: float | None = 70.0
    down_max: float | None = None
    use_ml: bool = True
    rsi_period: int = 14
    edge_min: float | None = 0.0

    def describe(self) -> str:
        parts = []
        if self.use_ml:
            if self.up_min is not None:
                parts.append(f"ML_UP_PROB > {self.up_min:g}")
            if self.edge_min is not None:
                parts.append(f"ML_UP_PROB - ML_DOWN_PROB > {self.edge_min:g}")
            if self.down_max is not None:
                parts.append(f"ML_DOWN_PROB < {self.down_max:g}")
        if self.rsi_max is not None:
            parts.append(f"RSI{self.rsi_period} < {self.rsi_max:g}")
        return " and ".join(parts) if parts else "always (when ML_READY)"


@dataclass(frozen=True)
class StrategyStats:
    """One row of the report, with the per-candle series it was computed from (indexed by candle time, UTC)."""

    name: str
    total_return: float
    max_drawdown: float
    sharpe: float
    trades: int
    hit_rate: float
    exposure: float
    equity: pd.Series  # value after each candle, starting from 1.0 before the first
    position: pd.Series  # exposure held over each candle: 0 or 1, or open sleeves / H when stacking
    returns: pd.Series  # net return of each candle, fees and funding included
    exits: dict[str, int] = field(default_factory=dict)  # holding the label: trades by exit reason
    funding_paid: float = 0.0  # sum of the per-candle funding costs (negative: received)


class LabelKey(NamedTuple):
    """One label held by the backtest: its horizon, threshold, kind and volatility scaling (0: fixed threshold)."""

    horizon_bars: int
    threshold: float
    kind: str
    volatility_bars: int = 0
    volatility_multiple: float = 0.0

    def describe(self) -> str:
        move = (f"±{self.volatility_multiple:g} x volatility({self.volatility_bars}) x sqrt({self.horizon_bars})"
                if self.volatility_bars else f"±{self.threshold * 100:g} %")
        return f"{self.kind.replace('_', ' ')} {self.horizon_bars} candles, {move}"


@dataclass(frozen=True)
class TrialCount:
    """How many configurations were tried on the market, and where the number comes from (printed with the DSR)."""

    total: int
    research_configs: int = 0  # distinct research configurations of the market in the registry
    rules: int = 1  # rules evaluated in this run
    extra: int = 0  # rules tried before this run, as declared by the user
    given: bool = False  # total set explicitly (--trials), not counted
    market: str = ""

    def describe(self) -> str:
        if self.given:
            return f"{self.total} as given (--trials), not counted from the registry"
        parts = [f"{self.research_configs} research configuration(s) of {self.market or 'the market'} in the "
                 f"registry", f"{self.rules} rule(s) in this run"]
        if self.extra:
            parts.append(f"{self.extra} rule(s) tried before (--extra-trials)")
        return " + ".join(parts)


@dataclass(frozen=True)
class BacktestResult:
    rule: StrategyRule
    fee_bps: float
    delay_bars: int
    timeframe: str
    start_ms: int
    end_ms: int  # open time of the last candle
    candles: int
    strategy: StrategyStats
    rsi_only: StrategyStats
    buy_and_hold: StrategyStats
    hold: str = HOLD_LABEL
    overlap: str = OVERLAP_IGNORE
    labels: tuple[LabelKey, ...] = ()  # the distinct labels held
    funding: bool = False  # funding rates were charged
    funding_interval_ms: int = FUNDING_INTERVAL_MS
    trials: TrialCount | None = None
    sharpe_stats: SharpeStats | None = None  # the strategy's PSR and DSR (per-candle Sharpe)

    @property
    def rows(self) -> tuple[StrategyStats, StrategyStats, StrategyStats]:
        return (self.strategy, self.rsi_only, self.buy_and_hold)


# ----------------------------------------------------------------------------------------------------------------------
# building blocks


def bars_per_year(timeframe: str) -> float:
    """Candles in a 365-day year (crypto markets never close): 8760 for 1h, 365 for 1d."""
    return YEAR_MS / timeframe_ms(timeframe)


def max_drawdown(equity: Iterable[float] | pd.Series) -> float:
    """Largest fall from a running peak, as a positive fraction (0.25 = 25 %); the curve starts from a peak of 1.0.

    Example::

        >>> max_drawdown([1.0, 1.2, 0.9, 1.1, 0.6, 0.8])
        0.5
    """
    e = np.asarray(equity, dtype=np.float64)
    if e.size == 0:
        return 0.0
    peak = np.maximum.accumulate(np.concatenate(([1.0], e)))[1:]
    return float(np.max(1.0 - e / peak))


def annualised_sharpe(returns: Iterable[float] | pd.Series, timeframe: str) -> float:
    """mean / sample std of per-candle returns times sqrt(candles per year); NaN when the std is 0 or undefined."""
    r = np.asarray(returns, dtype=np.float64)
    if r.size < 2:
        return math.nan
    sd = float(np.std(r, ddof=1))
    if not sd > 0:
        return math.nan
    return float(np.mean(r) / sd * math.sqrt(bars_per_year(timeframe)))


def _infer_timeframe(times: np.ndarray) -> str:
    if times.size < 2:
        raise ValueError("cannot tell the timeframe from fewer than two candles; pass timeframe=")
    step = int(np.median(np.diff(times)))
    for name, ms in TIMEFRAME_MS.items():
        if ms == step:
            return name
    raise ValueError(f"candles are {step} ms apart, which is no known timeframe; pass timeframe=")


def _times(signals: pd.DataFrame) -> np.ndarray:
    if "open_time_ms" in signals.columns:
        return signals["open_time_ms"].to_numpy(dtype=np.int64)
    from mlsignal.client import frame_times_ms

    return frame_times_ms(signals)


def _candle_returns(close: np.ndarray) -> np.ndarray:
    r = np.zeros(close.size)
    r[1:] = close[1:] / close[:-1] - 1.0
    return r


@dataclass(frozen=True)
class _Funding:
    """Per candle: the funding rate as of its close and how many funding timestamps it contains."""

    rate: np.ndarray
    count: np.ndarray
    times: np.ndarray

    def cost(self, weight: np.ndarray, name: str) -> np.ndarray:
        due = (weight > 0) & (self.count > 0)
        missing = due & ~np.isfinite(self.rate)
        if missing.any():
            i = int(np.flatnonzero(missing)[0])
            raise ValueError(f"funding_rate is missing at {ms_to_iso(int(self.times[i]))} while the {name} holds a "
                             f"position over a funding time ({int(missing.sum())} such candle(s)); the funding rate "
                             "must cover the whole period, or the file must carry no funding_rate at all")
        return np.where(due, weight * np.nan_to_num(self.rate) * self.count, 0.0)


def _funding(signals: pd.DataFrame, times: np.ndarray, tf_ms: int, interval_ms: int) -> _Funding | None:
    if "funding_rate" not in signals.columns:
        return None
    rate = pd.to_numeric(signals["funding_rate"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    if not np.isfinite(rate).any():
        return None
    count = (times + tf_ms) // interval_ms - times // interval_ms
    return _Funding(rate=rate, count=count.astype(np.float64), times=times)


def _account(name: str, r: np.ndarray, weight: np.ndarray, fee_units: np.ndarray, fee: float,
             funding: _Funding | None, trades: list[tuple[int, int]], index: pd.DatetimeIndex, timeframe: str,
             exits: dict[str, int] | None = None) -> StrategyStats:
    """Net per-candle returns, equity and the row's metrics from the exposure over each candle and the fees paid.

    `trades` are the first and last candle held by each trade, for the hit rate: a trade's return at full size is the
    product over the candles it holds of 1 + r - its funding, less its entry fee on the first and its exit fee on the
    last.
    """
    fund = funding.cost(weight, name) if funding is not None else np.zeros(r.size)
    net = weight * r - fee_units * fee - fund
    equity = np.cumprod(1.0 + net)
    if trades:
        held = (weight > 0).astype(np.float64)
        per_unit_fund = funding.cost(held, name) if funding is not None else np.zeros(r.size)
        growth = []
        for first, last in trades:
            g = 1.0 + r[first:last + 1] - per_unit_fund[first:last + 1]
            g[0] -= fee
            g[-1] -= fee
            growth.append(float(np.prod(g)))
        hit_rate = float(np.mean(np.asarray(growth) > 1.0))
    else:
        hit_rate = math.nan
    return StrategyStats(
        name=name,
        total_return=float(equity[-1] - 1.0),
        max_drawdown=max_drawdown(equity),
        sharpe=annualised_sharpe(net, timeframe),
        trades=len(trades),
        hit_rate=hit_rate,
        exposure=float(weight.mean()),
        equity=pd.Series(equity, index=index, name=name),
        position=pd.Series(weight, index=index, name=name),
        returns=pd.Series(net, index=index, name=name),
        exits=dict(exits or {}),
        funding_paid=float(fund.sum()),
    )


def _one_candle(name: str, r: np.ndarray, want: np.ndarray, delay: int, fee: float, funding: _Funding | None,
                index: pd.DatetimeIndex, timeframe: str) -> StrategyStats:
    """Re-decided at every close: the decision at t is the position over candle t + delay."""
    n = r.size
    pos = np.zeros(n)
    if delay < n:
        pos[delay:] = want[: n - delay]
    prev = np.concatenate(([0.0], pos[:-1]))
    turnover = np.abs(pos - prev)
    turnover[-1] += pos[-1]  # an open position is closed at the last close and pays its exit fee
    entries = np.flatnonzero((pos == 1) & (prev == 0))
    exits = np.flatnonzero((pos == 0) & (prev == 1))  # the candle whose start closes the trade (exit fee)
    ends = np.full(entries.size, n - 1)  # a trade still open at the end is held to the last candle
    ends[: exits.size] = exits - 1
    trades = [(int(a), int(b)) for a, b in zip(entries, ends, strict=True)]  # first and last candle held
    return _account(name, r, pos, turnover, fee, funding, trades, index, timeframe)


def _hold_label(name: str, close: np.ndarray, r: np.ndarray, want: np.ndarray, delay: int, fee: float,
                funding: _Funding | None, labels: _RowLabels, overlap: str, index: pd.DatetimeIndex,
                timeframe: str) -> StrategyStats:
    """Each entry held to its label's horizon, or to the first barrier crossed for a triple-barrier label."""
    n = close.size
    weight = np.zeros(n)
    fee_units = np.zeros(n)
    trades: list[tuple[int, int]] = []
    exits = dict.fromkeys(EXIT_REASONS, 0)
    signals = np.flatnonzero(want)
    sleeve = 1.0 if overlap == OVERLAP_IGNORE else 1.0 / labels.max_horizon
    free_from = 0  # ignore: the first fill candle at which a new position may open
    for t in signals:
        fill = int(t) + delay - 1  # filled at this candle's close
        if fill >= n - 1:
            break  # no candle left to hold
        if overlap == OVERLAP_IGNORE and fill < free_from:
            continue
        # The horizon is a span of time, h candles after the fill; across missing candles the position exits at the
        # first close at or after it (without gaps: exactly h rows later).
        end = int(np.searchsorted(labels.times, labels.times[fill] + int(labels.horizon[t]) * labels.tf_ms))
        last = min(end, n - 1)
        exit_at, reason = last, ("horizon" if end <= n - 1 else "end of data")
        if labels.triple[t]:
            barrier = labels.entry_barrier(int(t)) + THRESHOLD_TOLERANCE
            path = close[fill + 1:last + 1] / close[fill] - 1.0
            hit = np.flatnonzero((path > barrier) | (path < -barrier))
            if hit.size:
                k = int(hit[0])
                exit_at, reason = fill + 1 + k, ("up barrier" if path[k] > 0 else "down barrier")
        weight[fill + 1:exit_at + 1] += sleeve
        fee_units[fill + 1] += sleeve
        fee_units[exit_at] += sleeve
        trades.append((fill + 1, exit_at))
        exits[reason] += 1
        free_from = exit_at
    return _account(name, r, weight, fee_units, fee, funding, trades, index, timeframe, exits)


def _buy_and_hold(close: np.ndarray, index: pd.DatetimeIndex, timeframe: str) -> StrategyStats:
    n = close.size
    r = _candle_returns(close)
    equity = close / close[0]
    pos = np.ones(n)
    pos[0] = 0.0  # bought at the first close, held from the second candle on
    return StrategyStats(
        name="buy and hold",
        total_return=float(close[-1] / close[0] - 1.0),
        max_drawdown=max_drawdown(equity),
        sharpe=annualised_sharpe(r, timeframe),
        trades=1 if n > 1 else 0,
        hit_rate=(1.0 if close[-1] > close[0] else 0.0) if n > 1 else math.nan,
        exposure=float(pos.mean()),
        equity=pd.Series(equity, index=index, name="buy and hold"),
        position=pd.Series(pos, index=index, name="buy and hold"),
        returns=pd.Series(r, index=index, name="buy and hold"),
    )


# ----------------------------------------------------------------------------------------------------------------------
# the rows' models: training windows and labels


@dataclass(frozen=True)
class _RowLabels:
    horizon: np.ndarray  # int64, 0 where the row has no label (not ready)
    barrier: np.ndarray  # the triple barrier of the row (a return); NaN where it is not needed
    triple: np.ndarray  # bool
    distinct: tuple[LabelKey, ...]
    volatility_bars: np.ndarray
    times: np.ndarray
    tf_ms: int

    def entry_barrier(self, t: int) -> float:
        b = float(self.barrier[t])
        if not (math.isfinite(b) and b > 0):
            raise ValueError(f"the volatility-scaled barrier of the entry at {ms_to_iso(int(self.times[t]))} needs "
                             f"{int(self.volatility_bars[t])} candles before it, which the file lacks; include "
                             "earlier candles in the file (rows that are not ready are fine) or an ML_BARRIER column")
        return b

    @property
    def max_horizon(self) -> int:
        return max(key[0] for key in self.distinct)


def _label_kind(text: Any) -> str:
    kind = str(text).strip().lower().replace("-", "_")
    aliases = {"label_kind_unspecified": FIXED_HORIZON, "label_kind_fixed_horizon": FIXED_HORIZON,
               "label_kind_triple_barrier": TRIPLE_BARRIER}
    return aliases.get(kind, kind)


def _optional_numbers(signals: pd.DataFrame, col: str) -> np.ndarray:
    if col not in signals.columns:
        return np.zeros(len(signals))
    return pd.to_numeric(signals[col], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _row_labels(signals: pd.DataFrame, ready: np.ndarray, times: np.ndarray, close: np.ndarray,
                tf_ms: int) -> _RowLabels:
    missing = [c for c in LABEL_COLUMNS if c not in signals.columns]
    if missing:
        raise ValueError(f"signals lack column(s) {', '.join(missing)}, the label of each row's model, which holding "
                         "the label needs; `mlsignal backtest` looks them up in the registry by ML_MODEL_ID, "
                         "`backtest-signals` writes them, or use hold='candle'")
    horizon = pd.to_numeric(signals["ML_HORIZON_BARS"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    threshold = pd.to_numeric(signals["ML_THRESHOLD"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    kinds = np.array([_label_kind(k) for k in signals["ML_LABEL_KIND"].to_numpy()], dtype=object)
    vol_bars = _optional_numbers(signals, "ML_VOLATILITY_BARS")
    vol_multiple = _optional_numbers(signals, "ML_VOLATILITY_MULTIPLE")
    bad_h = ready & ~(np.isfinite(horizon) & (horizon >= 1) & (horizon == np.round(horizon)))
    bad_t = ready & ~(np.isfinite(threshold) & (threshold > 0) & (threshold < 1))
    bad_k = ready & ~np.isin(kinds, (FIXED_HORIZON, TRIPLE_BARRIER))
    bad_vb = ready & ~(np.isfinite(vol_bars) & (vol_bars >= 0) & (vol_bars == np.round(vol_bars)))
    bad_vm = ready & ~(np.isfinite(vol_multiple) & (vol_multiple >= 0) & ((vol_bars > 0) == (vol_multiple > 0)))
    for bad, col, expected in ((bad_h, "ML_HORIZON_BARS", "an integer >= 1"),
                               (bad_t, "ML_THRESHOLD", "a fraction > 0 and < 1"),
                               (bad_k, "ML_LABEL_KIND", f"{FIXED_HORIZON} or {TRIPLE_BARRIER}"),
                               (bad_vb, "ML_VOLATILITY_BARS", "an integer >= 0"),
                               (bad_vm, "ML_VOLATILITY_MULTIPLE", "> 0 exactly where ML_VOLATILITY_BARS is")):
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            value = signals[col].iloc[i]
            raise ValueError(f"{col} must be {expected} on every ready row, got {value!r} at "
                             f"{ms_to_iso(int(times[i]))} ({int(bad.sum())} row(s))")
    h = np.where(ready, np.nan_to_num(horizon), 0).astype(np.int64)
    th = np.where(ready, np.nan_to_num(threshold), 0.0)
    vb = np.where(ready, np.nan_to_num(vol_bars), 0).astype(np.int64)
    vm = np.where(ready, np.nan_to_num(vol_multiple), 0.0)
    triple = ready & (kinds == TRIPLE_BARRIER)
    keys = [LabelKey(int(a), float(b), str(c), int(d), float(e))
            for a, b, c, d, e in zip(h[ready], th[ready], kinds[ready], vb[ready], vm[ready], strict=True)]
    distinct = tuple(sorted(set(keys)))
    barrier = np.where(triple, th, np.nan)
    scaled = triple & (vb > 0)
    if scaled.any():
        barrier[scaled] = _volatility_barriers(signals, close, times, scaled, h, vb, vm)
    return _RowLabels(horizon=h, barrier=barrier, triple=triple, distinct=distinct, volatility_bars=vb, times=times,
                      tf_ms=int(tf_ms))


def _volatility_barriers(signals: pd.DataFrame, close: np.ndarray, times: np.ndarray, rows: np.ndarray,
                         h: np.ndarray, vb: np.ndarray, vm: np.ndarray) -> np.ndarray:
    """The volatility-scaled barriers of `rows`, by `shared.labels.barriers` over the file's closes (the label's own
    definition: closes up to the row only). ML_BARRIER, when the file has it (walk-forward computes it with the
    history before the period), is used where the file is too short, and must agree with the closes elsewhere.
    NaN where neither gives it."""
    from shared.labels import LabelSpec, barriers

    out = np.full(int(rows.sum()), np.nan)
    idx = np.flatnonzero(rows)
    for key in sorted({(int(h[i]), int(vb[i]), float(vm[i])) for i in idx}):
        spec = LabelSpec(horizon_bars=key[0], kind=TRIPLE_BARRIER, volatility_bars=key[1],
                         volatility_multiple=key[2])
        mine = (h[idx] == key[0]) & (vb[idx] == key[1]) & (vm[idx] == key[2])
        out[mine] = barriers(close, spec)[idx[mine]]
    if "ML_BARRIER" in signals.columns:
        given = pd.to_numeric(signals["ML_BARRIER"], errors="coerce").to_numpy(dtype=np.float64,
                                                                            na_value=np.nan)[idx]
        differ = np.isfinite(out) & np.isfinite(given) & ~np.isclose(out, given, rtol=1e-9, atol=1e-15)
        if differ.any():
            i = idx[int(np.flatnonzero(differ)[0])]
            raise ValueError(f"ML_BARRIER at {ms_to_iso(int(times[i]))} does not match the volatility-scaled barrier "
                             "of the row's label computed from the file's closes")
        out = np.where(np.isfinite(out), out, given)
    return out  # NaN where the file is too short: an error only if the row enters a position


def _check_windows(signals: pd.DataFrame, ready: np.ndarray, times: np.ndarray) -> None:
    """Refuse rows in-sample for their model: ML_IN_SAMPLE true, or a training window that reaches the row."""
    if "ML_IN_SAMPLE" in signals.columns and signals["ML_IN_SAMPLE"].to_numpy(dtype=bool).any():
        k = int(signals["ML_IN_SAMPLE"].to_numpy(dtype=bool).sum())
        raise ValueError(f"{k} row(s) have ML_IN_SAMPLE true: they lie in their model's training window, and a "
                         "backtest over them is not honest; use walk-forward signals")
    if not ready.any():
        return
    if "train_end_ms" not in signals.columns:
        raise ValueError("signals lack train_end_ms, the last training candle of each row's model, so the backtest "
                         "cannot tell whether the model saw a row; `mlsignal backtest` looks it up in the registry "
                         "by ML_MODEL_ID, and `backtest-signals` writes it")
    end = pd.to_numeric(signals["train_end_ms"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    unknown = ready & ~np.isfinite(end)
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise ValueError(f"train_end_ms is missing on {int(unknown.sum())} ready row(s), the first at "
                         f"{ms_to_iso(int(times[i]))}: the model's training window must be known for every row")
    seen = ready & (end >= times)
    if seen.any():
        i = int(np.flatnonzero(seen)[0])
        model = f" (model {signals['ML_MODEL_ID'].iloc[i]})" if "ML_MODEL_ID" in signals.columns else ""
        raise ValueError(f"{int(seen.sum())} row(s) were predicted by a model trained on a window that contains them "
                         f"or ends after them, the first at {ms_to_iso(int(times[i]))}{model}, trained up to "
                         f"{ms_to_iso(int(end[i]))}; keep only the rows after the model's training window, or use "
                         "walk-forward signals (backtest-signals)")


def attach_model_info(signals: pd.DataFrame, models: Mapping[str, Any]) -> pd.DataFrame:
    """The signals with each row's training window and label filled from its model's ModelInfo (by ML_MODEL_ID).

    `models` maps model ids to ModelInfo messages (`TrainingClient.list_models`). Columns the file lacks are added
    (train_start_ms, train_end_ms, ML_HORIZON_BARS, ML_THRESHOLD, ML_LABEL_KIND, ML_VOLATILITY_BARS,
    ML_VOLATILITY_MULTIPLE); where the file has them, they must
    agree with the registry, or a ValueError names the column and the model. Rows without a model id (not ready)
    get NaN. A model id the registry does not know is an error.
    """
    from mlsignal.client.training import label_kind_name

    if "ML_MODEL_ID" not in signals.columns:
        raise ValueError("signals lack ML_MODEL_ID, so their models' training windows cannot be looked up")
    ids = signals["ML_MODEL_ID"].astype(object).where(signals["ML_MODEL_ID"].notna(), "").astype(str).to_numpy()
    present = sorted({i for i in ids if i and i.lower() != "nan"})
    unknown = [i for i in present if i not in models]
    if unknown:
        raise ValueError(f"ML_MODEL_ID {unknown[0]} is not in the registry ({len(unknown)} unknown model id(s)), so "
                         "its training window cannot be checked")
    table: dict[str, dict[str, Any]] = {
        "train_start_ms": {i: float(models[i].train_start.ToMilliseconds()) for i in present},
        "train_end_ms": {i: float(models[i].train_end.ToMilliseconds()) for i in present},
        "ML_HORIZON_BARS": {i: float(models[i].label.horizon_bars) for i in present},
        "ML_THRESHOLD": {i: float(models[i].label.threshold) for i in present},
        "ML_LABEL_KIND": {i: label_kind_name(models[i].label.kind) for i in present},
        "ML_VOLATILITY_BARS": {i: float(models[i].label.volatility_bars) for i in present},
        "ML_VOLATILITY_MULTIPLE": {i: float(models[i].label.volatility_multiple) for i in present},
    }
    out = signals.copy()
    for col, by_id in table.items():
        looked_up = pd.Series([by_id.get(i, np.nan) for i in ids], index=out.index)
        if col not in out.columns:
            out[col] = looked_up.astype(object) if col == "ML_LABEL_KIND" else looked_up.astype(np.float64)
            continue
        has = np.array([bool(i) and i in by_id for i in ids])
        if col == "ML_LABEL_KIND":
            mine = np.array([_label_kind(k) for k in out[col].to_numpy()], dtype=object)
            differ = has & (mine != looked_up.to_numpy(dtype=object))
        else:
            mine_f = pd.to_numeric(out[col], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            differ = has & ~np.isclose(mine_f, looked_up.to_numpy(dtype=np.float64), rtol=0, atol=1e-12)
        if differ.any():
            i = int(np.flatnonzero(differ)[0])
            raise ValueError(f"{col} of the row at position {i} is {out[col].iloc[i]!r}, but the registry says "
                             f"{looked_up.iloc[i]!r} for model {ids[i]}; the file does not match its models")
    return out


def _config_key(info: Any) -> tuple:
    p = info.params
    seed = int(p.random_state) if p.HasField("random_state") else None
    label = info.label
    return (int(label.horizon_bars), round(float(label.threshold), 12), int(label.kind),
            int(label.volatility_bars), round(float(label.volatility_multiple), 12),
            int(p.n_estimators), int(p.max_depth), int(p.min_samples_leaf), int(p.class_weight), seed,
            str(info.feature_set), tuple(info.features))


def count_trials(models: Sequence[Any], signal_model_ids: Iterable[str], rules: int = 1, extra: int = 0) -> TrialCount:
    """The configurations tried on the signals' market: the distinct (label, forest parameters, features) of its
    research models in the registry (RESEARCH, or RETIRED by research retention) and of the models that predicted the
    signals, plus the `rules` evaluated in this run and `extra` rules declared as tried before.

    Walk-forward trains one model per step with the same configuration: those count once. Signals from more than one
    market are an error.
    """
    from mlsignal.v1 import common_pb2

    by_id = {m.model_id: m for m in models}
    own = sorted({i for i in signal_model_ids if i and i in by_id})
    missing = sorted({i for i in signal_model_ids if i and i not in by_id})
    if missing:
        raise ValueError(f"ML_MODEL_ID {missing[0]} is not in the registry, so the market's trials cannot be counted")
    if not own:
        raise ValueError("the signals name no model (ML_MODEL_ID), so their market's trials cannot be counted; "
                         "pass the number of trials explicitly")
    markets = sorted({(by_id[i].symbol, by_id[i].timeframe) for i in own})
    if len(markets) > 1:
        raise ValueError(f"the signals come from models of {len(markets)} markets ({markets[0]}, {markets[1]}); "
                         "backtest one market at a time")
    symbol, timeframe = markets[0]
    configs = {_config_key(by_id[i]) for i in own}
    for m in models:
        if m.symbol != symbol or m.timeframe != timeframe:
            continue
        research = m.stage == common_pb2.MODEL_STAGE_RESEARCH or (
            m.stage == common_pb2.MODEL_STAGE_RETIRED and m.stage_reason == RESEARCH_RETENTION_REASON)
        if research:
            configs.add(_config_key(m))
    if isinstance(rules, bool) or rules < 1 or isinstance(extra, bool) or extra < 0:
        raise ValueError(f"rules must be >= 1 and extra >= 0, got {rules!r} and {extra!r}")
    return TrialCount(total=len(configs) + int(rules) + int(extra), research_configs=len(configs), rules=int(rules),
                      extra=int(extra), market=f"{symbol} {timeframe}")


# ----------------------------------------------------------------------------------------------------------------------
# the backtest


def run_backtest(
    signals: pd.DataFrame,
    rule: StrategyRule = StrategyRule(),
    fee_bps: float = 10.0,
    delay_bars: int = 1,
    timeframe: str | None = None,
    *,
    hold: str = HOLD_LABEL,
    overlap: str = OVERLAP_IGNORE,
    funding_interval_ms: int = FUNDING_INTERVAL_MS,
    trials: TrialCount | int | None = None,
) -> BacktestResult:
    """Evaluate `rule` on a signal frame, next to the RSI-only rule and buy-and-hold (see the module docstring).

    `signals` has one row per candle, oldest first, with open_time_ms (or a UTC DatetimeIndex / timestamp column),
    close, ML_UP_PROB, ML_READY, ML_DOWN_PROB (for edge_min or down_max), train_end_ms (the last training candle of
    each row's model; a ready row at or before it is refused), and for hold="label" the label columns ML_HORIZON_BARS,
    ML_THRESHOLD and ML_LABEL_KIND; optionally funding_rate. ML_IN_SAMPLE, if present, must be false everywhere.
    `timeframe` is read from the candle spacing when not given. `hold` is "label" or "candle", `overlap` "ignore" or
    "stack" (holding the label only). `trials` (a count or a `TrialCount`) deflates the strategy's Sharpe ratio;
    None leaves the DSR undefined. The thresholds of `rule` are fixed inputs; this function never searches or tunes
    them.
    """
    if not isinstance(signals, pd.DataFrame):
        raise ValueError(f"signals must be a pandas DataFrame, got {type(signals).__name__}")
    if isinstance(delay_bars, bool) or not isinstance(delay_bars, (int, np.integer)) or delay_bars < 1:
        raise ValueError(f"delay_bars must be an integer >= 1 (0 would trade on the close it decides at), "
                         f"got {delay_bars!r}")
    if hold not in HOLDS:
        raise ValueError(f"hold must be one of {', '.join(HOLDS)}, got {hold!r}")
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {', '.join(OVERLAPS)}, got {overlap!r}")
    if hold == HOLD_CANDLE and overlap != OVERLAP_IGNORE:
        raise ValueError("overlap='stack' needs hold='label': holding one candle has no overlapping positions")
    if isinstance(funding_interval_ms, bool) or not isinstance(funding_interval_ms, (int, np.integer)) \
            or funding_interval_ms <= 0:
        raise ValueError(f"funding_interval_ms must be a positive integer, got {funding_interval_ms!r}")
    fee_bps = float(fee_bps)
    if not (math.isfinite(fee_bps) and fee_bps >= 0):
        raise ValueError(f"fee_bps must be a finite number >= 0, got {fee_bps!r}")
    if isinstance(trials, (int, np.integer)) and not isinstance(trials, bool):
        if trials < 1:
            raise ValueError(f"trials must be >= 1, got {trials!r}")
        trials = TrialCount(total=int(trials), given=True)
    elif trials is not None and not isinstance(trials, TrialCount):
        raise ValueError(f"trials must be a positive integer or a TrialCount, got {trials!r}")
    needed = ["close", "ML_READY"]
    if rule.use_ml:
        needed.append("ML_UP_PROB")
        if rule.down_max is not None or rule.edge_min is not None:
            needed.append("ML_DOWN_PROB")
    missing = [c for c in needed if c not in signals.columns]
    if missing:
        raise ValueError(f"signals lack column(s) {', '.join(missing)}")
    if len(signals) < 2:
        raise ValueError("a backtest needs at least two candles")

    times = _times(signals)
    if np.any(np.diff(times) <= 0):
        raise ValueError("signal rows must be in strictly increasing time order")
    tf = timeframe or _infer_timeframe(times)
    tf_ms = timeframe_ms(tf)
    close = signals["close"].to_numpy(dtype=np.float64)
    if not (np.isfinite(close).all() and (close > 0).all()):
        raise ValueError("close must be finite and positive in every row")
    ready = signals["ML_READY"].to_numpy(dtype=bool)
    _check_windows(signals, ready, times)
    labels = _row_labels(signals, ready, times, close, tf_ms) if hold == HOLD_LABEL else None
    funding = _funding(signals, times, tf_ms, int(funding_interval_ms))
    index = pd.DatetimeIndex(pd.to_datetime(times, unit="ms", utc=True), name="timestamp")
    rsi_values = rsi(close, rule.rsi_period) if rule.rsi_max is not None else None
    fee = fee_bps / 10_000.0
    r = _candle_returns(close)

    def decisions(x: StrategyRule) -> np.ndarray:
        want = ready.copy()
        with np.errstate(invalid="ignore"):
            if x.use_ml:
                up = signals["ML_UP_PROB"].to_numpy(dtype=np.float64, na_value=np.nan)
                want &= np.isfinite(up)
                if x.up_min is not None:
                    want &= up > x.up_min
                if x.down_max is not None or x.edge_min is not None:
                    down = signals["ML_DOWN_PROB"].to_numpy(dtype=np.float64, na_value=np.nan)
                    if x.down_max is not None:
                        want &= down < x.down_max
                    if x.edge_min is not None:
                        want &= (up - down) > x.edge_min
            if x.rsi_max is not None and rsi_values is not None:
                want &= rsi_values < x.rsi_max
        return want

    def simulate(name: str, x: StrategyRule) -> StrategyStats:
        want = decisions(x)
        if labels is None:
            return _one_candle(name, r, want.astype(np.float64), int(delay_bars), fee, funding, index, tf)
        return _hold_label(name, close, r, want, int(delay_bars), fee, funding, labels, overlap, index, tf)

    strategy = simulate("strategy", rule)
    stats = sharpe_stats(strategy.returns.to_numpy(), trials.total if trials is not None else 1)
    if trials is None:
        stats = replace(stats, dsr=math.nan, expected_max_sharpe=math.nan)
    return BacktestResult(
        rule=rule,
        fee_bps=fee_bps,
        delay_bars=int(delay_bars),
        timeframe=tf,
        start_ms=int(times[0]),
        end_ms=int(times[-1]),
        candles=len(times),
        strategy=strategy,
        rsi_only=simulate("rsi only", replace(rule, use_ml=False)),
        buy_and_hold=_buy_and_hold(close, index, tf),
        hold=hold,
        overlap=overlap,
        labels=labels.distinct if labels is not None else (),
        funding=funding is not None,
        funding_interval_ms=int(funding_interval_ms),
        trials=trials,
        sharpe_stats=stats,
    )


# ----------------------------------------------------------------------------------------------------------------------
# report


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x * 100:.2f}%"


def _num(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _describe_labels(labels: tuple[LabelKey, ...]) -> str:
    return "; ".join(key.describe() for key in labels) or "none ready"


def _execution_line(res: BacktestResult) -> str:
    fees = f"fee {res.fee_bps:g} bps per side"
    delay = ("filled at the decision's close, held from the next candle" if res.delay_bars == 1 else
             f"filled at the close {res.delay_bars - 1} candle(s) after the decision")
    if res.hold == HOLD_CANDLE:
        return (f"execution  long/flat re-decided every candle (hold candle: each decision held one candle, the "
                f"label's horizon ignored), held from {res.delay_bars} candle(s) after the decision, close-to-close "
                f"returns, {fees}")
    overlap = ("a new signal while in a position is ignored" if res.overlap == OVERLAP_IGNORE else
               f"every signal opens its own sleeve of 1/{max((k.horizon_bars for k in res.labels), default=1)} of "
               "equity")
    barrier = (", to the first barrier crossed (close-based) for a triple barrier"
               if any(k.kind == TRIPLE_BARRIER for k in res.labels) else "")
    return (f"execution  each entry held for its model's label ({_describe_labels(res.labels)}){barrier}; "
            f"{delay}; {overlap}; {fees}")


def _stats_line(res: BacktestResult) -> list[str]:
    st = res.sharpe_stats
    if st is None:
        return []
    trials = str(res.trials.total) if res.trials is not None else "unknown"
    out = [f"strategy   sharpe {_num(res.strategy.sharpe)}  PSR {_num(st.psr)}  DSR {_num(st.dsr)}  trials {trials}"]
    if math.isfinite(st.psr):
        out.append(f"           PSR: probability that the true Sharpe ratio is above 0 ({st.n_obs} candles, skewness "
                   f"{_num(st.skew).replace('-0.00', '0.00')}, kurtosis {st.kurtosis:.1f})")
    if res.trials is None:
        out.append("           DSR n/a: the number of trials is unknown")
        return out
    if math.isfinite(st.expected_max_sharpe):
        best = st.expected_max_sharpe * math.sqrt(bars_per_year(res.timeframe))
        out.append(f"           DSR: probability that it is above {best:.2f}, the best Sharpe ratio expected from "
                   f"{res.trials.total} trial(s) of noise over as many candles")
    out.append(f"           trials: {res.trials.describe()}")
    return out


def verdict(res: BacktestResult) -> str:
    """One plain sentence on what the result means: against buy-and-hold, and whether it survives the deflation."""
    s, bh = res.strategy, res.buy_and_hold
    if s.trades == 0:
        return "The rule never traded in this period: there is nothing to judge."
    versus = (f"the signal lost to buy-and-hold ({_pct(s.total_return)} against {_pct(bh.total_return)})"
              if s.total_return < bh.total_return else
              f"the signal beat buy-and-hold ({_pct(s.total_return)} against {_pct(bh.total_return)})")
    st = res.sharpe_stats
    if st is None or not math.isfinite(st.dsr):
        luck = "the number of trials is unknown, so luck cannot be ruled out"
    elif st.dsr >= 0.95:
        luck = f"its Sharpe ratio is unlikely to be luck (DSR {st.dsr:.2f} >= 0.95)"
    else:
        luck = (f"its Sharpe ratio is not distinguishable from the luck of the best of {st.trials} trial(s) "
                f"(DSR {st.dsr:.2f} < 0.95)")
    text = f"{versus}, and {luck}."
    return text[0].upper() + text[1:]


def format_report(results: BacktestResult | Iterable[StrategyStats]) -> str:
    """An aligned text table: one row per strategy (strategy, RSI only, buy and hold), numbers right-aligned.

    Given a BacktestResult the table is preceded by the period, the rule and the execution assumptions, and followed
    by the strategy's Sharpe ratio with its PSR, DSR and trial count (``PSR 0.81  DSR 0.42  trials 12``), the exits
    by reason when holding the label, and the verdict. Percentages have two decimals; the max drawdown is shown as a
    negative percentage; n/a marks an undefined value (the Sharpe ratio of a flat equity curve, the hit rate without
    trades).
    """
    header_lines: list[str] = []
    footer: list[str] = []
    if isinstance(results, BacktestResult):
        rows = list(results.rows)
        rsi_rule = replace(results.rule, use_ml=False)
        if results.funding:
            hours = results.funding_interval_ms / 3_600_000
            funding = (f"funding    a long pays the funding_rate at every funding time it holds through (every "
                       f"{hours:g} h from 00:00 UTC); strategy paid {_pct(results.strategy.funding_paid)}")
        else:
            funding = "funding    none: the signals carry no funding rate"
        header_lines = [
            f"period     {ms_to_iso(results.start_ms)} .. {ms_to_iso(results.end_ms)} "
            f"({results.candles} {results.timeframe} candles)",
            f"rule       long when {results.rule.describe()}; RSI only: {rsi_rule.describe()}; "
            "fixed thresholds, not optimised on this period",
            _execution_line(results),
            funding,
            "",
        ]
        footer = ["", *_stats_line(results)]
        if results.hold == HOLD_LABEL:
            ex = results.strategy.exits
            footer.append("exits      " + ", ".join(f"{k} {ex.get(k, 0)}" for k in EXIT_REASONS))
        footer.append("verdict    " + verdict(results))
    else:
        rows = list(results)
    headers = ("", "total return", "max drawdown", "sharpe", "trades", "hit rate", "exposure")
    body = [
        (s.name, _pct(s.total_return), _pct(-s.max_drawdown if s.max_drawdown else 0.0), _num(s.sharpe),
         str(s.trades), _pct(s.hit_rate), _pct(s.exposure))
        for s in rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]

    def line(cells) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    out = [*header_lines, line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in body]
    return "\n".join(out + footer)
