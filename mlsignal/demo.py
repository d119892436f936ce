"""The end-to-end demo behind `make demo`: real data, both services, training, streaming, walk-forward, a chart.

Every step runs the real thing: the services are child processes talking gRPC on free local ports, exactly as an
operator would run them. Any failed step stops the demo with a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.timeframes import ms_to_iso, parse_time

if TYPE_CHECKING:
    import pandas as pd

REPO_DATA = Path(__file__).resolve().parents[1] / "data" / "btcusd_1h_coinbase_2017-2019.csv.gz"
SYMBOL, TIMEFRAME = "BTC/USD", "1h"


class DemoError(Exception):
    """A demo step failed; the message says which and why."""


@dataclass
class DemoOptions:
    var_dir: Path = Path("var")
    train_start: str = "2017-07-01"
    split: str = "2019-01-01"  # first out-of-sample candle
    end: str = "2019-10-01"
    trees: int = 200
    train_window: str = "365d"
    step: str = "30d"
    walk_trees: int = 100
    fit_jobs: int = -1


class ChildService:
    """A service started as `python -m <module>` on a free port; stopped with SIGTERM like an operator would."""

    def __init__(self, name: str, module: str, env: dict[str, str]):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None  # stdout=PIPE
        self.stdout = self.proc.stdout
        self.lines: list[str] = []
        self.port = 0
        deadline = time.monotonic() + 60
        for line in self.stdout:
            self.lines.append(line)
            if "listening on port" in line and line.startswith("mlsignal-"):
                self.port = int(line.split()[-1])
                break
            if time.monotonic() > deadline:
                break
        if not self.port:
            self.proc.kill()
            raise DemoError(f"{name} did not start:\n" + "".join(self.lines[-20:]))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.stdout:
            self.lines.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode


def _say(text: str) -> None:
    print(text, flush=True)


class _Progress:
    """A tqdm bar on a terminal; on a pipe or log file, one line per stage instead of redrawn bars."""

    def __init__(self, total: float, fmt: str):
        from tqdm import tqdm

        self.total = total
        self.tty = sys.stdout.isatty()
        self._desc: str | None = None
        self.bar = tqdm(total=total, bar_format=fmt, file=sys.stdout) if self.tty else None

    def update_to(self, n: float, desc: str) -> None:
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.n = n
            self.bar.set_description_str(desc)
            self.bar.refresh()
        elif desc != self._desc:
            _say(f"      {desc} ({n:.0f}/{self.total:.0f})")
        self._desc = desc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def run_demo(opts: DemoOptions) -> dict:
    """Run every step; returns a summary (paths, model id, metrics). Raises DemoError on failure."""
    import numpy as np
    import pandas as pd

    from mlsignal.client import InferenceClient, TrainingClient
    from shared.store.db import make_engine
    from shared.store.importers import read_candles
    from shared.store.marketdata import insert_candles, load_candles
    from shared.store.migrate import upgrade

    var = opts.var_dir.resolve()
    var.mkdir(parents=True, exist_ok=True)
    url = os.environ.get("MLSIGNAL_DATABASE_URL") or f"sqlite:///{var / 'mlsignal.db'}"
    model_dir = Path(os.environ.get("MLSIGNAL_MODEL_DIR") or var / "models")
    split_ms, end_ms = parse_time(opts.split), parse_time(opts.end)
    if not parse_time(opts.train_start) < split_ms < end_ms:
        raise DemoError(f"expected train start < split < end, got {opts.train_start}, {opts.split}, {opts.end}")

    _say(f"[1/8] database: {url}")
    upgrade(url)
    engine = make_engine(url)
    _say(f"[2/8] importing the bundled sample {REPO_DATA.name} as {SYMBOL} {TIMEFRAME}")
    added, dupes = insert_candles(engine, SYMBOL, TIMEFRAME, read_candles(REPO_DATA, TIMEFRAME))
    _say(f"      {added} rows added, {dupes} already stored")
    candles = load_candles(engine, SYMBOL, TIMEFRAME)
    engine.dispose()

    env = {**os.environ, "MLSIGNAL_DATABASE_URL": url, "MLSIGNAL_MODEL_DIR": str(model_dir),
           "MLSIGNAL_TRAINING_ADDR": "127.0.0.1:0", "MLSIGNAL_INFERENCE_ADDR": "127.0.0.1:0",
           "MLSIGNAL_TRAINING_FIT_JOBS": str(opts.fit_jobs), "MLSIGNAL_LOG_LEVEL": "WARNING"}
    _say("[3/8] starting mlsignal-training and mlsignal-inference")
    services: list[ChildService] = []
    summary: dict = {}
    try:
        training = ChildService("mlsignal-training", "training_service.server", env)
        services.append(training)
        inference = ChildService("mlsignal-inference", "inference_service.server", env)
        services.append(inference)
        _say(f"      training on {training.target}, inference on {inference.target}")

        from shared.settings import client_security

        security = client_security()
        with TrainingClient(training.target, **security) as tc, InferenceClient(inference.target, **security) as ic:
            _say(f"[4/8] training {SYMBOL} {TIMEFRAME} on {opts.train_start} .. {opts.split} ({opts.trees} trees)")
            handle = tc.train(SYMBOL, TIMEFRAME, opts.train_start, opts.split, n_estimators=opts.trees)
            with _Progress(100, "      {desc:<12} {bar} {n:.0f}%") as bar:
                job = handle.wait(on_progress=lambda j: bar.update_to(j.progress * 100, j.stage))
            m = job.metrics
            summary.update(model_id=job.model_id, metrics=dict(m))
            _say(f"      model {job.model_id}")
            _say(f"      out-of-sample log loss {m['log_loss']:.4f} vs class prior {m['prior_log_loss']:.4f} "
                 f"(ratio {m['log_loss_ratio']:.4f}); Brier {m['brier']:.4f} vs {m['prior_brier']:.4f}")
            if m.get("cv_folds"):
                _say(f"      purged {int(m['cv_folds'])}-fold cross-validation: log-loss ratio "
                     f"{m['cv_log_loss_ratio_mean']:.4f} ± {m['cv_log_loss_ratio_std']:.4f}")
            report = _write_report(tc, job.model_id, opts.var_dir)
            summary["report"] = report
            _say(f"      evaluation report -> {report} (mlsignal report {job.model_id} --out DIR)")

            _say(f"[5/8] streaming {opts.split} .. {opts.end} through StreamPredict, one candle per message")
            info = ic.get_model(SYMBOL, TIMEFRAME)
            first = int(np.searchsorted(candles.open_time_ms.to_numpy(), split_ms))
            live = candles.iloc[max(0, first - info.warmup_bars + 1):]
            live = live[live.open_time_ms < end_ms]
            t0 = time.perf_counter()
            rows = [p for p in ic.stream(live.itertuples(index=False), SYMBOL, TIMEFRAME)]
            secs = time.perf_counter() - t0
            streamed = pd.DataFrame([dataclasses.asdict(p) for p in rows])
            streamed = streamed[streamed.open_time_ms >= split_ms]
            if not streamed.ready.all():
                raise DemoError("streamed predictions after the warm-up are not all ready")
            _say(f"      {len(rows)} candles in {secs:.1f}s ({len(rows) / secs:,.0f} candles/s, "
                 f"{secs / len(rows) * 1e3:.2f} ms per round trip)")
            _print_table(streamed)
            summary["streamed"] = streamed

            walk = _walk_forward_step(opts, tc, ic, candles, split_ms, end_ms)
            summary.update(walk)
    finally:
        _say("[8/8] stopping the services (SIGTERM)")
        codes = [s.stop() for s in services]
        for s, code in zip(services, codes, strict=True):
            if code != 0:
                raise DemoError(f"{s.name} exited with code {code}:\n" + "".join(s.lines[-20:]))
    return summary


def _write_report(tc, model_id: str, out_dir: Path) -> Path:
    """The model's evaluation report, from its ModelInfo as the training service lists it."""
    from mlsignal.report import find_model, write_report

    info = find_model(tc.list_models(SYMBOL, TIMEFRAME), model_id)
    if info is None:
        raise DemoError(f"the training service does not list model {model_id}")
    return write_report(info, out_dir)


def _print_table(streamed: pd.DataFrame, rows: int = 8) -> None:
    import numpy as np

    pick = streamed.iloc[np.linspace(0, len(streamed) - 1, rows).astype(int)]
    _say(f"      {'open time (UTC)':<22}{'ML_UP_PROB':>11}{'ML_DOWN_PROB':>13}{'ML_RANGE_PROB':>14}")
    columns = [pick[c].to_numpy() for c in ("open_time_ms", "up", "down", "range")]
    for t, up, down, rng in zip(*columns, strict=True):
        _say(f"      {ms_to_iso(int(t)):<22}{up:>11.4f}{down:>13.4f}{rng:>14.4f}")


def _walk_forward_step(opts, tc, ic, candles, split_ms, end_ms) -> dict:
    """Walk-forward out-of-sample signals, the strategy report and the chart."""
    from mlsignal.backtest import StrategyRule, count_trials, format_report, run_backtest
    from mlsignal.walkforward import walk_forward, write_signals
    from shared.timeframes import parse_duration

    _say(f"[6/8] walk-forward over {opts.split} .. {opts.end}: train window {opts.train_window}, "
         f"step {opts.step}, {opts.walk_trees} trees per model")
    with _Progress(1, "      {desc:<10} {bar} {n:.0f}/{total:.0f} models") as bar:
        def progress(done, total, message):
            bar.total = total
            bar.update_to(done, "training" if done < total else "done")

        signals = walk_forward(tc, ic, candles, SYMBOL, TIMEFRAME, split_ms, end_ms,
                               parse_duration(opts.train_window), parse_duration(opts.step),
                               n_estimators=opts.walk_trees, on_progress=progress)
    out = opts.var_dir / "walkforward_signals.csv"
    write_signals(signals, out)
    _say(f"      {len(signals)} out-of-sample rows from {signals.ML_MODEL_ID.nunique()} models -> {out}")

    # Fixed before the walk-forward ran, never tuned on it: enter when up is more likely than down and RSI < 70,
    # and hold each entry for the question the model answers (its label: 24 candles by default).
    rule = StrategyRule(up_min=None, edge_min=0.0, rsi_max=70.0)
    _say(f"[7/8] strategy: long when {rule.describe()}; each entry held for its model's label horizon "
         f"({int(signals.ML_HORIZON_BARS.iloc[0])} candles), fees 10 bps per side, funding where the data has it")
    _say(f"      (thresholds fixed in advance; up to {signals.ML_UP_PROB.max():.2f} for ML_UP_PROB in this period, "
         "so an absolute 0.6 rule would never trade)")
    trials = count_trials(tc.list_models(SYMBOL, TIMEFRAME), signals.ML_MODEL_ID.unique().tolist(), rules=1)
    results = run_backtest(signals, rule, fee_bps=10.0, delay_bars=1, hold="label", overlap="ignore", trials=trials)
    for line in format_report(results).splitlines():
        _say("      " + line)
    candle = run_backtest(signals, rule, fee_bps=10.0, delay_bars=1, hold="candle", trials=trials).strategy
    _say(f"      for comparison, re-deciding every candle (hold one candle, the label ignored): "
         f"{candle.total_return * 100:+.1f} % in {candle.trades} trades")
    chart = opts.var_dir / "demo.png"
    write_chart(signals, results, chart)
    _say(f"      chart -> {chart}")
    return {"signals": signals, "backtest": results, "chart": chart}


def write_chart(signals: pd.DataFrame, results, path: Path) -> None:
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = pd.to_datetime(signals.open_time_ms, unit="ms", utc=True)
    fig, axes = plt.subplots(3, 1, figsize=(12, 9), sharex=True, gridspec_kw={"height_ratios": [2, 1.3, 1.5]})
    axes[0].plot(t, signals.close, color="black", lw=0.8)
    axes[0].set_ylabel("BTC/USD close")
    axes[0].set_title("mlsignal walk-forward: out-of-sample ML probabilities and strategy equity")
    for col, colour in (("ML_UP_PROB", "tab:green"), ("ML_DOWN_PROB", "tab:red"), ("ML_RANGE_PROB", "tab:grey")):
        axes[1].plot(t, signals[col], color=colour, lw=0.6, label=col)
    axes[1].set_ylabel("probability")
    axes[1].set_ylim(0, 1)
    axes[1].legend(loc="upper left", ncol=3, fontsize=8)
    for res in results.rows:
        axes[2].plot(res.equity.index, res.equity.to_numpy(), lw=1, label=res.name)
    axes[2].set_ylabel("equity (start = 1)")
    axes[2].legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
