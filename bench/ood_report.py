"""Trust signals on two bundled series: how many candles the out-of-distribution score flags, and how the model does
on them, in the training's held-back slice and over the following months.

Each series is trained with the real pipeline on 2018 (2018-01-01 .. 2019-01-01, default forest parameters, the
product's default label: 24 bars, 2 %). Reported:

* held back (the pipeline's metrics): the share of the `test` slice flagged by a score fitted on the evaluation
  forest's rows (`ood_rate_test`), and the log-loss ratio (model / prior) of the flagged and of the unflagged test
  rows; the registered score's threshold and training flag rate;
* following (2019-01-01 .. 2019-10-01, every labelled candle, the registered model's served probabilities and its
  score, as inference would compute them): the share flagged, the log-loss ratio of flagged and unflagged candles,
  the mean entropy of the served probabilities against their realised log loss, and the population stability index
  of the features over consecutive windows of 1,000 candles (the largest feature's index per window: median and
  maximum over the windows, and the features that drift most).

    .venv/bin/python -m bench.ood_report

Measured (200 trees; ratio = log loss / prior log loss; counts in brackets):

| series | held back: flagged | ratio flagged / unflagged | following: flagged | ratio flagged / unflagged |
| --- | --- | --- | --- | --- |
| BTC 1h | 0.23 % (4 of 1,727) | 0.803 / 0.946 | 0.35 % (23 of 6,528) | 0.948 / 0.962 |
| EOS 30m | 0.52 % (18 of 3,452) | 0.900 / 0.919 | 0.58 % (70 of 12,920) | 1.149 / 0.954 |

Fewer candles than the training rows' 1 % are flagged out of sample, and too few to tell whether the model does
worse on them (4 to 70 candles). Feature drift is the rule, not the exception: over the following months the largest
feature index of a 1,000-candle window has a median of 1.7 (BTC) and 1.4 (EOS), driven by the volatility features
(natr, volatility, candle range), while the served probabilities' mean entropy stays close to their realised log
loss (BTC 0.973 against 0.949, EOS 0.957 against 0.953).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from bench.param_sweep import DATA
from shared import drift as drift_stats
from shared.calibration import log_loss, shrink_to_prior
from shared.features import feature_matrix
from shared.labels import LabelSpec, make_labels
from shared.onnxmodel import OnnxForest
from shared.params import ForestParams
from shared.store.importers import read_candles
from shared.timeframes import parse_time, timeframe_ms
from training_service.pipeline import train

SERIES = (
    ("BTC 1h", DATA / "btcusd_1h_coinbase_2017-2019.csv.gz", "1h"),
    ("EOS 30m", DATA / "eosusd_30m_gymcrypto_2017-2019.csv.gz", "30m"),
)
DRIFT_WINDOW = 1000  # candles per population stability index, as served


def _ratio(p: np.ndarray, prior: np.ndarray, y: np.ndarray, rows: np.ndarray) -> float:
    if not rows.any():
        return float("nan")
    return log_loss(p[rows], y[rows]) / log_loss(np.tile(prior, (int(rows.sum()), 1)), y[rows])


def report(name: str, path, tf: str, start_ms: int, split_ms: int, end_ms: int, label: LabelSpec,
           params: ForestParams) -> dict:
    frame = read_candles(path, tf)
    t = frame["open_time_ms"]
    window = frame[(t >= start_ms) & (t < split_ms)].reset_index(drop=True)
    t0 = time.perf_counter()
    model = train(window, label, params, n_jobs=-1, timeframe_ms=timeframe_ms(tf), cv_folds=0, importance_repeats=0)
    seconds = time.perf_counter() - t0
    assert model.ood is not None and model.drift is not None
    m = model.metrics

    # the following months, as served: features with their warm-up from the training window
    served = frame[(t >= start_ms) & (t < end_ms)].reset_index(drop=True)
    cols = {c: served[c].to_numpy(np.float64) for c in ("open", "high", "low", "close", "volume")}
    X = feature_matrix(cols, model.spec)
    times = served["open_time_ms"].to_numpy()
    y = make_labels(cols["close"], label, times, timeframe_ms(tf))
    rows = (times >= split_ms) & np.isfinite(X).all(axis=1)
    Xs = X[rows]
    p = shrink_to_prior(OnnxForest(model.onnx_bytes).predict_proba(Xs), model.prior, model.shrink_weight)
    scored = y[rows] >= 0  # candles whose label is known
    ys = y[rows][scored].astype(np.int64)
    ps = p[scored]
    flags = model.ood.flags(Xs)
    fs = flags[scored]
    bins = model.drift.bins(Xs)
    per_window = []
    for lo in range(0, len(bins) - DRIFT_WINDOW + 1, DRIFT_WINDOW):
        per_window.append(model.drift.psi(drift_stats.bin_counts(bins[lo:lo + DRIFT_WINDOW])))
    psi = np.array(per_window)
    worst = np.argsort(-np.median(psi, axis=0))[:3]
    return {
        "name": name,
        "train_seconds": seconds,
        "n_rows": m["n_rows"],
        "ood_threshold": m["ood_threshold"],
        "ood_rate_train": m["ood_rate_train"],
        "n_test": m["n_test"],
        "ood_rate_test": m["ood_rate_test"],
        "test_ood_rows": m["test_ood_rows"],
        "test_ood_log_loss_ratio": m.get("test_ood_log_loss_ratio", float("nan")),
        "test_in_distribution_log_loss_ratio": m.get("test_in_distribution_log_loss_ratio", float("nan")),
        "test_log_loss_ratio": m["log_loss_ratio"],
        "test_log_loss": m["log_loss"],
        "test_expected_log_loss": m["test_expected_log_loss"],
        "test_psi_max": m["test_psi_max"],
        "next_candles": len(Xs),
        "next_scored": len(ys),
        "next_ood_rate": float(np.mean(flags)),
        "next_ood_rows": int(fs.sum()),
        "next_ood_log_loss_ratio": _ratio(ps, model.prior, ys, fs),
        "next_in_distribution_log_loss_ratio": _ratio(ps, model.prior, ys, ~fs),
        "next_log_loss_ratio": _ratio(ps, model.prior, ys, np.ones(len(ys), dtype=bool)),
        "next_log_loss": log_loss(ps, ys),
        "next_expected_log_loss": drift_stats.expected_log_loss(ps),
        "next_psi_windows": len(psi),
        "next_psi_max_median": float(np.median(psi.max(axis=1))) if len(psi) else float("nan"),
        "next_psi_max_max": float(psi.max()) if len(psi) else float("nan"),
        "next_psi_worst": ", ".join(f"{model.spec.feature_names[j]} {np.median(psi[:, j]):.2f}" for j in worst),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-start", default="2018-01-01")
    ap.add_argument("--split", default="2019-01-01", help="end of the training window, exclusive")
    ap.add_argument("--end", default="2019-10-01", help="end of the following period, exclusive")
    ap.add_argument("--trees", type=int, default=ForestParams().n_estimators)
    args = ap.parse_args(argv)
    # scikit-learn's notice about joblib's `delayed`, once per chunk of trees: noise in a report
    warnings.filterwarnings("ignore", message=r".*sklearn\.utils\.parallel\.delayed.*", category=UserWarning)
    label = LabelSpec()
    params = ForestParams(n_estimators=args.trees)
    start, split, end = parse_time(args.train_start), parse_time(args.split), parse_time(args.end)
    print(f"train {args.train_start} .. {args.split} ({params.n_estimators} trees, label {label.kind} "
          f"{label.horizon_bars} bars {label.threshold}); following {args.split} .. {args.end}; "
          "ratio = log loss / prior log loss")
    results = [report(name, path, tf, start, split, end, label, params) for name, path, tf in SERIES]

    print("\nHeld back (the pipeline's test slice; score fitted on the evaluation forest's rows)\n")
    print("| series | threshold | flagged train | test rows | flagged test | ratio flagged | ratio unflagged | "
          "ratio all | log loss / expected | max PSI |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['name']} | {r['ood_threshold']:.2f} | {r['ood_rate_train']:.2%} | {r['n_test']:.0f} | "
              f"{r['ood_rate_test']:.2%} ({r['test_ood_rows']:.0f}) | {r['test_ood_log_loss_ratio']:.4f} | "
              f"{r['test_in_distribution_log_loss_ratio']:.4f} | {r['test_log_loss_ratio']:.4f} | "
              f"{r['test_log_loss']:.4f} / {r['test_expected_log_loss']:.4f} | {r['test_psi_max']:.2f} |")

    print("\nFollowing months (the registered model and score, every labelled candle)\n")
    print("| series | candles | flagged | ratio flagged | ratio unflagged | ratio all | log loss / expected | "
          "max PSI per 1,000 candles: median, max | most drifting features (median PSI) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['name']} | {r['next_scored']} | {r['next_ood_rate']:.2%} ({r['next_ood_rows']}) | "
              f"{r['next_ood_log_loss_ratio']:.4f} | {r['next_in_distribution_log_loss_ratio']:.4f} | "
              f"{r['next_log_loss_ratio']:.4f} | {r['next_log_loss']:.4f} / {r['next_expected_log_loss']:.4f} | "
              f"{r['next_psi_max_median']:.2f}, {r['next_psi_max_max']:.2f} ({r['next_psi_windows']} windows) | "
              f"{r['next_psi_worst']} |")
    took = ", ".join(f"{r['name']} {r['train_seconds']:.0f} s" for r in results)
    print(f"\ntraining: {took}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
