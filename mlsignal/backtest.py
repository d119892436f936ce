"""A vectorised long/flat evaluation of a signal frame (e.g. from `mlsignal.walkforward.walk_forward`).

The rule is decided at each candle's close from what is known at that close only:

    long at t  <=>  ML_READY[t] and ML_UP_PROB[t] - ML_DOWN_PROB[t] > edge_min and RSI[t] < rsi_max
                    [and ML_UP_PROB[t] > up_min] [and ML_DOWN_PROB[t] < down_max]

and is compared with the same rule without the ML condition (RSI only) and with buy-and-hold. Honesty, step by step:

* **Execution delay.** The position decided at the close of candle t is held from candle t + delay_bars. A candle's
  return is close-to-close, ``close[i] / close[i-1] - 1``, and it is earned by the position held over candle i. With
  delay_bars=1 the decision at t's close earns from t's close to (t+1)'s close: it is filled at the price that was
  just observed (in practice the next candle's open), which is the earliest fill that does not use the future.
  delay_bars=2 fills one whole candle later. delay_bars=0 would earn candle t's return with a decision taken at its
  close, which is look-ahead, and is refused.
* **Fees.** fee_bps per side is charged on every position change (entry and exit), at the candle where the new
  position starts. A position still open at the last candle is closed there and pays its exit fee, so every trade is
  a complete, costed round trip. Buy-and-hold is the plain price benchmark, close[-1] / close[0] - 1, without fees.
* **No trades without a model.** Where ML_READY is false no position is taken, in the strategy and in the RSI-only
  baseline alike, so both are measured over the same candles. Where RSI is not defined yet (its first rsi_period
  candles) the rule is false as well.
* **Fixed thresholds.** up_min, rsi_max and down_max are fixed parameters chosen before the evaluation period; they are
  never optimised on it. Choosing them by searching over the period being reported would make the result in-sample.
  No in-sample row is accepted: a frame with ML_IN_SAMPLE true anywhere is refused.
* **RSI** is the shared feature code's RSI (Cutler's RSI, a finite-window RSI, `shared.features.rsi`), the same RSI the
  models see as a feature; it is not computed a second way here.

Metrics per row: total return, max drawdown (largest peak-to-trough fall of the equity curve, as a positive fraction),
annualised Sharpe ratio of the per-candle net returns (mean / sample std * sqrt(candles per year), candles per year
from the timeframe, markets open 365 days a year, no risk-free rate), round trips, hit rate (fraction of round trips
with a positive net return, fees included), exposure (fraction of candles in the market) and the equity curve.

Example::

    >>> signals = read_signals("signals.csv")                                                  # doctest: +SKIP
    >>> print(format_report(run_backtest(signals, StrategyRule(edge_min=0.0, rsi_max=70))))     # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from shared.features import rsi
from shared.timeframes import TIMEFRAME_MS, ms_to_iso, timeframe_ms

__all__ = [
    "BacktestResult",
    "StrategyRule",
    "StrategyStats",
    "annualised_sharpe",
    "bars_per_year",
    "format_report",
    "max_drawdown",
    "run_backtest",
]

YEAR_MS = 365 * 86_400_000


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
    position: pd.Series  # 0 or 1 held over each candle
    returns: pd.Series  # net return of each candle, fees included


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


def _simulate(name: str, close: np.ndarray, want: np.ndarray, delay: int, fee: float, index: pd.DatetimeIndex,
              timeframe: str) -> StrategyStats:
    """Long/flat P&L of the decisions `want` (taken at each close), held `delay` candles later, with fees."""
    n = close.size
    r = np.zeros(n)
    r[1:] = close[1:] / close[:-1] - 1.0
    pos = np.zeros(n)
    if delay < n:
        pos[delay:] = want[: n - delay]
    prev = np.concatenate(([0.0], pos[:-1]))
    turnover = np.abs(pos - prev)
    turnover[-1] += pos[-1]  # an open position is closed at the last close and pays its exit fee
    net = pos * r - turnover * fee
    growth = 1.0 + net
    equity = np.cumprod(growth)

    entries = np.flatnonzero((pos == 1) & (prev == 0))
    exits = np.flatnonzero((pos == 0) & (prev == 1))  # the candle whose start closes the trade (exit fee)
    ends = np.full(entries.size, n - 1)  # a trade still open at the end is closed on the last candle
    ends[: exits.size] = exits
    if entries.size:
        bounds = np.empty(2 * entries.size, dtype=np.int64)
        bounds[0::2] = entries
        bounds[1::2] = ends + 1
        trade_growth = np.multiply.reduceat(np.append(growth, 1.0), bounds)[0::2]
        hit_rate = float(np.mean(trade_growth > 1.0))
    else:
        hit_rate = math.nan
    return StrategyStats(
        name=name,
        total_return=float(equity[-1] - 1.0),
        max_drawdown=max_drawdown(equity),
        sharpe=annualised_sharpe(net, timeframe),
        trades=int(entries.size),
        hit_rate=hit_rate,
        exposure=float(pos.mean()),
        equity=pd.Series(equity, index=index, name=name),
        position=pd.Series(pos, index=index, name=name),
        returns=pd.Series(net, index=index, name=name),
    )


def _buy_and_hold(close: np.ndarray, index: pd.DatetimeIndex, timeframe: str) -> StrategyStats:
    n = close.size
    r = np.zeros(n)
    r[1:] = close[1:] / close[:-1] - 1.0
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
# the backtest


def run_backtest(
    signals: pd.DataFrame,
    rule: StrategyRule = StrategyRule(),
    fee_bps: float = 10.0,
    delay_bars: int = 1,
    timeframe: str | None = None,
) -> BacktestResult:
    """Evaluate `rule` on a signal frame, next to the RSI-only rule and buy-and-hold (see the module docstring).

    `signals` has one row per candle, oldest first, with open_time_ms (or a UTC DatetimeIndex / timestamp column),
    close, ML_UP_PROB, ML_READY, and ML_DOWN_PROB when rule.down_max is set; ML_IN_SAMPLE, if present, must be false
    everywhere. `timeframe` is read from the candle spacing when not given. The thresholds of `rule` are fixed
    inputs; this function never searches or tunes them.
    """
    if not isinstance(signals, pd.DataFrame):
        raise ValueError(f"signals must be a pandas DataFrame, got {type(signals).__name__}")
    if isinstance(delay_bars, bool) or not isinstance(delay_bars, (int, np.integer)) or delay_bars < 1:
        raise ValueError(f"delay_bars must be an integer >= 1 (0 would trade on the close it decides at), "
                         f"got {delay_bars!r}")
    fee_bps = float(fee_bps)
    if not (math.isfinite(fee_bps) and fee_bps >= 0):
        raise ValueError(f"fee_bps must be a finite number >= 0, got {fee_bps!r}")
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
    if "ML_IN_SAMPLE" in signals.columns and signals["ML_IN_SAMPLE"].to_numpy(dtype=bool).any():
        k = int(signals["ML_IN_SAMPLE"].to_numpy(dtype=bool).sum())
        raise ValueError(f"{k} row(s) have ML_IN_SAMPLE true: they lie in their model's training window, and a "
                         "backtest over them is not honest; use walk-forward signals")

    times = _times(signals)
    if np.any(np.diff(times) <= 0):
        raise ValueError("signal rows must be in strictly increasing time order")
    tf = timeframe or _infer_timeframe(times)
    timeframe_ms(tf)
    close = signals["close"].to_numpy(dtype=np.float64)
    if not (np.isfinite(close).all() and (close > 0).all()):
        raise ValueError("close must be finite and positive in every row")
    index = pd.DatetimeIndex(pd.to_datetime(times, unit="ms", utc=True), name="timestamp")
    ready = signals["ML_READY"].to_numpy(dtype=bool)
    rsi_values = rsi(close, rule.rsi_period) if rule.rsi_max is not None else None
    fee = fee_bps / 10_000.0

    def decisions(r: StrategyRule) -> np.ndarray:
        want = ready.copy()
        with np.errstate(invalid="ignore"):
            if r.use_ml:
                up = signals["ML_UP_PROB"].to_numpy(dtype=np.float64, na_value=np.nan)
                want &= np.isfinite(up)
                if r.up_min is not None:
                    want &= up > r.up_min
                if r.down_max is not None or r.edge_min is not None:
                    down = signals["ML_DOWN_PROB"].to_numpy(dtype=np.float64, na_value=np.nan)
                    if r.down_max is not None:
                        want &= down < r.down_max
                    if r.edge_min is not None:
                        want &= (up - down) > r.edge_min
            if r.rsi_max is not None and rsi_values is not None:
                want &= rsi_values < r.rsi_max
        return want.astype(np.float64)

    rsi_rule = replace(rule, use_ml=False)
    return BacktestResult(
        rule=rule,
        fee_bps=fee_bps,
        delay_bars=int(delay_bars),
        timeframe=tf,
        start_ms=int(times[0]),
        end_ms=int(times[-1]),
        candles=len(times),
        strategy=_simulate("strategy", close, decisions(rule), int(delay_bars), fee, index, tf),
        rsi_only=_simulate("rsi only", close, decisions(rsi_rule), int(delay_bars), fee, index, tf),
        buy_and_hold=_buy_and_hold(close, index, tf),
    )


# ----------------------------------------------------------------------------------------------------------------------
# report


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x * 100:.2f}%"


def _num(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}"


def format_report(results: BacktestResult | Iterable[StrategyStats]) -> str:
    """An aligned text table: one row per strategy (strategy, RSI only, buy and hold), numbers right-aligned.

    Given a BacktestResult the table is preceded by the period, the rule and the execution assumptions. Percentages
    have two decimals; the max drawdown is shown as a negative percentage; n/a marks an undefined value (the Sharpe
    ratio of a flat equity curve, the hit rate without trades).
    """
    header_lines = []
    if isinstance(results, BacktestResult):
        rows = list(results.rows)
        rsi_rule = replace(results.rule, use_ml=False)
        header_lines = [
            f"period     {ms_to_iso(results.start_ms)} .. {ms_to_iso(results.end_ms)} "
            f"({results.candles} {results.timeframe} candles)",
            f"rule       long when {results.rule.describe()}; RSI only: {rsi_rule.describe()}",
            f"execution  long/flat, held from {results.delay_bars} candle(s) after the decision, close-to-close "
            f"returns, fee {results.fee_bps:g} bps per side; fixed thresholds, not optimised on this period",
            "",
        ]
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
    return "\n".join(out)
