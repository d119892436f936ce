"""Model execution: the native forest runtime against ONNX Runtime on the same model and rows, and where the time
of a columnar Predict goes.

    .venv/bin/python -m bench.forest_runtime [--quick]      (also a section of `make bench`, on the served model)

Standalone, it trains the default forest (200 trees, max_depth 6, min_samples_leaf 25; 40 trees with --quick) on
the bundled BTC/USD 1h sample, 2017-07-01 .. 2019-01-01, in this process, and predicts feature rows of 2019.

- **1 thread**: one caller, `predict_proba` on 1 row and on 1,024 rows, microseconds of the caller's CPU time per
  call (median over rounds; CPU time, so other work on the machine does not count).
- **2 threads**: two concurrent callers on the one loaded model, each predicting its own batches in a loop for a
  fixed time (as two requests served at once do); aggregate rows per second of wall time. Both runtimes release
  the GIL.
- Rounds alternate between the runtimes, so a change of the machine's load hits both; the ratio is ONNX Runtime's
  time over the native runtime's (above 1: native is faster).
- **parity**: the largest difference of each runtime from scikit-learn's `predict_proba` on the measured rows.
- **columnar Predict, in process**: the stages of one 1,024-candle columnar request (plus warmup_bars - 1 history
  candles) timed one by one: parsing the request, converting and validating the columns, the features, the OOD
  score, the forest (each runtime), and building and serializing the response; what end-to-end throughput leaves
  beyond their sum is gRPC transport, the client and the server's bookkeeping.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

TWO_THREADS_SECONDS = 1.0


@dataclass(frozen=True)
class Plan:
    rounds: int
    reps_1: int
    reps_1024: int
    threads_seconds: float


FULL = Plan(rounds=7, reps_1=2000, reps_1024=40, threads_seconds=TWO_THREADS_SECONDS)
QUICK = Plan(rounds=3, reps_1=500, reps_1024=10, threads_seconds=0.5)


def _per_call_us(fn, X: np.ndarray, reps: int) -> float:
    """CPU time of this thread per call: what the work costs, whatever else the machine runs meanwhile."""
    t0 = time.thread_time()
    for _ in range(reps):
        fn(X)
    return (time.thread_time() - t0) / reps * 1e6


def _two_callers_rows_per_s(fn, Xa: np.ndarray, Xb: np.ndarray, seconds: float) -> float:
    counts = [0, 0]
    start = threading.Barrier(3)
    stop = threading.Event()

    def worker(i: int, X: np.ndarray) -> None:
        start.wait()
        n = 0
        while not stop.is_set():
            fn(X)
            n += 1
        counts[i] = n

    threads = [threading.Thread(target=worker, args=(i, X)) for i, X in enumerate((Xa, Xb))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)  # a benchmark's measuring window, not time-driven logic
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return (counts[0] * len(Xa) + counts[1] * len(Xb)) / elapsed


def compare_runtimes(onnx: Any, native: Any, X: np.ndarray, plan: Plan, reference: np.ndarray | None = None) -> dict:
    """ONNX Runtime (`onnx.predict_proba`) against the native runtime on rows of X (at least 2 x 1,024)."""
    assert len(X) >= 2048, "needs 2 x 1,024 rows"
    out: dict[str, Any] = {}
    runtimes = {"onnx": onnx.predict_proba, "native": native.predict_proba}
    for fn in runtimes.values():  # warm both
        fn(X[:1024])
        fn(X[:1])
    single: dict[str, dict[int, list[float]]] = {k: {1: [], 1024: []} for k in runtimes}
    pair: dict[str, dict[int, list[float]]] = {k: {1: [], 1024: []} for k in runtimes}
    for r in range(plan.rounds):
        order = list(runtimes) if r % 2 == 0 else list(runtimes)[::-1]
        for name in order:
            fn = runtimes[name]
            single[name][1].append(_per_call_us(fn, X[r:r + 1], plan.reps_1))
            single[name][1024].append(_per_call_us(fn, X[:1024], plan.reps_1024))
            pair[name][1].append(_two_callers_rows_per_s(fn, X[r:r + 1], X[r + 1:r + 2], plan.threads_seconds / 2))
            pair[name][1024].append(_two_callers_rows_per_s(fn, X[:1024], X[1024:2048], plan.threads_seconds))
    for rows in (1, 1024):
        o, n = statistics.median(single["onnx"][rows]), statistics.median(single["native"][rows])
        out[f"1_thread_{rows}_rows"] = {"onnx_us": o, "native_us": n, "ratio": o / n,
                                        "onnx_rows_per_s": rows / o * 1e6, "native_rows_per_s": rows / n * 1e6}
        o2, n2 = statistics.median(pair["onnx"][rows]), statistics.median(pair["native"][rows])
        out[f"2_threads_{rows}_rows"] = {"onnx_rows_per_s": o2, "native_rows_per_s": n2, "ratio": n2 / o2,
                                         "onnx_us": 2 * rows / o2 * 1e6, "native_us": 2 * rows / n2 * 1e6}
    if reference is not None:
        m = min(len(X), len(reference))
        out["parity_max_abs_diff"] = {"onnx": float(np.max(np.abs(onnx.predict_proba(X[:m]) - reference[:m]))),
                                      "native": float(np.max(np.abs(native.predict_proba(X[:m]) - reference[:m])))}
    out["rounds"] = plan.rounds
    return out


def runtime_lines(r: dict) -> list[str]:
    title = f"model execution ({r.get('trees', '?')} trees)"
    head = f"{title:<44} {'ONNX Runtime':>14} {'native':>12} {'ratio':>7}"
    lines = [head, "-" * len(head)]
    for key, label in (("1_thread_1_rows", "1 row, 1 thread (us per call)"),
                       ("1_thread_1024_rows", "1,024 rows, 1 thread (us per call)"),
                       ("2_threads_1_rows", "1 row, 2 threads (us per row-pair)"),
                       ("2_threads_1024_rows", "1,024 rows, 2 threads (us per 2,048 rows)")):
        v = r[key]
        lines.append(f"{label:<44} {v['onnx_us']:>14,.1f} {v['native_us']:>12,.1f} {v['ratio']:>6.2f}x")
    p = r.get("parity_max_abs_diff")
    if p:
        lines.append(f"largest difference from scikit-learn predict_proba: ONNX Runtime {p['onnx']:.2g}, "
                     f"native {p['native']:.2g}")
    lines.append("ratio: ONNX Runtime time / native time, median of alternating rounds; 1 thread: CPU time of the "
                 "caller; 2 threads: wall time of two concurrent callers on one loaded model, each with its own "
                 "batches")
    return lines


# -- where a columnar Predict spends its time -------------------------------------------------------------------------
def columnar_breakdown(models: dict[str, Any], frame: pd.DataFrame, symbol: str, timeframe: str, batch: int = 1024,
                       reps: int = 30) -> dict:
    """Per-stage milliseconds of one columnar Predict of `batch` candles (plus the history its model needs),
    computed in process as the server computes it; `models` maps a runtime name to a LoadedModel of one model."""
    from inference_service.converters import batch_from_request, response_for
    from inference_service.predictor import predict_window
    from mlsignal.v1 import common_pb2, inference_pb2
    from shared.candles import validate
    from shared.features import feature_matrix
    from shared.timeframes import timeframe_ms

    any_model = next(iter(models.values()))
    spec = any_model.record.feature_spec
    history = any_model.record.warmup_bars - 1
    rows = frame.iloc[len(frame) - batch - history:]
    cols = common_pb2.CandleColumns(open_time_ms=rows["open_time_ms"].tolist())
    for name in ("open", "high", "low", "close", "volume"):
        getattr(cols, name).extend(rows[name].to_numpy(float))
    wire = inference_pb2.PredictRequest(symbol=symbol, timeframe=timeframe, columns=cols).SerializeToString()
    tf = timeframe_ms(timeframe)

    def timed(fn) -> float:
        fn()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e3

    req = inference_pb2.PredictRequest.FromString(wire)

    def convert():
        b = batch_from_request(req, 1_000_000).read(True, True)
        validate(b, tf, columnar=True)
        return b

    window = convert()
    start = spec.warmup_bars - 1
    X = feature_matrix(window.columns(), spec, start)
    ood = any_model.record.ood
    stages: dict[str, float] = {
        "parse request": timed(lambda: inference_pb2.PredictRequest.FromString(wire)),
        "convert + validate columns": timed(convert),
        "features": timed(lambda: feature_matrix(window.columns(), spec, start)),
        "OOD score": timed(lambda: ood.scores(X)) if ood is not None else 0.0,
    }
    out: dict[str, Any] = {"batch": batch, "history": history, "stages_ms": stages, "forest_ms": {},
                           "predict_window_ms": {}, "response_ms": 0.0}
    for name, model in models.items():
        out["forest_ms"][name] = timed(lambda m=model: m.predict_proba(X))
        out["predict_window_ms"][name] = timed(lambda m=model: predict_window(m, window, 0))
    predictions = predict_window(any_model, window, 0)
    out["response_ms"] = timed(lambda: response_for(req, any_model.model_id, predictions).SerializeToString())
    for name in models:
        total = sum(stages.values()) + out["forest_ms"][name] + out["response_ms"]
        out.setdefault("serial_total_ms", {})[name] = total
        out.setdefault("serial_candles_per_s", {})[name] = batch / total * 1e3
    return out


def breakdown_lines(b: dict, end_to_end: dict[str, float] | None = None) -> list[str]:
    """A table of the stages; `end_to_end` (runtime -> measured candles/s of one client) adds what remains."""
    names = list(b["forest_ms"])
    head = f"{'columnar Predict, ' + format(b['batch'], ',') + ' candles, in process (ms)':<52}" + "".join(
        f"{n:>12}" for n in names)
    lines = [head, "-" * len(head)]
    for stage, ms in b["stages_ms"].items():
        lines.append(f"{stage:<52}" + "".join(f"{ms:>12.3f}" for _ in names))
    lines.append(f"{'forest (predict_proba)':<52}" + "".join(f"{b['forest_ms'][n]:>12.3f}" for n in names))
    lines.append(f"{'response (build + serialize)':<52}" + "".join(f"{b['response_ms']:>12.3f}" for _ in names))
    lines.append(f"{'sum of the stages, one thread':<52}" + "".join(f"{b['serial_total_ms'][n]:>12.3f}" for n in names))
    lines.append(f"{'predict_window (features, OOD, forest; 2 threads)':<52}"
                 + "".join(f"{b['predict_window_ms'][n]:>12.3f}" for n in names))
    if end_to_end:
        lines.append(f"{'end to end through gRPC, one client (ms/request)':<52}"
                     + "".join(f"{b['batch'] / end_to_end[n] * 1e3:>12.3f}" if n in end_to_end else f"{'-':>12}"
                               for n in names))
        lines.append(f"{'  of which transport, client, bookkeeping':<52}"
                     + "".join(f"{b['batch'] / end_to_end[n] * 1e3 - b['serial_total_ms'][n]:>12.3f}"
                               if n in end_to_end else f"{'-':>12}" for n in names))
    return lines


# -- standalone --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.forest_runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 trees and fewer rounds")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    import tempfile
    from pathlib import Path

    import joblib

    from bench.inference import SAMPLE, SYMBOL, TIMEFRAME, TRAIN_END, TRAIN_START
    from inference_service.model_store import load_model
    from shared.artifacts import write_atomic
    from shared.features import compute_features
    from shared.labels import CLASSES, LabelSpec
    from shared.params import ForestParams
    from shared.store.importers import read_candles
    from shared.store.registry import SERVING, ModelRecord
    from training_service.pipeline import train

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    frame = read_candles(SAMPLE, TIMEFRAME)
    t = frame["open_time_ms"]
    lo, hi = (pd.Timestamp(x, tz="UTC").value // 1_000_000 for x in (TRAIN_START, TRAIN_END))
    params = ForestParams(n_estimators=40) if args.quick else ForestParams()
    log(f"training {params.n_estimators} trees on {TRAIN_START} .. {TRAIN_END} in process ...")
    m = train(frame[(t >= lo) & (t < hi)].reset_index(drop=True), LabelSpec(), params, cv_folds=0,
              importance_repeats=0)
    with tempfile.TemporaryDirectory(prefix="mlsignal-forest-bench-") as tmp:
        model_dir = Path(tmp)
        record = ModelRecord(
            model_id="bench", symbol=SYMBOL, timeframe=TIMEFRAME, created_at_ms=int(hi),
            train_start_ms=m.train_start_ms, train_end_ms=m.train_end_ms, label=LabelSpec(), feature_spec=m.spec,
            params=params, classes=CLASSES, prior=tuple(m.prior), shrink_weight=m.shrink_weight, metrics=m.metrics,
            artifact="bench.onnx", sha256=write_atomic(model_dir / "bench.onnx", m.onnx_bytes),
            sklearn_artifact="bench.joblib", sklearn_sha256=write_atomic(model_dir / "bench.joblib", m.sklearn_bytes),
            stage=SERVING, ood=m.ood, drift=m.drift,
        )
        models = {name: load_model(record, model_dir, name) for name in ("onnx", "native")}
    X = compute_features(frame[t >= hi], m.spec).to_numpy()
    X = X[np.isfinite(X).all(axis=1)]
    forest = joblib.load(io.BytesIO(m.sklearn_bytes))
    reference = forest.predict_proba(X.astype(np.float32))
    log("measuring ...")
    r = compare_runtimes(models["onnx"].forest, models["native"].forest, X, plan, reference)
    r["trees"] = params.n_estimators
    print("\n".join(runtime_lines(r)))
    print()
    print("\n".join(breakdown_lines(columnar_breakdown(models, frame, SYMBOL, TIMEFRAME))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
