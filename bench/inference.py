"""Inference latency and throughput against the DESIGN performance targets, in one run on this machine.

    .venv/bin/python -m bench.inference [--quick] [--out bench/results/inference.json]     (or: make bench)

What it does:

1. imports the bundled BTC/USD 1h sample into a temporary SQLite database;
2. starts the real training and inference services in this process on 127.0.0.1:0;
3. trains a model with the default parameters on 2017-07-01 .. 2019-01-01 (200 trees; 40 with --quick) and reports
   the training time from the job's started_at / finished_at;
4. measures with `mlsignal.loadtest`, closed loop, in a separate client process (a strategy engine is another process;
   a client in the server's own process would share its GIL and disturb both sides), one worker for latency:
   the floor (a grpc.health.v1 Check), StreamPredict with one new candle per message, and Predict with 1, 64 and
   1,024 candles (each request also carries warmup_bars - 1 candles of history, so every counted candle is ready);
   and the 1,024-candle Predict again with 4 workers for throughput;
5. measures the naive baseline the original system used, in process and without gRPC: for every new candle, the
   pandas features of the last warmup_bars + 1 candles (`shared.features.compute_features`) and the scikit-learn
   forest's `predict_proba` (the model's joblib artifact, loaded only after its sha256 verifies);
6. measures model execution (`bench.forest_runtime`) on the served model: the native forest runtime the server uses
   (MLSIGNAL_FOREST_RUNTIME=auto) against ONNX Runtime, on 1 and 1,024 rows, one caller and two concurrent callers,
   in alternating rounds; then the columnar Predict cases again on a second inference server with
   MLSIGNAL_FOREST_RUNTIME=onnx (the fallback), and where the time of a columnar Predict goes, stage by stage;
7. prints a table (p50 and p99 latency, requests/s, candles/s, p50 relative to the floor, candles/s relative to the
   naive baseline) with PASS/FAIL against the DESIGN targets, and writes everything as JSON.

Timings depend on the machine and on whatever else runs on it; the load average is recorded next to the results.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "btcusd_1h_coinbase_2017-2019.csv.gz"
DEFAULT_OUT = REPO / "bench" / "results" / "inference.json"
SYMBOL, TIMEFRAME = "BTC/USD", "1h"
TRAIN_START, TRAIN_END = "2017-07-01", "2019-01-01"
NAIVE_FROM = "2019-01-01"  # the naive baseline predicts candles after the training window

STREAM_TARGET_RATIO = 1.5  # one-candle StreamPredict p50 <= 1.5 x the floor
SHADOW_TARGET_RATIO = 1.1  # the same with one shadow model in the market <= 1.1 x without
BATCH_TARGET_CPS = 100_000  # 1,024-candle Predict >= 100,000 candles/s
COLUMNS_TARGET_CPS = 300_000  # 1,024-candle Predict as columns >= 300,000 candles/s
RUNTIME_TARGET_RATIO = 3.0  # the forest runtime >= 3x ONNX Runtime on 1,024 rows, and no slower on 1 row


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    rpc: str
    batch: int
    concurrency: int
    columns: bool = False


CASES = (
    Case("floor", "floor: grpc.health.v1 Check", "Health", 1, 1),
    Case("stream_1", "StreamPredict, 1 candle per message", "StreamPredict", 1, 1),
    Case("predict_1", "Predict, 1 candle", "Predict", 1, 1),
    Case("predict_64", "Predict, 64 candles", "Predict", 64, 1),
    Case("predict_1024", "Predict, 1,024 candles", "Predict", 1024, 1),
    Case("predict_1024_c4", "Predict, 1,024 candles, 4 concurrent", "Predict", 1024, 4),
    Case("columns_1024", "Predict, 1,024 candles as columns", "Predict", 1024, 1, columns=True),
    Case("columns_1024_c4", "Predict, 1,024 candles as columns, 4 concurrent", "Predict", 1024, 4, columns=True),
)
# Measured after CASES, alternately with and without a SHADOW model in the market, pairs of runs in turn.
SHADOW_CASES = (
    Case("stream_1_shadow", "StreamPredict, 1 candle per message, one shadow model", "StreamPredict", 1, 1),
    Case("stream_1_no_shadow", "StreamPredict, 1 candle per message, the same run without it", "StreamPredict", 1, 1),
)
SHADOW_ROUNDS = 3
# Then alternately with the model serving as trained and a copy of it without the out-of-distribution score.
OOD_CASES = (
    Case("stream_1_ood", "StreamPredict, 1 candle per message, with the OOD score", "StreamPredict", 1, 1),
    Case("stream_1_no_ood", "StreamPredict, 1 candle per message, the same model without it", "StreamPredict", 1, 1),
)
OOD_TARGET_RATIO = 1.1  # the score stays inside the one-candle budget
# Measured again on an inference server that executes forests with ONNX Runtime (MLSIGNAL_FOREST_RUNTIME=onnx).
ONNX_CASES = (
    Case("columns_1024_onnx", "Predict, 1,024 candles as columns, ONNX Runtime server", "Predict", 1024, 1,
         columns=True),
    Case("columns_1024_c4_onnx", "Predict, 1,024 candles as columns, 4 concurrent, ONNX Runtime server", "Predict",
         1024, 4, columns=True),
)


@dataclass(frozen=True)
class Plan:
    trees: int
    warmup_s: float
    duration_s: float
    naive_candles: int


FULL = Plan(trees=200, warmup_s=2.0, duration_s=10.0, naive_candles=1000)
QUICK = Plan(trees=40, warmup_s=0.5, duration_s=2.0, naive_candles=200)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict:
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


# ----------------------------------------------------------------------------------------------------------------------
# set-up


def prepare_database(url: str) -> pd.DataFrame:
    from shared.store.db import make_engine
    from shared.store.importers import read_candles
    from shared.store.marketdata import insert_candles
    from shared.store.migrate import upgrade

    frame = read_candles(SAMPLE, TIMEFRAME)
    upgrade(url)
    engine = make_engine(url)
    try:
        insert_candles(engine, SYMBOL, TIMEFRAME, frame)
    finally:
        engine.dispose()
    return frame


def train_model(training_port: int, trees: int):
    """Train through the service; returns the final TrainingJob and its wall time from started_at to finished_at."""
    from mlsignal.client import TrainingClient

    with TrainingClient(f"127.0.0.1:{training_port}", timeout=60) as client:
        job = client.train(SYMBOL, TIMEFRAME, TRAIN_START, TRAIN_END,
                           n_estimators=0 if trees == 200 else trees).wait()
    seconds = (job.finished_at.ToNanoseconds() - job.started_at.ToNanoseconds()) / 1e9
    return job, seconds


# ----------------------------------------------------------------------------------------------------------------------
# measurements


def naive_baseline(frame: pd.DataFrame, record, model_dir: Path, n: int) -> dict:
    """Per-candle latency of pandas features over the history window plus sklearn predict_proba, in process."""
    import joblib

    from shared.artifacts import read_verified
    from shared.features import compute_features

    forest = joblib.load(io.BytesIO(read_verified(model_dir, record.sklearn_artifact, record.sklearn_sha256)))
    spec = record.feature_spec
    window = record.warmup_bars + 1
    df = frame.set_index(pd.to_datetime(frame["open_time_ms"], unit="ms", utc=True))[
        ["open", "high", "low", "close", "volume"]]
    first = int(np.searchsorted(frame["open_time_ms"].to_numpy(),
                                pd.Timestamp(NAIVE_FROM, tz="UTC").value // 1_000_000))
    first = max(first, window)
    warm = 20
    lat = np.empty(n)
    clock = time.perf_counter
    for j in range(-warm, n):
        i = first + warm + j
        t0 = clock()
        X = compute_features(df.iloc[i + 1 - window:i + 1], spec).to_numpy()[-1:]
        proba = forest.predict_proba(X.astype(np.float32))
        t1 = clock()
        if j >= 0:
            lat[j] = t1 - t0
    assert proba.shape == (1, len(record.classes)) and np.isfinite(proba).all()
    ms = lat * 1000
    p50, p99 = np.percentile(ms, [50, 99])
    cps = n / lat.sum()
    return {
        "label": "naive in process: pandas features + sklearn predict_proba",
        "candles": n,
        "window": window,
        "trees": len(forest.estimators_),
        "n_jobs": forest.n_jobs,
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "max_ms": float(ms.max()),
        "mean_ms": float(ms.mean()),
        "requests_per_s": float(cps),
        "candles_per_s": float(cps),
    }


def run_cases(target: str, frame: pd.DataFrame, plan: Plan, in_process: bool, log,
              shadow: tuple[Any, Path] | None = None, cases: tuple[Case, ...] = CASES) -> dict:
    """Every case of CASES; with `shadow` (the served model's record and the model directory), then SHADOW_ROUNDS
    pairs of the one-candle stream with and without a shadow model registered for the market (the p50 of a
    pair's runs are compared, so a change of the machine's load between rounds cancels out)."""
    from mlsignal.loadtest import LoadTestConfig, run_loadtest

    results = {}
    pool = None if in_process else ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def run(case: Case):
        cfg = LoadTestConfig(target, case.rpc, SYMBOL, TIMEFRAME, batch=case.batch, concurrency=case.concurrency,
                             duration=plan.duration_s, warmup=plan.warmup_s, columns=case.columns)
        log(f"  {case.label} ...")
        r = run_loadtest(cfg, frame) if pool is None else pool.submit(run_loadtest, cfg, frame).result()
        if r.errors:
            raise RuntimeError(f"{case.label}: requests failed: {r.errors} {r.error_examples}")
        return r

    try:
        if pool is not None:
            pool.submit(_client_ready).result()  # import everything in the client before the first case
        for case in cases:
            results[case.key] = run(case)
        if shadow is not None:
            record, model_dir = shadow
            with_shadow, without = [], []
            for _ in range(SHADOW_ROUNDS):
                shadow_id = register_shadow(record, model_dir)
                time.sleep(SHADOW_SETTLE_S)  # inference sees the shadow within its poll interval
                with_shadow.append(run(SHADOW_CASES[0]))
                retire_shadow(record, shadow_id)
                time.sleep(SHADOW_SETTLE_S)
                without.append(run(SHADOW_CASES[1]))
            results["shadow_rounds"] = list(zip(with_shadow, without, strict=True))
            results[SHADOW_CASES[0].key] = min(with_shadow, key=lambda r: r.latency_ms["p50"])
            results[SHADOW_CASES[1].key] = min(without, key=lambda r: r.latency_ms["p50"])
            with_ood, without_ood = [], []
            plain_id = register_copy_without_ood(record, model_dir)
            for _ in range(SHADOW_ROUNDS):
                serve(record, plain_id)
                time.sleep(SHADOW_SETTLE_S)
                without_ood.append(run(OOD_CASES[1]))
                serve(record, record.model_id)
                time.sleep(SHADOW_SETTLE_S)
                with_ood.append(run(OOD_CASES[0]))
            results["ood_rounds"] = list(zip(with_ood, without_ood, strict=True))
            results[OOD_CASES[0].key] = min(with_ood, key=lambda r: r.latency_ms["p50"])
            results[OOD_CASES[1].key] = min(without_ood, key=lambda r: r.latency_ms["p50"])
    finally:
        if pool is not None:
            pool.shutdown()
    return results


SHADOW_SETTLE_S = 5.0  # > 2 x MLSIGNAL_MODEL_POLL_SECONDS (2)


def register_copy(record, model_dir: Path, prefix: str, **changes) -> str:
    """A copy of the served model with its own id and ONNX file, registered with `changes` (stage, ...)."""
    import shutil
    import uuid
    from dataclasses import replace

    from shared.store.db import make_engine
    from shared.store.registry import insert_model

    copy_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
    shutil.copyfile(model_dir / record.artifact, model_dir / f"{copy_id}.onnx")
    engine = make_engine(record_url(record))
    try:
        with engine.begin() as conn:
            insert_model(conn, replace(record, model_id=copy_id, artifact=f"{copy_id}.onnx",
                                       created_at_ms=int(time.time() * 1000), **changes))
    finally:
        engine.dispose()
    return copy_id


def register_shadow(record, model_dir: Path) -> str:
    """A copy of the served model registered as a SHADOW of its market."""
    from shared.store.registry import SHADOW

    return register_copy(record, model_dir, "shadow", stage=SHADOW, stage_reason="benchmark shadow")


def register_copy_without_ood(record, model_dir: Path) -> str:
    """A copy of the served model without the out-of-distribution score, RETIRED."""
    from shared.store.registry import RETIRED

    return register_copy(record, model_dir, "plain", stage=RETIRED, ood=None, stage_reason="benchmark: no OOD score")


def serve(record, model_id: str) -> None:
    from shared.store.db import make_engine
    from shared.store.registry import promote

    engine = make_engine(record_url(record))
    try:
        promote(engine, model_id, "benchmark round")
    finally:
        engine.dispose()


def retire_shadow(record, shadow_id: str) -> None:
    from shared.store.db import make_engine
    from shared.store.registry import settle_shadow

    engine = make_engine(record_url(record))
    try:
        if not settle_shadow(engine, shadow_id, record.model_id, promote_it=False, reason="benchmark round over"):
            raise RuntimeError(f"{shadow_id} is no longer a shadow of {record.model_id}")
    finally:
        engine.dispose()


_URLS: dict[str, str] = {}


def record_url(record) -> str:
    return _URLS[record.model_id]


def _client_ready() -> bool:
    import mlsignal.loadtest  # noqa: F401

    return True


def model_execution(record, model_dir: Path, frame: pd.DataFrame, quick: bool) -> dict:
    """The served model on both runtimes, in process: `bench.forest_runtime.compare_runtimes` on feature rows after
    the training window, and the stages of a columnar Predict (`columnar_breakdown`)."""
    import joblib

    from bench import forest_runtime as fr
    from inference_service.model_store import load_model
    from shared.artifacts import read_verified
    from shared.features import compute_features

    models = {name: load_model(record, model_dir, name) for name in ("onnx", "native")}
    if models["native"].runtime != "native":
        raise RuntimeError(f"model {record.model_id} cannot be executed by the native forest runtime")
    after = frame[frame["open_time_ms"] >= pd.Timestamp(TRAIN_END, tz="UTC").value // 1_000_000]
    X = compute_features(after, record.feature_spec).to_numpy()
    X = X[np.isfinite(X).all(axis=1)]
    forest = joblib.load(io.BytesIO(read_verified(model_dir, record.sklearn_artifact, record.sklearn_sha256)))
    forest.n_jobs = 1
    reference = forest.predict_proba(X.astype(np.float32))
    out = fr.compare_runtimes(models["onnx"].forest, models["native"].forest, X, fr.QUICK if quick else fr.FULL,
                              reference)
    out["trees"] = len(forest.estimators_)
    out["breakdown"] = fr.columnar_breakdown(models, frame, SYMBOL, TIMEFRAME)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# report


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def build_report(results: dict, naive: dict, training: dict, plan: Plan, quick: bool, in_process: bool,
                 load_before, load_after, execution: dict) -> tuple[dict, str]:
    floor_p50 = results["floor"].latency_ms["p50"]
    rows = []
    for case in (*CASES, *SHADOW_CASES, *OOD_CASES, *ONNX_CASES):
        r = results[case.key]
        label = case.label if case.rpc != "Predict" else f"{case.label} (+{r.history} history)"
        cps = r.candles_per_s if case.rpc != "Health" else None
        rows.append({
            "case": case.key,
            "label": label,
            "rpc": case.rpc,
            "batch": case.batch,
            "concurrency": case.concurrency,
            "history": r.history,
            "p50_ms": r.latency_ms["p50"],
            "p99_ms": r.latency_ms["p99"],
            "requests_per_s": r.requests_per_s,
            "candles_per_s": cps,
            "p50_to_floor": r.latency_ms["p50"] / floor_p50,
            "speedup_vs_naive": cps / naive["candles_per_s"] if cps else None,
            "result": r.to_dict(),
        })
    rows.append({
        "case": "naive",
        "label": naive["label"],
        "rpc": None,
        "batch": 1,
        "concurrency": 1,
        "history": naive["window"] - 1,
        "p50_ms": naive["p50_ms"],
        "p99_ms": naive["p99_ms"],
        "requests_per_s": naive["requests_per_s"],
        "candles_per_s": naive["candles_per_s"],
        "p50_to_floor": naive["p50_ms"] / floor_p50,
        "speedup_vs_naive": 1.0,
        "result": naive,
    })

    stream_ratio = results["stream_1"].latency_ms["p50"] / floor_p50
    shadow_ratio = results["stream_1_shadow"].latency_ms["p50"] / results["stream_1_no_shadow"].latency_ms["p50"]
    ood_ratio = results["stream_1_ood"].latency_ms["p50"] / results["stream_1_no_ood"].latency_ms["p50"]
    best_1024 = max(("predict_1024", "predict_1024_c4"), key=lambda k: results[k].candles_per_s)
    best_cps = results[best_1024].candles_per_s
    best_columns_key = max(("columns_1024", "columns_1024_c4"), key=lambda k: results[k].candles_per_s)
    best_columns = results[best_columns_key].candles_per_s
    targets = [
        {
            "target": f"one-candle StreamPredict p50 <= {STREAM_TARGET_RATIO}x floor",
            "measured": f"{stream_ratio:.2f}x ({results['stream_1'].latency_ms['p50']:.3f} ms vs "
                        f"{floor_p50:.3f} ms)",
            "value": stream_ratio,
            "pass": stream_ratio <= STREAM_TARGET_RATIO,
        },
        {
            "target": f"one-candle StreamPredict p50 with a shadow model <= {SHADOW_TARGET_RATIO}x without",
            "measured": f"{shadow_ratio:.2f}x (best of {SHADOW_ROUNDS} rounds each: "
                        f"{results['stream_1_shadow'].latency_ms['p50']:.3f} ms vs "
                        f"{results['stream_1_no_shadow'].latency_ms['p50']:.3f} ms; per round: "
                        + ", ".join(f"{a.latency_ms['p50'] / b.latency_ms['p50']:.2f}x"
                                    for a, b in results["shadow_rounds"]) + ")",
            "value": shadow_ratio,
            "pass": shadow_ratio <= SHADOW_TARGET_RATIO,
        },
        {
            "target": f"one-candle StreamPredict p50 with the OOD score <= {OOD_TARGET_RATIO}x without",
            "measured": f"{ood_ratio:.2f}x (best of {SHADOW_ROUNDS} rounds each: "
                        f"{results['stream_1_ood'].latency_ms['p50']:.3f} ms vs "
                        f"{results['stream_1_no_ood'].latency_ms['p50']:.3f} ms; per round: "
                        + ", ".join(f"{a.latency_ms['p50'] / b.latency_ms['p50']:.2f}x"
                                    for a, b in results["ood_rounds"]) + ")",
            "value": ood_ratio,
            "pass": ood_ratio <= OOD_TARGET_RATIO,
        },
        {
            "target": f"1,024-candle Predict >= {BATCH_TARGET_CPS:,} candles/s",
            "measured": f"{best_cps:,.0f} candles/s ({next(c.label for c in CASES if c.key == best_1024)})",
            "value": best_cps,
            "pass": best_cps >= BATCH_TARGET_CPS,
        },
        {
            "target": f"1,024-candle Predict as columns >= {COLUMNS_TARGET_CPS:,} candles/s",
            "measured": f"{best_columns:,.0f} candles/s "
                        f"({next(c.label for c in CASES if c.key == best_columns_key)})",
            "value": best_columns,
            "pass": best_columns >= COLUMNS_TARGET_CPS,
        },
    ]
    r1024, r1 = execution["1_thread_1024_rows"], execution["1_thread_1_rows"]
    t1024, t1 = execution["2_threads_1024_rows"], execution["2_threads_1_rows"]
    targets += [
        {
            "target": f"forest runtime >= {RUNTIME_TARGET_RATIO:g}x ONNX Runtime on 1,024 rows (1 and 2 threads)",
            "measured": f"{r1024['ratio']:.2f}x on 1 thread ({r1024['native_us']:,.0f} us vs "
                        f"{r1024['onnx_us']:,.0f} us), {t1024['ratio']:.2f}x on 2 threads",
            "value": min(r1024["ratio"], t1024["ratio"]),
            "pass": min(r1024["ratio"], t1024["ratio"]) >= RUNTIME_TARGET_RATIO,
        },
        {
            "target": "forest runtime no slower than ONNX Runtime on 1 row (1 and 2 threads)",
            "measured": f"{r1['ratio']:.2f}x on 1 thread ({r1['native_us']:.1f} us vs {r1['onnx_us']:.1f} us), "
                        f"{t1['ratio']:.2f}x on 2 threads",
            "value": min(r1["ratio"], t1["ratio"]),
            "pass": min(r1["ratio"], t1["ratio"]) >= 1.0,
        },
        {
            "target": "served probabilities equal scikit-learn's predict_proba to 1e-12",
            "measured": f"largest difference {execution['parity_max_abs_diff']['native']:.2g} "
                        f"(ONNX Runtime: {execution['parity_max_abs_diff']['onnx']:.2g})",
            "value": execution["parity_max_abs_diff"]["native"],
            "pass": execution["parity_max_abs_diff"]["native"] <= 1e-12,
        },
    ]

    head = (f"{'case':<60} {'p50 ms':>8} {'p99 ms':>8} {'requests/s':>11} {'candles/s':>11} {'p50/floor':>9} "
            f"{'speedup':>8}")
    lines = [head, "-" * len(head)]
    for row in rows:
        cps = f"{row['candles_per_s']:,.0f}" if row["candles_per_s"] else "-"
        speedup = f"{row['speedup_vs_naive']:,.1f}x" if row["speedup_vs_naive"] else "-"
        lines.append(
            f"{row['label']:<60} {_num(row['p50_ms']):>8} {_num(row['p99_ms']):>8} "
            f"{row['requests_per_s']:>11,.0f} {cps:>11} {row['p50_to_floor']:>8.2f}x {speedup:>8}"
        )
    lines.append("")
    lines.append("speedup: candles/s relative to the naive baseline; Predict rows also carry warmup_bars - 1 "
                 "history candles per request, which are not counted")
    lines.append("")
    lines.append("DESIGN targets")
    for t in targets:
        lines.append(f"  [{'PASS' if t['pass'] else 'FAIL'}] {t['target']}: {t['measured']}")
    from bench.forest_runtime import breakdown_lines, runtime_lines

    lines.append("")
    lines += runtime_lines(execution)
    lines.append("")
    lines += breakdown_lines(execution["breakdown"], {"native": results["columns_1024"].candles_per_s,
                                                      "onnx": results["columns_1024_onnx"].candles_per_s})
    lines.append("")
    lines.append(f"training: {training['trees']} trees, {TRAIN_START} .. {TRAIN_END} "
                 f"({training['candles']:,} candles), {training['seconds']:.1f} s from started_at to finished_at "
                 "(DESIGN: two years of 1h candles with 200 trees well under a minute on 2 cores)")
    m = machine()
    lines.append(f"machine: {m['cores']} cores ({m['usable_cores']} usable), Python {m['python']}, "
                 f"{m['platform']}; load average before {load_before}, after {load_after}")
    lines.append(f"client: {'in the server process' if in_process else 'a separate process'}, closed loop, "
                 f"{plan.warmup_s:g} s warm-up then {plan.duration_s:g} s per case"
                 + (" (--quick)" if quick else ""))
    report = {
        "quick": quick,
        "plan": plan.__dict__,
        "client": "in-process" if in_process else "separate process",
        "machine": {**m, "load_average_before": load_before, "load_average_after": load_after},
        "training": training,
        "floor_p50_ms": floor_p50,
        "rows": rows,
        "targets": targets,
        "model_execution": execution,
    }
    return report, "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.inference",
        description="Inference latency and throughput against the DESIGN targets, in one run.",
    )
    ap.add_argument("--quick", action="store_true", help="about 30 s: 40 trees, 2 s per case")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default: {DEFAULT_OUT})")
    ap.add_argument("--client-in-process", action="store_true",
                    help="run the load generator in the server's process (it then shares the GIL with it)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL

    from inference_service.server import start as start_inference
    from shared.settings import Settings
    from shared.store.db import make_engine
    from shared.store.registry import get_model
    from training_service.server import start as start_training

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_all = time.perf_counter()
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="mlsignal-bench-") as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root}/bench.db"
        log(f"importing {SAMPLE.name} ...")
        frame = prepare_database(url)
        settings = Settings(database_url=url, model_dir=root / "models", log_level="WARNING")
        training = start_training(settings, "127.0.0.1:0")
        inference = None
        try:
            inference = start_inference(settings, "127.0.0.1:0")
            log(f"training {plan.trees} trees on {TRAIN_START} .. {TRAIN_END} ...")
            job, train_seconds = train_model(training.port, plan.trees)
            engine = make_engine(url)
            try:
                record = get_model(engine, job.model_id)
            finally:
                engine.dispose()
            if record is None:
                raise RuntimeError(f"model {job.model_id} of job {job.job_id} is not registered")
            times = frame["open_time_ms"].to_numpy()
            in_window = int(((times >= pd.Timestamp(TRAIN_START, tz="UTC").value // 10**6)
                             & (times < pd.Timestamp(TRAIN_END, tz="UTC").value // 10**6)).sum())
            training_info = {
                "job_id": job.job_id,
                "model_id": job.model_id,
                "trees": record.params.n_estimators,
                "candles": in_window,
                "seconds": train_seconds,
                "metrics": dict(job.metrics),
            }
            log(f"  {train_seconds:.1f} s, model {job.model_id}")
            log("measuring through gRPC ...")
            _URLS[record.model_id] = url
            served_runtime = inference.store.current(SYMBOL, TIMEFRAME).runtime
            log(f"  the server executes the forest with the {served_runtime} runtime")
            results = run_cases(f"127.0.0.1:{inference.port}", frame, plan, args.client_in_process, log,
                                shadow=(record, settings.model_dir))
            log("the columnar cases on a second server with MLSIGNAL_FOREST_RUNTIME=onnx ...")
            onnx_server = start_inference(replace(settings, forest_runtime="onnx"), "127.0.0.1:0")
            try:
                results.update(run_cases(f"127.0.0.1:{onnx_server.port}", frame, plan, args.client_in_process, log,
                                         cases=ONNX_CASES))
            finally:
                onnx_server.stop(0.5)
            log("model execution in process: native forest runtime against ONNX Runtime ...")
            execution = model_execution(record, settings.model_dir, frame, args.quick)
            execution["served_runtime"] = served_runtime
            log(f"naive baseline, {plan.naive_candles} candles ...")
            naive = naive_baseline(frame, record, settings.model_dir, plan.naive_candles)
        finally:
            if inference is not None:
                inference.stop(0.5)
            training.stop(0.5)
    load_after = _loadavg()
    report, table = build_report(results, naive, training_info, plan, args.quick, args.client_in_process,
                                 load_before, load_after, execution)
    report["wall_seconds"] = time.perf_counter() - t_all
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"\nwrote {args.out} ({report['wall_seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
