"""The long/flat backtest on hand-made signals with known answers, and the backtest CLI on the real services."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from mlsignal.backtest import (
    StrategyRule,
    annualised_sharpe,
    bars_per_year,
    format_report,
    max_drawdown,
    run_backtest,
)
from service_fixtures import load_market, ms
from shared.features import FeatureSpec, compute_features, rsi
from shared.timeframes import ms_to_iso

T0 = 1_546_300_800_000  # 2019-01-01T00:00:00Z
H = 3_600_000
FEE = 0.001  # 10 bps


def frame(close, up=None, ready=True, down=None, step_ms=H) -> pd.DataFrame:
    n = len(close)
    out = pd.DataFrame({
        "open_time_ms": T0 + step_ms * np.arange(n, dtype=np.int64),
        "close": np.asarray(close, dtype=float),
        "ML_UP_PROB": np.full(n, 0.5) if up is None else np.asarray(up, dtype=float),
        "ML_READY": np.broadcast_to(np.asarray(ready, dtype=bool), (n,)).copy(),
        "ML_IN_SAMPLE": False,
    })  # fmt: skip
    out["ML_DOWN_PROB"] = 0.2 if down is None else np.asarray(down, dtype=float)
    out["train_end_ms"] = T0 - 100 * H  # every row comes after its model's training window
    return out


def labelled(signals, horizon, threshold=0.02, kind="fixed_horizon") -> pd.DataFrame:
    out = signals.copy()
    out["ML_HORIZON_BARS"] = horizon
    out["ML_THRESHOLD"] = threshold
    out["ML_LABEL_KIND"] = kind
    return out


def signal_at(close, *decisions, **label) -> pd.DataFrame:
    """Signals on `close` where the ML-only rule fires exactly at the given decision candles."""
    up = np.full(len(close), 0.5)
    up[list(decisions)] = 0.7
    return labelled(frame(close, up), **label)


def run_candle(signals, rule, **kwargs):
    """The one-candle mode: re-decided at every close, held one candle."""
    return run_backtest(signals, rule, hold="candle", **kwargs)


ML_ONLY = StrategyRule(up_min=0.6, rsi_max=None)  # six candles are too few for a 14-candle RSI

# Long decided at t=1 and t=3..5; with one candle of delay held over candles 2 and 4..5.
CLOSE6 = [100.0, 110.0, 99.0, 99.0, 108.9, 100.0]
UP6 = [0.5, 0.7, 0.5, 0.7, 0.7, 0.7]


def test_hand_computed_positions_returns_fees_and_trades():
    res = run_candle(frame(CLOSE6, UP6), ML_ONLY, fee_bps=10, delay_bars=1)
    s = res.strategy
    assert s.position.tolist() == [0, 0, 1, 0, 1, 1]  # decided at t=1 -> held from t=2
    r5 = 100.0 / 108.9 - 1.0
    expected = [
        0.0,
        0.0,
        99.0 / 110.0 - 1.0 - FEE,  # held over candle 2 (110 -> 99), entry fee
        -FEE,  # flat again: exit fee
        108.9 / 99.0 - 1.0 - FEE,  # entry fee, held (99 -> 108.9)
        r5 - FEE,  # held (108.9 -> 100), closed at the last close: exit fee
    ]
    assert np.allclose(s.returns.to_numpy(), expected, rtol=0, atol=1e-15)
    equity = np.cumprod(1.0 + np.array(expected))
    assert np.allclose(s.equity.to_numpy(), equity, rtol=1e-15)
    assert s.total_return == pytest.approx(equity[-1] - 1.0, rel=1e-14)
    assert s.trades == 2
    trade1 = (1 + 99 / 110 - 1 - FEE) * (1 - FEE) - 1  # -10.2 %
    trade2 = (1 + 108.9 / 99 - 1 - FEE) * (1 + r5 - FEE) - 1  # +0.8 %
    assert trade1 < 0 < trade2
    assert s.hit_rate == 0.5
    assert s.exposure == pytest.approx(3 / 6)
    assert s.max_drawdown == pytest.approx(1 - equity.min() / 1.0)
    assert s.equity.index[0] == pd.Timestamp("2019-01-01", tz="UTC")


def test_delay_shifts_the_position_and_zero_delay_is_refused():
    s = run_candle(frame(CLOSE6, UP6), ML_ONLY, fee_bps=0, delay_bars=2).strategy
    assert s.position.tolist() == [0, 0, 0, 1, 0, 1]
    assert np.allclose(s.returns, [0, 0, 0, 0.0, 0, 100 / 108.9 - 1], atol=1e-15)
    with pytest.raises(ValueError, match="delay_bars"):
        run_candle(frame(CLOSE6, UP6), ML_ONLY, delay_bars=0)


def test_fees_are_charged_per_side_on_every_change():
    free = run_candle(frame(CLOSE6, UP6), ML_ONLY, fee_bps=0).strategy
    paid = run_candle(frame(CLOSE6, UP6), ML_ONLY, fee_bps=25).strategy
    changes = 4  # in at 2, out at 3, in at 4, out at the end
    assert np.isclose((free.returns - paid.returns).sum(), changes * 0.0025, atol=1e-15)
    assert free.trades == paid.trades == 2


def test_no_trades_where_the_model_is_not_ready():
    ready = [True, False, True, False, True, True]
    s = run_candle(frame(CLOSE6, UP6, ready=ready), ML_ONLY, fee_bps=0).strategy
    assert s.position.tolist() == [0, 0, 0, 0, 0, 1]  # only the decision at t=4 (ready) is taken
    nothing = run_candle(frame(CLOSE6, UP6, ready=False), ML_ONLY, fee_bps=10)
    for row in (nothing.strategy, nothing.rsi_only):
        assert row.trades == 0 and row.total_return == 0.0 and row.exposure == 0.0 and math.isnan(row.hit_rate)
        assert math.isnan(row.sharpe)


def test_down_max_filter():
    down = [0.1, 0.1, 0.1, 0.5, 0.1, 0.1]
    rule = StrategyRule(up_min=0.6, rsi_max=None, down_max=0.3)
    s = run_candle(frame(CLOSE6, UP6, down=down), rule, fee_bps=0).strategy
    assert s.position.tolist() == [0, 0, 1, 0, 0, 1]


def test_buy_and_hold_is_the_price_ratio():
    close = [100.0, 120.0, 90.0, 95.0, 130.0, 117.0]
    bh = run_candle(frame(close), ML_ONLY).buy_and_hold
    assert bh.total_return == pytest.approx(117.0 / 100.0 - 1.0, rel=1e-15)
    assert np.allclose(bh.equity.to_numpy(), np.array(close) / 100.0, rtol=1e-15)
    assert bh.max_drawdown == pytest.approx(1 - 90 / 120)
    assert bh.trades == 1 and bh.hit_rate == 1.0


def test_max_drawdown_of_a_known_curve():
    assert max_drawdown([1.0, 1.2, 0.9, 1.1, 0.6, 0.8]) == pytest.approx(0.5)
    assert max_drawdown([0.8, 1.0, 1.5]) == pytest.approx(0.2)  # measured from the starting value 1.0
    assert max_drawdown([1.0, 1.1, 1.2]) == 0.0


def test_sharpe_is_annualised_by_the_timeframe():
    r = np.array([0.01, -0.005, 0.02, 0.0, -0.01, 0.004])
    expected = r.mean() / r.std(ddof=1)
    assert bars_per_year("1h") == 8760 and bars_per_year("1d") == 365 and bars_per_year("4h") == 2190
    assert annualised_sharpe(r, "1h") == pytest.approx(expected * math.sqrt(8760))
    assert annualised_sharpe(r, "1d") == pytest.approx(expected * math.sqrt(365))
    assert math.isnan(annualised_sharpe(np.zeros(10), "1h"))
    # run_backtest reads the timeframe from the candle spacing
    daily = run_candle(frame(CLOSE6, UP6, step_ms=86_400_000), ML_ONLY)
    hourly = run_candle(frame(CLOSE6, UP6), ML_ONLY)
    assert daily.timeframe == "1d" and hourly.timeframe == "1h"
    assert daily.strategy.sharpe == pytest.approx(hourly.strategy.sharpe * math.sqrt(365 / 8760))


def random_signals(n=400, seed=3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    ready = np.arange(n) >= 20
    return frame(close, rng.uniform(0.3, 0.9, n), ready=ready, down=rng.uniform(0.05, 0.5, n))


def test_rsi_is_the_shared_feature_rsi():
    sig = random_signals()
    close = sig.close.to_numpy()
    candles = pd.DataFrame({"open": close, "high": close * 1.01, "low": close * 0.99, "close": close, "volume": 1.0})
    shared_rsi = compute_features(candles, FeatureSpec())["rsi_14"].to_numpy()
    mine = rsi(close, 14)
    both = ~np.isnan(shared_rsi)
    assert both.sum() > 250 and np.array_equal(mine[both], shared_rsi[both])
    assert np.isnan(mine[:14]).all() and not np.isnan(mine[14:]).any()
    # Cutler's RSI by hand at one row: gains / (gains + losses) over the last 14 changes
    d = np.diff(close)[-14:]
    assert mine[-1] == pytest.approx(100 * d[d > 0].sum() / np.abs(d).sum())


def test_rsi_only_baseline_drops_the_ml_condition():
    sig = random_signals()
    rule = StrategyRule(up_min=0.6, rsi_max=55)
    res = run_candle(sig, rule, fee_bps=0)
    r = rsi(sig.close.to_numpy(), 14)
    ready = sig.ML_READY.to_numpy()
    with np.errstate(invalid="ignore"):
        want_rsi = ready & (r < 55)
        want_ml = want_rsi & (sig.ML_UP_PROB.to_numpy() > 0.6)
    assert np.array_equal(res.rsi_only.position.to_numpy()[1:], want_rsi[:-1].astype(float))
    assert np.array_equal(res.strategy.position.to_numpy()[1:], want_ml[:-1].astype(float))
    assert 0 < res.strategy.exposure < res.rsi_only.exposure < 1


@pytest.mark.parametrize("rule", [StrategyRule(), StrategyRule(up_min=0.55, rsi_max=60, down_max=0.3)])
def test_no_look_ahead(rule):
    sig = random_signals()
    base = run_candle(sig, rule, fee_bps=10)
    n = len(sig)
    # a signal changed at the last candle changes no equity value at all before it
    for col, value in (("ML_UP_PROB", 0.99), ("ML_UP_PROB", 0.01), ("ML_DOWN_PROB", 0.0), ("ML_READY", False)):
        changed = sig.copy()
        changed.loc[n - 1, col] = value
        for a, b in zip(run_candle(changed, rule, fee_bps=10).rows, base.rows, strict=True):
            assert np.array_equal(a.equity.to_numpy()[: n - 1], b.equity.to_numpy()[: n - 1])
    # a signal or a price changed at candle k changes nothing before k + delay (signal) or k (price)
    for k in (50, 200, 333):
        for delay in (1, 3):
            ref = run_candle(sig, rule, fee_bps=10, delay_bars=delay)
            changed = sig.copy()
            changed.loc[k:, "ML_UP_PROB"] = 1.0 - changed.loc[k:, "ML_UP_PROB"]
            out = run_candle(changed, rule, fee_bps=10, delay_bars=delay)
            assert np.array_equal(out.strategy.equity.to_numpy()[: k + delay],
                                  ref.strategy.equity.to_numpy()[: k + delay])
            moved = sig.copy()
            moved.loc[k:, "close"] = moved.loc[k:, "close"] * np.linspace(0.5, 2.0, n - k)
            out = run_candle(moved, rule, fee_bps=10, delay_bars=delay)
            for a, b in zip(out.rows, ref.rows, strict=True):
                assert np.array_equal(a.equity.to_numpy()[:k], b.equity.to_numpy()[:k])


def test_refuses_in_sample_rows_and_bad_input():
    sig = frame(CLOSE6, UP6)
    sig.loc[2, "ML_IN_SAMPLE"] = True
    with pytest.raises(ValueError, match="ML_IN_SAMPLE"):
        run_candle(sig, ML_ONLY)
    with pytest.raises(ValueError, match="ML_UP_PROB"):
        run_candle(frame(CLOSE6).drop(columns="ML_UP_PROB"), ML_ONLY)
    with pytest.raises(ValueError, match="increasing"):
        run_candle(frame(CLOSE6).iloc[::-1], ML_ONLY)


def test_report_table_is_aligned_with_three_rows():
    text = format_report(run_candle(random_signals(), StrategyRule()))
    lines = text.splitlines()
    first = lines.index("") + 1
    table = lines[first:lines.index("", first)]
    assert [line.split("  ")[0].strip() for line in table[2:]] == ["strategy", "rsi only", "buy and hold"]
    assert len({len(line) for line in table}) == 1  # right-aligned numbers: every line has the same width
    for word in ("total return", "max drawdown", "sharpe", "trades", "hit rate", "exposure", "not optimised"):
        assert word in text


# ----------------------------------------------------------------------------------------------------------------------
# holding the label


CLOSE10 = [100.0, 100.0, 101.0, 103.5, 99.0, 98.0, 97.0, 100.0, 104.0, 105.0]


def test_a_fixed_horizon_entry_is_held_for_the_horizon_with_one_fee_per_side():
    sig = signal_at(CLOSE10, 1, horizon=3)
    s = run_backtest(sig, ML_ONLY, fee_bps=10).strategy
    # decided at the close of 1, filled at that close, held over candles 2, 3, 4: close[4] / close[1], as the label
    assert s.position.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    r = np.array(CLOSE10[1:]) / np.array(CLOSE10[:-1]) - 1
    expected = np.zeros(10)
    expected[2:5] = r[1:4]
    expected[2] -= FEE  # entry fee on the first candle held
    expected[4] -= FEE  # exit fee on the candle at whose close it exits
    assert np.allclose(s.returns.to_numpy(), expected, rtol=0, atol=1e-15)
    assert s.trades == 1 and s.exits == {"horizon": 1, "up barrier": 0, "down barrier": 0, "end of data": 0}
    gross = (1 + r[1] - FEE) * (1 + r[2]) * (1 + r[3] - FEE)
    assert s.total_return == pytest.approx(gross - 1, rel=1e-12)
    assert s.hit_rate == (1.0 if gross > 1 else 0.0)
    # the same decision a candle later with two candles of delay: filled at the close of 2
    late = run_backtest(sig, ML_ONLY, fee_bps=10, delay_bars=2).strategy
    assert late.position.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]


def test_the_horizon_is_a_span_of_time_across_missing_candles():
    sig = signal_at(CLOSE10, 1, horizon=3)
    sig.loc[3:, "open_time_ms"] += 2 * H  # candles 3 and 4 missing: rows 3.. open 2 h later
    s = run_backtest(sig, ML_ONLY, timeframe="1h").strategy
    # filled at the close of row 1 (01:00 open); 3 candles later is the close of the 04:00 candle, which is missing:
    # out at the first close after it, row 3 (the 05:00 candle)
    assert s.position.tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0] and s.exits["horizon"] == 1


def test_overlap_ignore_holds_one_position_and_stack_opens_a_sleeve_per_signal():
    sig = signal_at(CLOSE10, 1, 2, 4, horizon=3)
    ignore = run_backtest(sig, ML_ONLY, fee_bps=10, overlap="ignore").strategy
    # the signal at 2 comes while the first position (2..4) is open: ignored; the one at 4, the exit candle, is not
    assert ignore.position.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    assert ignore.trades == 2
    stack = run_backtest(sig, ML_ONLY, fee_bps=10, overlap="stack").strategy
    third = 1 / 3
    assert np.allclose(stack.position.to_numpy(), [0, 0, third, 2 * third, 2 * third, 2 * third, third, third, 0, 0])
    assert stack.trades == 3
    r = np.array([0.0, *(np.array(CLOSE10[1:]) / np.array(CLOSE10[:-1]) - 1)])
    fees = np.zeros(10)
    for first, last in ((2, 4), (3, 5), (5, 7)):  # each sleeve pays 1/3 of a fee at its entry and its exit
        fees[first] += third * FEE
        fees[last] += third * FEE
    assert np.allclose(stack.returns.to_numpy(), stack.position.to_numpy() * r - fees, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="overlap"):
        run_backtest(sig, ML_ONLY, overlap="both")
    with pytest.raises(ValueError, match="hold='label'"):
        run_backtest(sig, ML_ONLY, hold="candle", overlap="stack")


def test_a_triple_barrier_entry_exits_at_the_first_barrier_crossed_close_based():
    up = run_backtest(signal_at(CLOSE10, 1, horizon=6, kind="triple_barrier"), ML_ONLY).strategy
    # from 100: 101 (+1 %), 103.5 (+3.5 % > 2 %): out at the close of candle 3
    assert up.position.tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0] and up.exits["up barrier"] == 1
    down = run_backtest(signal_at(CLOSE10, 3, horizon=6, kind="triple_barrier"), ML_ONLY).strategy
    # from 103.5: 99 (-4.3 %): out at the close of candle 4
    assert down.position.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0] and down.exits["down barrier"] == 1
    # a move of exactly the threshold (102 / 100 - 1 = 0.020000000000000018) is no crossing, as in shared.labels
    exact = [100.0, 100.0, 102.0, 98.0, 100.0, 100.0]
    held = run_backtest(signal_at(exact, 1, horizon=3, kind="triple_barrier"), ML_ONLY).strategy
    assert held.position.tolist() == [0, 0, 1, 1, 1, 0] and held.exits["horizon"] == 1
    # the horizon beyond the last candle: closed at the last close
    cut = run_backtest(signal_at(CLOSE10, 7, horizon=6, kind="triple_barrier", threshold=0.5), ML_ONLY).strategy
    assert cut.position.tolist() == [0] * 8 + [1, 1] and cut.exits["end of data"] == 1


def test_triple_barrier_exits_agree_with_the_shared_labels():
    from shared.labels import DOWN, RANGE, UP, triple_barrier_labels

    rng = np.random.default_rng(11)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 300)))
    labels = triple_barrier_labels(close, 24, 0.02)
    reason = {UP: "up barrier", DOWN: "down barrier", RANGE: "horizon"}
    for t in rng.choice(np.arange(0, 300 - 25), size=40, replace=False):
        s = run_backtest(signal_at(close, int(t), horizon=24, kind="triple_barrier"), ML_ONLY, fee_bps=0).strategy
        assert s.exits[reason[int(labels[t])]] == 1, t
        held = np.flatnonzero(s.position.to_numpy())
        assert held[0] == t + 1 and held[-1] <= t + 24


def test_volatility_scaled_barriers_are_the_labels_own():
    from shared.labels import DOWN, RANGE, UP, LabelSpec, barriers, triple_barrier_labels

    rng = np.random.default_rng(5)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 300)))
    spec = LabelSpec(horizon_bars=24, kind="triple_barrier", volatility_bars=20, volatility_multiple=0.5)
    barrier = barriers(close, spec)
    labels = triple_barrier_labels(close, 24, barrier)
    reason = {UP: "up barrier", DOWN: "down barrier", RANGE: "horizon"}

    def scaled(t, **extra):
        out = signal_at(close, t, horizon=24, kind="triple_barrier").assign(
            ML_VOLATILITY_BARS=20, ML_VOLATILITY_MULTIPLE=0.5, **extra)
        out["ML_READY"] = (np.arange(300) >= 20) | (np.arange(300) == t)  # the RSI-only baseline enters when ready
        return out

    for t in rng.choice(np.arange(20, 300 - 25), size=30, replace=False):
        s = run_backtest(scaled(int(t)), ML_ONLY, fee_bps=0).strategy
        assert s.exits[reason[int(labels[t])]] == 1, t
    assert "triple barrier 24 candles, ±0.5 x volatility(20) x sqrt(24)" in format_report(
        run_backtest(scaled(50), ML_ONLY))
    # an entry with fewer than 20 candles before it in the file: its barrier is unknown
    with pytest.raises(ValueError, match="entry at 2019-01-01T05:00:00Z needs 20 candles before it"):
        run_backtest(scaled(5), ML_ONLY)
    # ... unless the file carries it (walk-forward computes ML_BARRIER with the history before the period)
    given = np.where(np.isnan(barrier), 0.03, barrier)
    assert run_backtest(scaled(5, ML_BARRIER=given), ML_ONLY).strategy.trades == 1
    with pytest.raises(ValueError, match=r"ML_BARRIER at .* does not match"):
        run_backtest(scaled(50, ML_BARRIER=given * 1.01), ML_ONLY)
    with pytest.raises(ValueError, match="ML_VOLATILITY_MULTIPLE"):
        run_backtest(scaled(50).assign(ML_VOLATILITY_MULTIPLE=0.0), ML_ONLY)


def test_funding_is_paid_at_each_funding_time_held_through():
    close = list(100.0 + np.arange(20.0))
    base = signal_at(close, 1, horizon=8)  # held over candles 2..9; candle 7 closes at 08:00 UTC, a funding time
    funded = base.copy()
    funded["funding_rate"] = 0.0001
    a = run_backtest(base, ML_ONLY).strategy
    b = run_backtest(funded, ML_ONLY).strategy
    diff = a.returns.to_numpy() - b.returns.to_numpy()
    expected = np.zeros(20)
    expected[7] = 0.0001
    assert np.allclose(diff, expected, rtol=0, atol=1e-15)
    assert b.funding_paid == pytest.approx(0.0001)
    # a negative rate is received; a 4h interval has a second funding time (04:00, candle 3) in the position
    funded["funding_rate"] = -0.0002
    c = run_backtest(funded, ML_ONLY, funding_interval_ms=4 * H).strategy
    assert c.funding_paid == pytest.approx(-0.0004)
    # the one-candle mode pays it too
    d = run_backtest(funded, ML_ONLY, hold="candle").strategy
    assert d.funding_paid == pytest.approx(-0.0002 * d.position.to_numpy()[[7, 15]].sum())
    # a funding time held without a rate is an error; a file without any rate pays none
    gap = base.copy()
    gap["funding_rate"] = 0.0001
    gap.loc[7, "funding_rate"] = np.nan
    with pytest.raises(ValueError, match="funding_rate is missing at 2019-01-01T07:00:00Z"):
        run_backtest(gap, ML_ONLY)
    # a funding time no position holds needs no rate: candle 23 (closing at 24:00) after the last ready row
    late = signal_at(list(100.0 + np.arange(30.0)), 1, horizon=8)
    late["ML_READY"] = np.arange(30) < 10
    late["funding_rate"] = 0.0001
    late.loc[23, "funding_rate"] = np.nan
    assert run_backtest(late, ML_ONLY).rsi_only.position.to_numpy()[23] == 0
    none = base.copy()
    none["funding_rate"] = np.nan
    assert run_backtest(none, ML_ONLY).strategy.funding_paid == 0.0
    assert "funding    none" in format_report(run_backtest(none, ML_ONLY))


def test_rows_the_model_could_have_seen_are_refused():
    sig = signal_at(CLOSE10, 1, horizon=3)
    run_backtest(sig, ML_ONLY)
    seen = sig.copy()
    seen.loc[4:, "train_end_ms"] = seen.loc[6, "open_time_ms"]  # rows 4..6 lie in the window, 7..9 after it
    with pytest.raises(ValueError, match=r"3 row\(s\) were predicted by a model trained on a window that contains"):
        run_backtest(seen, ML_ONLY)
    later = sig.copy()
    later["train_end_ms"] = T0 + 50 * H  # a window that ends after every row
    with pytest.raises(ValueError, match="2019-01-01T00:00:00Z"):
        run_backtest(later, ML_ONLY, hold="candle")
    with pytest.raises(ValueError, match="train_end_ms"):
        run_backtest(sig.drop(columns="train_end_ms"), ML_ONLY)
    unknown = sig.copy()
    unknown.loc[3, "train_end_ms"] = np.nan
    with pytest.raises(ValueError, match="train_end_ms is missing on 1 ready row"):
        run_backtest(unknown, ML_ONLY)
    # rows that are not ready carry no prediction and no trade: their window is not needed
    unknown.loc[3, "ML_READY"] = False
    run_backtest(unknown, ML_ONLY)


def test_holding_the_label_needs_the_label_columns():
    sig = frame(CLOSE10, [0.7] * 10)
    with pytest.raises(ValueError, match="ML_HORIZON_BARS, ML_THRESHOLD, ML_LABEL_KIND"):
        run_backtest(sig, ML_ONLY)
    run_backtest(sig, ML_ONLY, hold="candle")
    bad = labelled(sig, 24, kind="straddle")
    with pytest.raises(ValueError, match="ML_LABEL_KIND must be fixed_horizon or triple_barrier"):
        run_backtest(bad, ML_ONLY)
    with pytest.raises(ValueError, match="ML_HORIZON_BARS must be an integer >= 1"):
        run_backtest(labelled(sig, 0), ML_ONLY)


@pytest.mark.parametrize("overlap", ["ignore", "stack"])
@pytest.mark.parametrize("kind", ["fixed_horizon", "triple_barrier"])
def test_holding_the_label_has_no_look_ahead(overlap, kind):
    sig = labelled(random_signals(), 24, kind=kind)
    rule = StrategyRule()
    n = len(sig)
    for k in (50, 200, 333):
        for delay in (1, 3):
            ref = run_backtest(sig, rule, fee_bps=10, delay_bars=delay, overlap=overlap)
            changed = sig.copy()
            changed.loc[k:, "ML_UP_PROB"] = 1.0 - changed.loc[k:, "ML_UP_PROB"]
            out = run_backtest(changed, rule, fee_bps=10, delay_bars=delay, overlap=overlap)
            assert np.array_equal(out.strategy.equity.to_numpy()[: k + delay],
                                  ref.strategy.equity.to_numpy()[: k + delay])
            moved = sig.copy()
            moved.loc[k:, "close"] = moved.loc[k:, "close"] * np.linspace(0.5, 2.0, n - k)
            out = run_backtest(moved, rule, fee_bps=10, delay_bars=delay, overlap=overlap)
            for a, b in zip(out.rows, ref.rows, strict=True):
                assert np.array_equal(a.equity.to_numpy()[:k], b.equity.to_numpy()[:k])


def test_the_report_prints_psr_dsr_and_trials_as_tokens_and_a_verdict():
    sig = labelled(random_signals(2000), 24)
    res = run_backtest(sig, StrategyRule(), trials=12)
    text = format_report(res)
    st = res.sharpe_stats
    assert re.search(rf"^strategy   sharpe {res.strategy.sharpe:.2f}  PSR {st.psr:.2f}  DSR {st.dsr:.2f}  trials 12$",
                     text, re.M), text
    assert st.trials == 12 and st.dsr < st.psr  # deflating for 12 trials lowers the probability
    assert "exits      horizon" in text and "verdict    The signal" in text
    assert "fixed horizon 24 candles, ±2 %" in text
    unknown = format_report(run_backtest(sig, StrategyRule()))
    assert "DSR n/a  trials unknown" in unknown and "luck cannot be ruled out" in unknown
    # the same PSR as mlsignal.stats on the strategy's per-candle net returns
    from mlsignal.stats import sharpe_stats

    assert st.psr == sharpe_stats(res.strategy.returns.to_numpy(), 12).psr


# ----------------------------------------------------------------------------------------------------------------------
# the registry: training windows, labels and trials


def model_info(model_id, symbol="BT/USD", stage="RESEARCH", start=T0 - 400 * H, end=T0 - 30 * H, horizon=24,
               threshold=0.02, kind="fixed_horizon", trees=50, seed=42, reason=""):
    from google.protobuf.timestamp_pb2 import Timestamp

    from mlsignal.v1 import common_pb2

    def ts(ms):
        t = Timestamp()
        t.FromMilliseconds(ms)
        return t

    return common_pb2.ModelInfo(
        model_id=model_id, symbol=symbol, timeframe="1h", train_start=ts(start), train_end=ts(end),
        label=common_pb2.LabelSpec(horizon_bars=horizon, threshold=threshold,
                                   kind=common_pb2.LabelKind.Value(f"LABEL_KIND_{kind.upper()}")),
        params=common_pb2.ModelParams(n_estimators=trees, max_depth=6, min_samples_leaf=25, random_state=seed),
        feature_set="ohlcv-v1", features=["rsi_14", "ret_1"],
        stage=common_pb2.ModelStage.Value(f"MODEL_STAGE_{stage}"), stage_reason=reason,
    )  # fmt: skip


def test_attach_model_info_fills_windows_and_labels_by_model_id_and_checks_the_file():
    from mlsignal.backtest import attach_model_info

    sig = frame(CLOSE10, [0.7] * 10).drop(columns="train_end_ms")
    sig["ML_MODEL_ID"] = ["a"] * 5 + ["b"] * 5
    models = {"a": model_info("a"), "b": model_info("b", end=T0 + 3 * H, kind="triple_barrier", horizon=6)}
    out = attach_model_info(sig, models)
    assert out.train_end_ms.tolist() == [T0 - 30 * H] * 5 + [T0 + 3 * H] * 5
    assert out.ML_HORIZON_BARS.tolist() == [24] * 5 + [6] * 5
    assert out.ML_LABEL_KIND.tolist() == ["fixed_horizon"] * 5 + ["triple_barrier"] * 5
    assert out.ML_THRESHOLD.tolist() == pytest.approx([0.02] * 10)
    # model b's window ends at row 3, before its rows 5..9: accepted; moved to row 6, rows 5 and 6 are refused
    run_backtest(out, ML_ONLY)
    models["b"] = model_info("b", end=T0 + 6 * H)
    with pytest.raises(ValueError, match=r"2 row\(s\) were predicted .*\(model b\)"):
        run_backtest(attach_model_info(sig, models), ML_ONLY)
    with pytest.raises(ValueError, match="ML_MODEL_ID c is not in the registry"):
        attach_model_info(sig.assign(ML_MODEL_ID="c"), models)
    # a file whose own columns disagree with the registry is refused
    edited = out.copy()
    edited.loc[2, "train_end_ms"] = T0 - 90 * H
    with pytest.raises(ValueError, match=r"train_end_ms .* registry says"):
        attach_model_info(edited, {"a": model_info("a"), "b": model_info("b", end=T0 + 3 * H)})


def test_trials_count_the_markets_distinct_research_configurations_and_the_rules():
    from mlsignal.backtest import count_trials

    models = [
        model_info("w1"), model_info("w2", start=T0 - 300 * H),  # walk-forward steps: one configuration
        model_info("t1", threshold=0.03), model_info("t2", kind="triple_barrier"), model_info("s1", seed=7),
        model_info("old", trees=300, stage="RETIRED", reason="research retention"),  # tried, then retired
        model_info("live", trees=200, stage="SERVING"), model_info("gone", trees=400, stage="RETIRED"),
        model_info("other", symbol="ETH/USD", trees=999),  # another market
    ]
    count = count_trials(models, ["w1", "w2"])
    assert count.research_configs == 5 and count.total == 6 and count.market == "BT/USD 1h"
    assert "5 research configuration(s) of BT/USD 1h in the registry + 1 rule(s) in this run" in count.describe()
    assert count_trials(models, ["w1"], extra=4).total == 10
    # the model that predicted the signals is a configuration tried even when it is not a research model
    assert count_trials(models, ["live"]).research_configs == 6
    with pytest.raises(ValueError, match="2 markets"):
        count_trials(models, ["w1", "other"])
    with pytest.raises(ValueError, match="not in the registry"):
        count_trials(models, ["nope"])


# ----------------------------------------------------------------------------------------------------------------------
# CLI on the real services

CLI_SYMBOL = "BTCLI/USD"


def test_cli_backtest_signals_writes_the_file_and_backtest_prints_the_table(services, sample_frame, tmp_path,
                                                                            monkeypatch, capsys):
    from mlsignal.cli import main
    from mlsignal.walkforward import read_signals

    load_market(services.url, sample_frame, symbols=(CLI_SYMBOL,))
    monkeypatch.setenv("MLSIGNAL_DATABASE_URL", services.url)
    out = tmp_path / "signals.csv"
    code = main([
        "backtest-signals", "--symbol", CLI_SYMBOL, "--timeframe", "1h", "--start", "2019-01-01",
        "--end", "2019-02-20", "--train-window", "120d", "--step", "25d", "--horizon", "24", "--threshold", "0.02",
        "--trees", "20", "--seed", "42", "--out", str(out),
        "--training-target", f"127.0.0.1:{services.training.port}",
        "--inference-target", f"127.0.0.1:{services.inference.port}",
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1200 rows" in captured.out and "2 models" in captured.out and "0 in-sample" in captured.out
    signals = read_signals(out)
    assert len(signals) == 50 * 24 and signals.ML_MODEL_ID.nunique() == 2 and not signals.ML_IN_SAMPLE.any()
    assert (signals.open_time_ms > signals.train_end_ms + 24 * 3_600_000).all()

    assert signals.ML_HORIZON_BARS.eq(24).all() and signals.ML_THRESHOLD.eq(0.02).all()
    assert signals.ML_LABEL_KIND.eq("fixed_horizon").all()

    training = f"127.0.0.1:{services.training.port}"
    code = main(["backtest", "--signals", str(out), "--edge-min", "none", "--rsi-max", "70", "--fee-bps", "10",
                 "--delay", "1", "--training-target", training])
    printed = capsys.readouterr().out
    assert code == 0
    rows = [line for line in printed.splitlines()
            if line.startswith(("strategy  ", "rsi only", "buy and hold")) and "PSR" not in line]
    assert [r.split("  ")[0].strip() for r in rows] == ["strategy", "rsi only", "buy and hold"]
    bh = rows[2].split()
    close = signals.close.to_numpy()
    assert bh[3] == f"{(close[-1] / close[0] - 1) * 100:.2f}%"
    assert "each entry held for its model's label (fixed horizon 24 candles, ±2 %)" in printed
    # trials: the market's research configurations in the registry (both walk-forward models share one) + the rule
    from mlsignal.backtest import count_trials
    from mlsignal.client import TrainingClient

    with TrainingClient(training) as client:
        expected = count_trials(client.list_models(CLI_SYMBOL, "1h"), list(signals.ML_MODEL_ID.unique()))
    assert expected.research_configs == 1 and expected.total == 2
    assert re.search(r"^strategy   sharpe \S+  PSR \d\.\d\d  DSR \d\.\d\d  trials 2$", printed, re.M), printed
    assert "1 research configuration(s) of BTCLI/USD 1h in the registry + 1 rule(s) in this run" in printed
    assert main(["backtest", "--signals", str(out), "--training-target", training, "--extra-trials", "3"]) == 0
    assert "  trials 5" in capsys.readouterr().out

    # the one-candle mode is still there
    assert main(["backtest", "--signals", str(out), "--hold", "candle", "--training-target", training]) == 0
    candle = capsys.readouterr().out
    assert "re-decided every candle" in candle
    assert main(["backtest", "--signals", str(out), "--hold", "1", "--training-target", training]) == 0
    assert capsys.readouterr().out == candle
    with pytest.raises(SystemExit) as exit_info:
        main(["backtest", "--signals", str(out), "--hold", "24"])
    assert exit_info.value.code == 2 and "expected label, candle or 1" in capsys.readouterr().err
    assert main(["backtest", "--signals", str(out), "--overlap", "stack", "--training-target", training]) == 0
    assert "every signal opens its own sleeve of 1/24 of equity" in capsys.readouterr().out

    # without the registry: refused, unless the trials are given (the file carries its windows and labels)
    nowhere = "127.0.0.1:1"
    assert main(["backtest", "--signals", str(out), "--training-target", nowhere]) == 2
    err = capsys.readouterr().err
    assert "registry (training service at 127.0.0.1:1) cannot be reached" in err and "--trials N" in err
    assert main(["backtest", "--signals", str(out), "--training-target", nowhere, "--trials", "7"]) == 0
    captured = capsys.readouterr()
    assert "  trials 7" in captured.out and "7 as given (--trials)" in captured.out
    assert "cannot be reached" in captured.err
    stripped = tmp_path / "stripped.csv"
    signals.drop(columns=["train_end_ms"]).to_csv(stripped, index=False)
    assert main(["backtest", "--signals", str(stripped), "--training-target", nowhere, "--trials", "7"]) == 2
    assert "to look up train_end_ms" in capsys.readouterr().err

    assert main(["backtest", "--signals", str(tmp_path / "missing.csv")]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["backtest-signals", "--symbol", CLI_SYMBOL, "--timeframe", "1h", "--start", "2019-01-01",
              "--end", "2019-02-01", "--train-window", "30x", "--step", "25d", "--out", str(out)])
    assert exit_info.value.code == 2 and "30x" in capsys.readouterr().err


def test_cli_defaults_compare_the_classes_and_a_rule_that_never_fires_is_reported(tmp_path, capsys):
    from mlsignal.cli import main
    from mlsignal.walkforward import write_signals

    rng = np.random.default_rng(5)
    n = 400
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    sig = labelled(frame(close, rng.uniform(0.2, 0.45, n), ready=np.arange(n) >= 20, down=rng.uniform(0.2, 0.45, n)),
                   24)
    path = write_signals(sig, tmp_path / "signals.csv")

    offline = ["--training-target", "127.0.0.1:1", "--trials", "1"]  # a hand-made file names no model
    assert main(["backtest", "--signals", str(path), *offline]) == 0
    out = capsys.readouterr()
    strategy = next(line for line in out.out.splitlines() if line.startswith("strategy"))
    assert "ML_UP_PROB - ML_DOWN_PROB > 0" in out.out and "never fired" not in out.err
    assert int(strategy.split()[-3]) > 0  # the trades column

    assert main(["backtest", "--signals", str(path), "--up-min", "0.6", "--edge-min", "none", *offline]) == 0
    err = capsys.readouterr().err
    assert "never fired (0 trades)" in err
    assert f"highest ML_UP_PROB in these signals is {sig.ML_UP_PROB.max():.3f}" in err


def test_cli_backtest_accepts_predict_output_and_checks_it_against_the_registry(services, sample_frame, tmp_path,
                                                                                 capsys):
    """`mlsignal predict --csv` writes ML_MODEL_ID but no training window: the backtest looks the model up."""
    from mlsignal.cli import main

    model_id = services.btc_job.model_id  # BTC/USD, trained on 2018
    training = f"127.0.0.1:{services.training.port}"

    from mlsignal.client import TrainingClient

    with TrainingClient(training) as client:
        (info,) = [m for m in client.list_models("BTC/USD", "1h") if m.model_id == model_id]
    history = (info.warmup_bars + 1) * 3_600_000  # the candles before the first ready row

    def predicted(first_ready, end, name):
        rows = sample_frame[(sample_frame.open_time_ms >= ms(first_ready) - history)
                            & (sample_frame.open_time_ms < ms(end))]
        candles = tmp_path / f"{name}-candles.csv"
        pd.DataFrame({
            "timestamp": pd.to_datetime(rows.open_time_ms, unit="ms", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
            **{c: rows[c].to_numpy() for c in ("open", "high", "low", "close", "volume")},
        }).to_csv(candles, index=False)  # fmt: skip
        out = tmp_path / f"{name}-signals.csv"
        assert main(["predict", "--symbol", "BTC/USD", "--timeframe", "1h", "--csv", str(candles), "--out", str(out),
                     "--target", f"127.0.0.1:{services.inference.port}", "--model-id", model_id]) == 0
        capsys.readouterr()
        return out

    after = predicted("2019-02-01", "2019-03-15", "after")
    assert pd.read_csv(after).ML_READY.sum() > 900
    assert main(["backtest", "--signals", str(after), "--training-target", training]) == 0
    printed = capsys.readouterr().out
    assert "each entry held for its model's label" in printed
    assert re.search(r"PSR \d\.\d\d  DSR \d\.\d\d  trials \d+$", printed, re.M), printed

    # candles the model was trained on (2018): refused, though predict marks only some rows in-sample
    inside = predicted("2018-12-20", "2019-01-20", "inside")
    assert main(["backtest", "--signals", str(inside), "--training-target", training]) == 2
    err = capsys.readouterr().err
    assert "ML_IN_SAMPLE" in err or "contains them or ends after them" in err
    no_flag = tmp_path / "no-flag.csv"
    pd.read_csv(inside).drop(columns="ML_IN_SAMPLE").to_csv(no_flag, index=False)
    assert main(["backtest", "--signals", str(no_flag), "--training-target", training]) == 2
    err = capsys.readouterr().err
    assert "contains them or ends after them, the first at 2018-12-" in err
    assert f"trained up to {ms_to_iso(info.train_end.ToMilliseconds())}" in err


def test_cli_volatility_scaled_triple_barrier_signals_carry_their_barrier(services, sample_frame, tmp_path,
                                                                          monkeypatch, capsys):
    """backtest-signals with a volatility-scaled triple barrier writes each row's barrier from the closes before it
    (the history before the period included), and the backtest exits at those barriers."""
    from mlsignal.cli import main
    from mlsignal.walkforward import read_signals
    from shared.labels import LabelSpec, barriers

    symbol = "BTVOL/USD"
    load_market(services.url, sample_frame, symbols=(symbol,))
    monkeypatch.setenv("MLSIGNAL_DATABASE_URL", services.url)
    out = tmp_path / "vol.csv"
    training = f"127.0.0.1:{services.training.port}"
    assert main([
        "backtest-signals", "--symbol", symbol, "--timeframe", "1h", "--start", "2019-01-01", "--end", "2019-01-21",
        "--train-window", "90d", "--step", "20d", "--horizon", "24", "--label", "triple-barrier",
        "--volatility-bars", "48", "--volatility-multiple", "1.0", "--trees", "10", "--seed", "1", "--out", str(out),
        "--training-target", training, "--inference-target", f"127.0.0.1:{services.inference.port}",
    ]) == 0  # fmt: skip
    capsys.readouterr()
    signals = read_signals(out)
    assert signals.ML_LABEL_KIND.eq("triple_barrier").all() and signals.ML_VOLATILITY_BARS.eq(48).all()
    spec = LabelSpec(horizon_bars=24, kind="triple_barrier", volatility_bars=48, volatility_multiple=1.0)
    full = barriers(sample_frame.close.to_numpy(), spec)
    first = int(np.searchsorted(sample_frame.open_time_ms.to_numpy(), signals.open_time_ms.iat[0]))
    assert np.allclose(signals.ML_BARRIER.to_numpy(), full[first:first + len(signals)], rtol=1e-12, atol=0)
    assert np.isfinite(signals.ML_BARRIER).all()  # the first rows too: computed with the history before the period

    assert main(["backtest", "--signals", str(out), "--edge-min", "none", "--training-target", training]) == 0
    printed = capsys.readouterr().out
    assert "triple barrier 24 candles, ±1 x volatility(48) x sqrt(24)" in printed
    exits = re.search(r"^exits      horizon (\d+), up barrier (\d+), down barrier (\d+)", printed, re.M)
    assert exits and int(exits[2]) + int(exits[3]) > 0, printed
