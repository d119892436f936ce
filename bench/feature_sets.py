"""What the context features of feature set v2 cost against v1: one new candle (the live path) and a whole file.

Both sets run on the bundled BTC/USD 1h candles in alternating rounds (v1, v2, v1, v2, ...), and the best round of
each side is compared, so a change of the machine's load between rounds cancels out.

    .venv/bin/python -m bench.feature_sets [--rounds 5] [--calls 1000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from shared.features import CONTEXT_SPEC, TRAINING_SPEC, FeatureSpec, feature_matrix
from shared.store.importers import read_candles

DATA = Path(__file__).resolve().parents[1] / "data" / "btcusd_1h_coinbase_2017-2019.csv.gz"


def _one_candle(cols: dict[str, np.ndarray], spec: FeatureSpec, calls: int) -> float:
    n = spec.warmup_bars + 50
    window = {k: np.ascontiguousarray(v[-n:]) for k, v in cols.items()}
    t0 = time.perf_counter()
    for _ in range(calls):
        feature_matrix(window, spec, first_row=n - 1)
    return (time.perf_counter() - t0) / calls


def _whole(cols: dict[str, np.ndarray], spec: FeatureSpec) -> float:
    t0 = time.perf_counter()
    feature_matrix(cols, spec)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=1000, help="one-candle calls per round")
    args = ap.parse_args(argv)
    frame = read_candles(DATA, "1h")
    cols = {c: frame[c].to_numpy(np.float64) for c in ("open", "high", "low", "close", "volume")}
    specs = (TRAINING_SPEC, CONTEXT_SPEC)
    one: dict[str, list[float]] = {s.key: [] for s in specs}
    whole: dict[str, list[float]] = {s.key: [] for s in specs}
    for _ in range(args.rounds):
        for spec in specs:
            one[spec.key].append(_one_candle(cols, spec, args.calls))
            whole[spec.key].append(_whole(cols, spec))
    base = TRAINING_SPEC.key
    print(f"best of {args.rounds} alternating rounds; {len(frame)} candles of BTC/USD 1h")
    print("| feature set | warm-up | one new candle, µs | ratio | whole file, s | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for spec in specs:
        o, w = min(one[spec.key]), min(whole[spec.key])
        print(f"| {spec.key} | {spec.warmup_bars} | {o * 1e6:.1f} | {o / min(one[base]):.2f}x | {w:.3f} | "
              f"{w / min(whole[base]):.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
