"""Forest parameters vs out-of-sample probability quality on the bundled sample.

Trains with the real pipeline on 2017-07..2018-12 and scores the served (shrunk) probabilities on 2019 against
the class-prior baseline. This is the measurement the default parameters in shared/params.py come from.

    .venv/bin/python -m bench.param_sweep
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from shared.calibration import brier, log_loss, shrink_to_prior
from shared.features import feature_matrix
from shared.labels import LabelSpec, make_labels
from shared.onnxmodel import OnnxForest
from shared.params import ForestParams
from shared.store.importers import read_candles
from shared.timeframes import parse_time
from training_service.pipeline import train

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "btcusd_1h_coinbase_2017-2019.csv.gz"
GRID = [
    ("unregularised: leaf 20, unlimited depth", ForestParams(min_samples_leaf=20, max_depth=None)),
    ("leaf 50, depth 10", ForestParams(min_samples_leaf=50, max_depth=10)),
    ("leaf 200, depth 6 (default)", ForestParams()),
    ("leaf 200, depth 8", ForestParams(min_samples_leaf=200, max_depth=8)),
    ("leaf 500, depth 4", ForestParams(min_samples_leaf=500, max_depth=4)),
]


def out_of_sample(frame: pd.DataFrame, split_ms: int, label: LabelSpec, params: ForestParams) -> dict:
    """Train before split_ms, score the served probabilities of every labelled candle from split_ms on."""
    train_frame = frame[frame.open_time_ms < split_ms].reset_index(drop=True)
    t0 = time.perf_counter()
    model = train(train_frame, label, params)
    seconds = time.perf_counter() - t0
    cols = {c: frame[c].to_numpy(np.float64) for c in ("open", "high", "low", "close", "volume")}
    X = feature_matrix(cols, model.spec)
    y = make_labels(cols["close"], label)
    test = (frame.open_time_ms.to_numpy() >= split_ms) & (y >= 0) & np.isfinite(X).all(axis=1)
    raw = OnnxForest(model.onnx_bytes).predict_proba(X[test])
    p = shrink_to_prior(raw, model.prior, model.shrink_weight)
    yt = y[test].astype(np.int64)
    prior = np.tile(model.prior, (len(yt), 1))
    return {
        "log_loss": log_loss(p, yt),
        "raw_log_loss": log_loss(raw, yt),
        "prior_log_loss": log_loss(prior, yt),
        "brier": brier(p, yt),
        "prior_brier": brier(prior, yt),
        "shrink_weight": model.shrink_weight,
        "n_test": len(yt),
        "train_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="2019-01-01", help="first out-of-sample candle (default 2019-01-01)")
    ap.add_argument("--horizon", type=int, default=24)
    ap.add_argument("--threshold", type=float, default=0.02)
    args = ap.parse_args(argv)
    frame = read_candles(SAMPLE, "1h")
    label = LabelSpec(args.horizon, args.threshold)
    print(f"BTC/USD 1h, label horizon {label.horizon_bars} threshold {label.threshold}, "
          f"train < {args.split}, test >= {args.split}")
    print(f"{'parameters':42} {'raw LL':>8} {'served LL':>9} {'prior LL':>9} {'ratio':>7} {'w':>6} {'fit s':>6}")
    for name, params in GRID:
        r = out_of_sample(frame, parse_time(args.split), label, params)
        print(f"{name:42} {r['raw_log_loss']:8.4f} {r['log_loss']:9.4f} {r['prior_log_loss']:9.4f} "
              f"{r['log_loss'] / r['prior_log_loss']:7.4f} {r['shrink_weight']:6.3f} {r['train_seconds']:6.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
