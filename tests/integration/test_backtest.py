"""The long/flat backtest on hand-made signals with known answers, and the backtest CLI on the real services."""

from __future__ import annotations

import math

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
from shared.features import FeatureSpec, compute_features, rsi

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


def run_candle(signals, rule=StrategyRule(), **kwargs):
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
# CLI on the real services

CLI_SYMBOL = "BTCLI/USD"


def test_cli_backtest_signals_writes_the_file_and_backtest_prints_the_table(services, sample_frame, tmp_path,
                                                                            monkeypatch, capsys):
    from mlsignal.cli import main
    from mlsignal.walkforward import read_signals
    from shared.store.db import make_engine
    from shared.store.marketdata import insert_candles

    engine = make_engine(services.url)
    try:
        insert_candles(engine, CLI_SYMBOL, "1h", sample_frame)
    finally:
        engine.dispose()
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

    code = main(["backtest", "--signals", str(out), "--up-min", "0.4", "--rsi-max", "70", "--fee-bps", "10",
                 "--delay", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    rows = [line for line in printed.splitlines() if line.startswith(("strategy", "rsi only", "buy and hold"))]
    assert [r.split("  ")[0].strip() for r in rows] == ["strategy", "rsi only", "buy and hold"]
    bh = rows[2].split()
    close = signals.close.to_numpy()
    assert bh[3] == f"{(close[-1] / close[0] - 1) * 100:.2f}%"

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
    sig = frame(close, rng.uniform(0.2, 0.45, n), ready=np.arange(n) >= 20, down=rng.uniform(0.2, 0.45, n))
    path = write_signals(sig, tmp_path / "signals.csv")

    assert main(["backtest", "--signals", str(path)]) == 0
    out = capsys.readouterr()
    strategy = next(line for line in out.out.splitlines() if line.startswith("strategy"))
    assert "ML_UP_PROB - ML_DOWN_PROB > 0" in out.out and "never fired" not in out.err
    assert int(strategy.split()[-3]) > 0  # the trades column

    assert main(["backtest", "--signals", str(path), "--up-min", "0.6", "--edge-min", "none"]) == 0
    err = capsys.readouterr().err
    assert "never fired (0 trades)" in err
    assert f"highest ML_UP_PROB in these signals is {sig.ML_UP_PROB.max():.3f}" in err
