"""`mlsignal predict --csv` reads the layouts `data import` reads (generic CSV and Binance klines), including the
file the README names, and refuses an inconsistent candle by its line in the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mlsignal.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]


def _predict(services, path: Path, out: Path, capsys) -> pd.DataFrame:
    rc = cli_main(["predict", "--symbol", "BTC/USD", "--timeframe", "1h", "--csv", str(path), "--out", str(out),
                   "--target", f"127.0.0.1:{services.inference.port}"])
    err = capsys.readouterr().err
    assert rc == 0, err
    return pd.read_csv(out)


def test_the_shipped_candles_csv_predicts(services, tmp_path, capsys):
    out = _predict(services, REPO / "data" / "candles.csv", tmp_path / "out.csv", capsys)
    assert len(out) == 336 and out["ML_READY"].sum() == 336 - 99
    ready = out[out.ML_READY]
    assert ready["ML_UP_PROB"].nunique() > 100  # probabilities differ from candle to candle
    assert np.allclose(ready[["ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB"]].sum(axis=1), 1.0)


def test_binance_layout_gives_the_csv_layout_answers(services, tmp_path, capsys):
    csv = pd.read_csv(REPO / "data" / "candles.csv")
    ms = pd.to_datetime(csv["timestamp"], utc=True).dt.as_unit("ms").astype("int64")
    kline = pd.DataFrame({
        "open_time": ms, "open": csv.open, "high": csv.high, "low": csv.low, "close": csv.close,
        "volume": csv.volume, "close_time": ms + 3_599_999, "quote": csv.volume * csv.close, "trades": 10,
        "taker_base": 0.0, "taker_quote": 0.0, "ignore": 0,
    })
    path = tmp_path / "BTCUSD-1h.csv"
    kline.to_csv(path, index=False, header=False)
    from_csv = _predict(services, REPO / "data" / "candles.csv", tmp_path / "a.csv", capsys)
    from_kline = _predict(services, path, tmp_path / "b.csv", capsys)
    assert from_kline["timestamp"].tolist() == csv["timestamp"].tolist()
    for col in ("ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB", "ML_READY"):
        assert np.array_equal(from_kline[col].to_numpy(), from_csv[col].to_numpy(), equal_nan=True), col


def test_an_inconsistent_candle_is_refused_by_its_line(services, tmp_path, capsys):
    csv = pd.read_csv(REPO / "data" / "candles.csv").iloc[:150].copy()
    csv.loc[120, "close"] = csv.loc[120, "high"] * 1.01  # close above high
    path = tmp_path / "bad.csv"
    csv.to_csv(path, index=False)
    rc = cli_main(["predict", "--symbol", "BTC/USD", "--timeframe", "1h", "--csv", str(path),
                   "--target", f"127.0.0.1:{services.inference.port}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{path} line 122: high must not be below open or close" in err
