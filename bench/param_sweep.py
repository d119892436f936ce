"""Forest parameters and calibration vs out-of-sample probability quality on three bundled series.

Each series is trained with the real pipeline on 2017-10-01 .. 2018-10-01 and the served probabilities of every
labelled candle of the following year (2018-10-01 .. 2019-10-01) are scored against the class-prior baseline of the
training window. Labels whose horizon spans missing candles are dropped, in training and in scoring. The label is the
product default, 24 bars and 2 %, on every series: the same bar count, so 24 hours on 1h candles and 12 hours on 30m
candles (a 48-bar horizon on 30m would be a different product default, not a different series).

A candidate replaces the current choice only if it lowers the log-loss ratio (served log loss / prior log loss) on all
three series, or on two of them without raising it on the third by more than 0.002.

The grids of labels and features (`barriers`, `context`) and `defaults` are scored on two periods, six series-periods
in all, and a candidate is kept only if it passes the rule on both: the selection year above, and the untouched split
(train 2017-07-01 .. 2018-04-01, which is 2017-10-01 .. 2018-04-01 for the 30m series whose files start there; score
2018-04-01 .. 2018-10-01). Every ratio >= 1 (no better than the prior) is marked "miss".

    .venv/bin/python -m bench.param_sweep                      # the candidates (100 trees each)
    .venv/bin/python -m bench.param_sweep --grid uniqueness    # second round, around the best of the first
    .venv/bin/python -m bench.param_sweep --grid barriers      # volatility-scaled barriers (100 trees, both periods)
    .venv/bin/python -m bench.param_sweep --grid context       # longer-window context features (100 trees, both)
    .venv/bin/python -m bench.param_sweep --grid context-round2  # around the best of the first round
    .venv/bin/python -m bench.param_sweep --grid context-short   # windows with a warm-up under two weeks of 1h
    .venv/bin/python -m bench.param_sweep --grid defaults      # previous and current defaults (200 trees, both)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from shared.calibration import EPS, log_loss, shrink_to_prior
from shared.features import CONTEXT_SPEC, TRAINING_SPEC, FeatureSpec, feature_matrix
from shared.labels import LabelSpec, make_labels
from shared.onnxmodel import OnnxForest
from shared.params import UNIQUENESS, ForestParams
from shared.store.importers import read_candles
from shared.timeframes import parse_time, timeframe_ms
from training_service.pipeline import TrainedModel, train

DATA = Path(__file__).resolve().parents[1] / "data"
SERIES = (
    ("BTC 1h", DATA / "btcusd_1h_coinbase_2017-2019.csv.gz", "1h"),
    ("BTC 30m", DATA / "btcusd_30m_gymcrypto_2017-2019.csv.gz", "30m"),
    ("EOS 30m", DATA / "eosusd_30m_gymcrypto_2017-2019.csv.gz", "30m"),
)
TOLERANCE = 0.002  # the most a kept change may hurt one series

# The defaults before this sweep: chosen on BTC 1h, trained to 2018-12, tested on 2019.
PREVIOUS_DEFAULTS = ForestParams(min_samples_leaf=200, max_depth=6, max_samples=None)
CANDIDATE_TREES = 100


def _candidates() -> list[tuple[str, ForestParams]]:
    base = dataclasses.replace(PREVIOUS_DEFAULTS, n_estimators=CANDIDATE_TREES)

    def with_(**kw) -> ForestParams:
        return dataclasses.replace(base, **kw)

    return [
        ("leaf 200, depth 6 (previous default)", base),
        ("(a) max_samples=uniqueness, leaf 10", with_(max_samples=UNIQUENESS, min_samples_leaf=10)),
        ("(a) max_samples=uniqueness, leaf 25", with_(max_samples=UNIQUENESS, min_samples_leaf=25)),
        ("(a) max_samples=0.25, leaf 100", with_(max_samples=0.25, min_samples_leaf=100)),
        ("(d) leaf 400, depth 6", with_(min_samples_leaf=400)),
        ("(d) leaf 500, depth 4", with_(min_samples_leaf=500, max_depth=4)),
        ("(d) leaf 200, depth 4", with_(max_depth=4)),
        ("(d) leaf 200, depth 6, max_features 0.5", with_(max_features=0.5)),
    ]


def _uniqueness() -> list[tuple[str, ForestParams]]:
    """Second round, around the best of the first: each row against uniqueness-sized bootstraps with leaf 25."""
    base = dataclasses.replace(PREVIOUS_DEFAULTS, n_estimators=CANDIDATE_TREES, max_samples=UNIQUENESS,
                               min_samples_leaf=25)

    def with_(**kw) -> ForestParams:
        return dataclasses.replace(base, **kw)

    return [
        ("max_samples=uniqueness, leaf 25, depth 6", base),
        ("(a+d) uniqueness, leaf 50, depth 6", with_(min_samples_leaf=50)),
        ("(a+d) uniqueness, leaf 25, depth 4", with_(max_depth=4)),
        ("(a+d) uniqueness, leaf 25, depth 8", with_(max_depth=8)),
        ("(a+d) uniqueness, leaf 25, depth 6, max_features log2", with_(max_features="log2")),
    ]


def _defaults() -> list[tuple[str, ForestParams]]:
    return [("previous defaults", PREVIOUS_DEFAULTS), ("current defaults", ForestParams())]


GRIDS = {"candidates": _candidates, "uniqueness": _uniqueness, "defaults": _defaults}


# --------------------------------------------------------------------------------------------------------------------
# labels and features, scored on both periods


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    params: ForestParams
    label: dict = dataclasses.field(default_factory=dict)  # LabelSpec fields that differ from the command line's
    spec: FeatureSpec = FeatureSpec()


@dataclasses.dataclass(frozen=True)
class Period:
    name: str
    train_start: str
    split: str
    end: str


PERIODS = (
    Period("2019", "2017-10-01", "2018-10-01", "2019-10-01"),  # the selection year
    Period("2018", "2017-07-01", "2018-04-01", "2018-10-01"),  # untouched: the 30m files start on 2017-10-01
)


def _screen(**kw) -> ForestParams:
    return ForestParams(n_estimators=CANDIDATE_TREES, **kw)


def _barriers() -> list[Candidate]:
    """Volatility-scaled barriers: k * sigma_t * sqrt(h), sigma_t over the last `bars` 1-bar returns (closes <= t)."""
    out = [Candidate("fixed 2 % barrier (current default)", _screen())]
    for bars, k in ((24, 0.5), (168, 0.35), (168, 0.5), (168, 0.75), (720, 0.5)):
        out.append(Candidate(f"volatility barrier: {bars} bars, k {k}", _screen(),
                             {"volatility_bars": bars, "volatility_multiple": k}))
    return out


def _context_grid(baseline: Candidate, windows: tuple[tuple[int, ...], ...]) -> list[Candidate]:
    """`baseline`, then the default forest with context features over each of `windows`."""
    return [baseline, *(Candidate(f"context bars {', '.join(map(str, bars))}", _screen(),
                                  spec=FeatureSpec(context_bars=bars)) for bars in windows)]


def _context() -> list[Candidate]:
    """Context features of the same series over longer windows (return, range, position in range, volatility)."""
    return _context_grid(Candidate("no context features (current default)", _screen()),
                         ((24,), (24, 96), (96, 336), (168, 720)))


def _context_round2() -> list[Candidate]:
    """Second round, around the best of the first (context bars 168, 720)."""
    return _context_grid(Candidate("context bars 168, 720 (best of the first round)", _screen(),
                                   spec=FeatureSpec(context_bars=(168, 720))),
                         ((720,), (96, 720), (336, 720), (168, 1440), (24, 168, 720)))


def _context_short() -> list[Candidate]:
    """Context windows whose warm-up fits in two weeks of 1h candles (336), against no context features."""
    return _context_grid(Candidate("no context features (feature set v1)", _screen()),
                         ((168,), (24, 168), (48, 168), (96, 240)))


def _defaults6() -> list[Candidate]:
    """The previous forest defaults, the defaults, and the defaults with the measured context features."""
    return [Candidate("previous defaults (leaf 200, depth 6)", PREVIOUS_DEFAULTS, spec=FeatureSpec()),
            Candidate("defaults (feature set v1)", ForestParams(), spec=TRAINING_SPEC),
            Candidate("defaults + context bars 168, 720 (feature set v2)", ForestParams(), spec=CONTEXT_SPEC)]


GRIDS6 = {"barriers": _barriers, "context": _context, "context-round2": _context_round2,
          "context-short": _context_short, "defaults": _defaults6}


# --------------------------------------------------------------------------------------------------------------------
# calibration alternatives, fitted on the rows the shrink weight was fitted on


def _sigmoid(raw: np.ndarray, y: np.ndarray):
    """Multinomial Platt scaling: softmax(a * log p + b), with a and the class offsets b fitted by log loss."""
    from scipy.optimize import minimize  # type: ignore[import-untyped]

    logp = np.log(np.clip(raw, 1e-6, 1.0))
    k = raw.shape[1]

    def probs(theta, lp):
        z = theta[0] * lp + np.concatenate([[0.0], theta[1:]])
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    res = minimize(lambda t: log_loss(probs(t, logp), y), np.concatenate([[1.0], np.zeros(k - 1)]),
                   method="L-BFGS-B")
    theta = res.x
    return lambda p: probs(theta, np.log(np.clip(p, 1e-6, 1.0)))


def _isotonic(raw: np.ndarray, y: np.ndarray):
    """One isotonic regression per class (probability -> frequency), rows renormalised."""
    from sklearn.isotonic import IsotonicRegression

    fits = [IsotonicRegression(y_min=1e-3, y_max=1.0, out_of_bounds="clip").fit(raw[:, k], (y == k).astype(float))
            for k in range(raw.shape[1])]

    def apply(p: np.ndarray) -> np.ndarray:
        out = np.column_stack([f.predict(p[:, k]) for k, f in enumerate(fits)])
        out = np.clip(out, EPS, None)
        return out / out.sum(axis=1, keepdims=True)

    return apply


# --------------------------------------------------------------------------------------------------------------------


def out_of_sample(frame: pd.DataFrame, tf: str, train_start_ms: int, split_ms: int, end_ms: int, label: LabelSpec,
                  params: ForestParams, calibrators: bool = False, spec: FeatureSpec = FeatureSpec()) -> dict:
    """Train on [train_start_ms, split_ms), score the served probabilities of every labelled candle in
    [split_ms, end_ms)."""
    window = frame[(frame.open_time_ms >= train_start_ms) & (frame.open_time_ms < split_ms)].reset_index(drop=True)
    t0 = time.perf_counter()
    model: TrainedModel = train(window, label, params, n_jobs=-1, base_spec=spec, timeframe_ms=timeframe_ms(tf),
                                cv_folds=0, importance_repeats=0)
    seconds = time.perf_counter() - t0
    frame = frame[frame.open_time_ms < end_ms].reset_index(drop=True)
    cols = {c: frame[c].to_numpy(np.float64) for c in ("open", "high", "low", "close", "volume")}
    X = feature_matrix(cols, model.spec)
    times = frame.open_time_ms.to_numpy()
    y = make_labels(cols["close"], label, times, timeframe_ms(tf))
    test = (times >= split_ms) & (y >= 0) & np.isfinite(X).all(axis=1)
    raw = OnnxForest(model.onnx_bytes).predict_proba(X[test].astype(np.float32))
    yt = y[test].astype(np.int64)
    out = {
        "log_loss": log_loss(shrink_to_prior(raw, model.prior, model.shrink_weight), yt),
        "raw_log_loss": log_loss(raw, yt),
        "prior_log_loss": log_loss(np.tile(model.prior, (len(yt), 1)), yt),
        "shrink_weight": model.shrink_weight,
        "n_test": len(yt),
        "train_seconds": seconds,
    }
    if calibrators and model.calibration_rows is not None:
        cal_raw, cal_y, _ = model.calibration_rows
        out["sigmoid_log_loss"] = log_loss(_sigmoid(cal_raw, cal_y)(raw), yt)
        out["isotonic_log_loss"] = log_loss(_isotonic(cal_raw, cal_y)(raw), yt)
    return out


def keep(candidate: list[float], current: list[float], tolerance: float = TOLERANCE) -> bool:
    """The rule: better on all series, or on all but one without hurting that one by more than `tolerance`."""
    better = [c < b for c, b in zip(candidate, current, strict=True)]
    if all(better):
        return True
    worse = [c - b for c, b in zip(candidate, current, strict=True) if c >= b]
    return len(worse) == 1 and worse[0] <= tolerance and len(candidate) > 2


def cell(ratio: float) -> str:
    """A ratio for the table; at or above 1 (no better than the prior) it is marked as a miss."""
    return f"{ratio:.4f}" + (" **miss**" if ratio >= 1 else "")


def six(candidates: list[Candidate], base_label: LabelSpec, frames: dict) -> dict[str, list[float]]:
    """Score every candidate on the three series and both periods; prints the table and the rule's verdicts."""
    names = [s[0] for s in SERIES]
    cols = [f"{n} {p.name}" for p in PERIODS for n in names]
    print(f"label {base_label.kind} {base_label.horizon_bars} bars, threshold {base_label.threshold} unless the row "
          "says otherwise; ratio = served log loss / prior log loss (w = shrink weight); "
          + "; ".join(f"{p.name}: train {p.train_start} .. {p.split}, score {p.split} .. {p.end}" for p in PERIODS))
    print("| candidate | " + " | ".join(cols) + " | fit s |")
    print("| --- | " + " | ".join("---" for _ in cols) + " | --- |")
    results: dict[str, list[float]] = {}
    for cand in candidates:
        label = dataclasses.replace(base_label, **cand.label)
        rows = []
        for period in PERIODS:
            start, split, end = (parse_time(x) for x in (period.train_start, period.split, period.end))
            for sname in names:
                frame, tf = frames[sname]
                rows.append(out_of_sample(frame, tf, start, split, end, label, cand.params, spec=cand.spec))
        ratios = [r["log_loss"] / r["prior_log_loss"] for r in rows]
        results[cand.name] = ratios
        cells = " | ".join(f"{cell(x)} (w {r['shrink_weight']:.2f})" for x, r in zip(ratios, rows, strict=True))
        print(f"| {cand.name} | {cells} | {sum(r['train_seconds'] for r in rows):.0f} |", flush=True)
    base = candidates[0].name
    print()
    print(f"| candidate | change in ratio against {base} ({' / '.join(names)}), per period | rule |")
    print("| --- | --- | --- |")
    k = len(names)
    for name, ratios in results.items():
        if name == base:
            continue
        verdicts = []
        for j, period in enumerate(PERIODS):
            c, b = ratios[j * k:(j + 1) * k], results[base][j * k:(j + 1) * k]
            delta = " / ".join(f"{x - y:+.4f}" for x, y in zip(c, b, strict=True))
            verdicts.append((period.name, delta, keep(c, b)))
        verdict = "keep" if all(v[2] for v in verdicts) else "reject"
        detail = "; ".join(f"{p}: {d} ({'pass' if ok else 'fail'})" for p, d, ok in verdicts)
        print(f"| {name} | {detail} | {verdict} |", flush=True)
    misses = {n: sum(x >= 1 for x in r) for n, r in results.items()}
    print()
    for name, m in misses.items():
        print(f"{name}: {6 - m} of 6 series-periods below the prior" + ("" if m == 0 else f", {m} miss"))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=sorted(set(GRIDS) | set(GRIDS6)), default="candidates")
    ap.add_argument("--single-period", action="store_true",
                    help="for --grid defaults: the older table on the selection year only, with calibrators")
    ap.add_argument("--train-start", default="2017-10-01")
    ap.add_argument("--split", default="2018-10-01", help="first out-of-sample candle (default 2018-10-01)")
    ap.add_argument("--end", default="2019-10-01", help="end of the scored year, exclusive (default 2019-10-01)")
    ap.add_argument("--horizon", type=int, default=24)
    ap.add_argument("--threshold", type=float, default=0.02)
    ap.add_argument("--label", choices=("fixed-horizon", "triple-barrier"), default="fixed-horizon")
    args = ap.parse_args(argv)
    label = LabelSpec(args.horizon, args.threshold, args.label.replace("-", "_"))
    start, split, end = parse_time(args.train_start), parse_time(args.split), parse_time(args.end)
    frames = {name: (read_candles(path, tf), tf) for name, path, tf in SERIES}
    if args.grid in GRIDS6 and not (args.grid == "defaults" and args.single_period):
        six(GRIDS6[args.grid](), label, frames)
        return 0
    grid = GRIDS[args.grid]()
    print(f"label {label.kind} {label.horizon_bars} bars, threshold {label.threshold}; train {args.train_start} .. "
          f"{args.split}, score {args.split} .. {args.end}; ratio = served log loss / prior log loss")
    names = [s[0] for s in SERIES]
    head = " | ".join(f"{n} ratio (LL / prior, w)" for n in names)
    print(f"| parameters | {head} | fit s |")
    print("| --- | " + " | ".join("---" for _ in names) + " | --- |")
    results: dict[str, list[dict]] = {}
    for pname, params in grid:
        rows = []
        for sname in names:
            frame, tf = frames[sname]
            rows.append(out_of_sample(frame, tf, start, split, end, label, params,
                                     calibrators=args.grid == "defaults" or pname == grid[0][0]))
        results[pname] = rows
        cells = " | ".join(f"{r['log_loss'] / r['prior_log_loss']:.4f} ({r['log_loss']:.4f} / "
                           f"{r['prior_log_loss']:.4f}, {r['shrink_weight']:.2f})" for r in rows)
        print(f"| {pname} | {cells} | {sum(r['train_seconds'] for r in rows):.0f} |", flush=True)
        if "sigmoid_log_loss" in rows[0]:
            for method in ("sigmoid", "isotonic"):
                cells = " | ".join(f"{r[f'{method}_log_loss'] / r['prior_log_loss']:.4f} "
                                   f"({r[f'{method}_log_loss']:.4f} / {r['prior_log_loss']:.4f})" for r in rows)
                print(f"| (b) {pname}, {method} calibration | {cells} | |", flush=True)
    base = grid[0][0]
    base_ratios = [r["log_loss"] / r["prior_log_loss"] for r in results[base]]
    print()
    for pname, rows in results.items():
        if pname == base:
            continue
        ratios = [r["log_loss"] / r["prior_log_loss"] for r in rows]
        delta = " ".join(f"{c - b:+.4f}" for c, b in zip(ratios, base_ratios, strict=True))
        print(f"{pname}: change in ratio {delta} -> {'keep' if keep(ratios, base_ratios) else 'reject'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
