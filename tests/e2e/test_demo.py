"""`mlsignal demo` end to end on a shortened window: real child services, real data, a chart on disk."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_runs_end_to_end_and_writes_the_chart(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSIGNAL_")}
    proc = subprocess.run(
        [sys.executable, "-m", "mlsignal.cli", "demo", "--var-dir", str(tmp_path / "var"),
         "--train-start", "2018-03-01", "--split", "2019-01-01", "--end", "2019-02-15",
         "--trees", "30", "--walk-trees", "20", "--train-window", "120d", "--step", "30d"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for step in range(1, 9):
        assert f"[{step}/8]" in out
    assert "vs class prior" in out and "ML_UP_PROB" in out
    assert "buy and hold" in out and "rsi only" in out
    # label-consistent execution, PSR / DSR / trials as tokens, and a plain verdict
    assert "each entry held for its model's label (fixed horizon 24 candles, ±2 %)" in out
    stats = re.search(r"^ +strategy   sharpe \S+  PSR (\d\.\d\d)  DSR (\d\.\d\d)  trials (\d+)$", out, re.M)
    assert stats, out
    psr, dsr, trials = float(stats[1]), float(stats[2]), int(stats[3])
    assert 0 <= dsr <= psr <= 1
    assert trials == 2  # the walk-forward models share one research configuration, plus the rule
    assert "1 research configuration(s) of BTC/USD 1h in the registry + 1 rule(s) in this run" in out
    verdict = re.search(r"^ +verdict    The (signal (lost to|beat) buy-and-hold|rule never traded)", out, re.M)
    assert verdict, out
    assert re.search(r"re-deciding every candle .*: [+-]\d+\.\d % in \d+ trades", out)
    assert "demo finished" in out
    chart = tmp_path / "var" / "demo.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 20_000
    signals = (tmp_path / "var" / "walkforward_signals.csv").read_text().splitlines()
    assert len(signals) > 1000


def test_demo_fails_loudly(tmp_path):
    """A step that cannot work (an end before the split: nothing to stream) exits non-zero with a reason."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSIGNAL_")}
    proc = subprocess.run(
        [sys.executable, "-m", "mlsignal.cli", "demo", "--var-dir", str(tmp_path / "var"),
         "--train-start", "2018-03-01", "--split", "2019-01-01", "--end", "2018-12-01", "--trees", "10"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert "demo failed" in proc.stderr
