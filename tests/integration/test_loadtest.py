"""The load generator against the real services: counts, errors by status, percentiles, open loop, the CLI.

Timings are benchmark figures (bench/inference.py), never assertions here: these tests check what was sent and counted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mlsignal.cli import main as cli_main
from mlsignal.loadtest import (
    LoadTestConfig,
    LoadTestError,
    latency_histogram,
    parse_seconds,
    run_loadtest,
)
from mlsignal.v1 import inference_pb2

SAMPLE_CSV = Path(__file__).resolve().parents[2] / "data" / "btcusd_1h_coinbase_2017-2019.csv.gz"


def target(services) -> str:
    return f"127.0.0.1:{services.inference.port}"


def config(services, rpc: str, **kw) -> LoadTestConfig:
    kw.setdefault("requests", 30)
    kw.setdefault("concurrency", 2)
    return LoadTestConfig(target(services), rpc, "BTC/USD", "1h", **kw)


def warmup_bars(services) -> int:
    info = services.infer_stub.GetModel(inference_pb2.GetModelRequest(symbol="BTC/USD", timeframe="1h"))
    return info.warmup_bars


def check_consistent(r, expected_requests: int) -> None:
    assert r.requests == expected_requests
    assert r.ok == expected_requests
    assert r.errors == {}
    assert len(r.latencies_s) == r.ok
    L = r.latency_ms
    assert L["min"] <= L["p50"] <= L["p90"] <= L["p95"] <= L["p99"] <= L["max"]
    assert L["min"] > 0
    assert sum(c for _, _, c in r.histogram) == r.ok
    assert r.elapsed_s > 0
    assert r.requests_per_s == pytest.approx(r.requests / r.elapsed_s)
    assert r.candles_per_s == pytest.approx(r.requests_per_s * r.batch)


@pytest.mark.parametrize(
    "rpc, batch",
    [("Health", 1), ("Predict", 1), ("Predict", 64), ("StreamPredict", 1), ("StreamPredict", 5)],
)
def test_closed_loop_counts_and_percentiles(services, sample_frame, rpc, batch):
    r = run_loadtest(config(services, rpc, batch=batch), sample_frame if rpc != "Health" else None)
    check_consistent(r, 30)
    assert r.mode == "closed" and r.concurrency == 2 and r.warmup_requests == 0
    if rpc == "Health":
        assert r.batch == 0 and r.candles_per_s == 0 and r.history == 0
    else:
        assert r.batch == batch
        assert r.history == warmup_bars(services) - 1  # enough history that every measured candle is ready
        assert r.model_ids and all(m.startswith("BTC-USD_1h_") for m in r.model_ids)
    if rpc == "StreamPredict":
        assert r.streams_opened == 2


def test_streams_reopen_at_the_end_of_the_data(services, sample_frame):
    w = warmup_bars(services)
    short = sample_frame.iloc[: w + 20]  # 21 one-candle messages per stream after its warm-up
    r = run_loadtest(config(services, "StreamPredict", requests=70, concurrency=1), short)
    check_consistent(r, 70)
    assert r.streams_opened >= 4


def test_explicit_history_and_warmup_time(services, sample_frame):
    r = run_loadtest(config(services, "Predict", batch=16, history=0, duration=0.3, requests=None,
                            warmup=0.1), sample_frame)
    assert r.history == 0 and r.errors == {} and r.ok == r.requests > 0
    assert r.candles_per_s == pytest.approx(r.requests_per_s * 16)


def test_open_loop_sends_the_scheduled_number(services, sample_frame):
    r = run_loadtest(config(services, "Predict", batch=8, rate=50, duration=1.0, requests=None), sample_frame)
    check_consistent(r, 50)  # slots scheduled at 0, 20, ..., 980 ms
    assert r.mode == "open" and r.rate == 50
    assert r.late_sends >= 0 and r.max_send_lag_ms >= 0

    w = run_loadtest(config(services, "Health", rate=50, warmup=0.2, requests=20), None)
    check_consistent(w, 20)
    assert w.warmup_requests == 10  # the slots scheduled in the first 0.2 s


@pytest.mark.parametrize("rpc", ["Predict", "StreamPredict"])
def test_unknown_symbol_counts_not_found(services, sample_frame, rpc):
    cfg = LoadTestConfig(target(services), rpc, "NOPE/USD", "1h", batch=4, requests=30, concurrency=2)
    r = run_loadtest(cfg, sample_frame)
    assert r.requests == 30 and r.ok == 0
    assert r.errors == {"NOT_FOUND": 30}
    assert "NOPE/USD" in r.error_examples["NOT_FOUND"]
    assert r.latency_ms["p50"] is None and r.histogram == [] and r.candles_per_s == 0
    assert any("GetModel" in note for note in r.notes)
    json.dumps(r.to_dict())  # still reportable


def test_too_few_candles_and_bad_config_are_refused(services, sample_frame):
    with pytest.raises(LoadTestError, match="too few"):
        run_loadtest(config(services, "Predict", batch=64), sample_frame.iloc[:100])
    with pytest.raises(LoadTestError, match="exactly one"):
        run_loadtest(config(services, "Health", duration=1.0), None)
    with pytest.raises(LoadTestError, match="rpc"):
        run_loadtest(config(services, "Check"), None)


def test_frames_are_converted_like_the_client_does_before_connecting(sample_frame):
    """A frame the client would refuse is refused here too, before any connection (the target is unreachable)."""
    cfg = LoadTestConfig("127.0.0.1:1", "Predict", "BTC/USD", "1h", requests=1)
    with pytest.raises(LoadTestError, match="candles: missing column"):
        run_loadtest(cfg, sample_frame.drop(columns="volume"))
    with pytest.raises(LoadTestError, match="candles: no candle times"):
        run_loadtest(cfg, sample_frame.drop(columns="open_time_ms"))
    with pytest.raises(LoadTestError, match="epoch seconds"):
        run_loadtest(cfg, sample_frame.assign(open_time_ms=sample_frame.open_time_ms // 1000))


def test_cli_json_from_the_database(services, monkeypatch, capsys):
    monkeypatch.setenv("MLSIGNAL_DATABASE_URL", services.url)
    code = cli_main(["loadtest", "--target", target(services), "--rpc", "Predict", "--symbol", "BTC/USD",
                     "--timeframe", "1h", "--batch", "64", "--concurrency", "2", "--requests", "20", "--warmup", "0",
                     "--json"])
    out = capsys.readouterr().out
    assert code == 0
    d = json.loads(out)
    assert d["rpc"] == "Predict" and d["requests"] == 20 and d["ok"] == 20 and d["errors"] == {}
    assert d["batch"] == 64 and d["mode"] == "closed"
    assert d["candles_per_s"] == pytest.approx(d["requests_per_s"] * 64)
    assert set(d["latency_ms"]) == {"min", "mean", "p50", "p90", "p95", "p99", "max"}
    assert sum(b["count"] for b in d["histogram"]) == 20


def test_cli_csv_stream_and_text_report(services, capsys):
    code = cli_main(["loadtest", "--target", target(services), "--rpc", "streampredict", "--symbol", "BTC/USD",
                     "--timeframe", "1h", "--csv", str(SAMPLE_CSV), "--requests", "25", "--warmup", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "StreamPredict BTC/USD 1h" in out and "requests    25 " in out and "histogram (ms)" in out


def test_cli_exit_status_on_failed_requests_and_missing_candles(services, monkeypatch, capsys):
    code = cli_main(["loadtest", "--target", target(services), "--symbol", "NOPE/USD", "--timeframe", "1h",
                     "--csv", str(SAMPLE_CSV), "--requests", "5", "--warmup", "0", "--json"])
    assert code == 1
    assert json.loads(capsys.readouterr().out)["errors"] == {"NOT_FOUND": 5}

    monkeypatch.setenv("MLSIGNAL_DATABASE_URL", services.url)
    code = cli_main(["loadtest", "--target", target(services), "--symbol", "NOPE/USD", "--timeframe", "1h",
                     "--requests", "5"])
    assert code == 2
    assert "no NOPE/USD 1h candles" in capsys.readouterr().err


def test_parse_seconds():
    assert parse_seconds("30s") == 30
    assert parse_seconds("500ms") == pytest.approx(0.5)
    assert parse_seconds("2m") == 120
    assert parse_seconds("1.5") == 1.5
    with pytest.raises(ValueError):
        parse_seconds("soon")


def test_histogram_is_log_spaced_and_complete():
    lat = np.array([0.05, 0.2, 0.21, 1.0, 3.0, 47.0])
    h = latency_histogram(lat)
    assert sum(c for _, _, c in h) == len(lat)
    assert h[0][0] <= lat.min() and h[-1][1] > lat.max()
    ratios = {round(math.log10(b / a), 9) for a, b, _ in h}
    assert ratios == {0.2}
    assert all(h[i][1] == pytest.approx(h[i + 1][0]) for i in range(len(h) - 1))
    assert latency_histogram(np.empty(0)) == []
