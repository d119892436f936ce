"""The training pipeline: candles in, an evaluated, calibrated, ONNX-exported forest out.

Time order is respected everywhere. The labelled rows are split as

    [ fit | gap | calibration | gap | test ]      gap = horizon_bars rows (purge: labels look ahead h bars)

1. evaluation: a forest fitted on `fit`, shrunk toward the prior with a weight fitted on `calibration`, scored on
   `test` only, next to the class-prior baseline; permutation importance on `test`;
2. the registered model: a forest fitted on `fit + calibration` gives the shrink weight on `test` (the slice at
   the end of the window), then the forest is refitted on every labelled row of the window.
"""

from __future__ import annotations

import io
import platform
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shared import calibration as cal
from shared.errors import FailedPrecondition
from shared.features import FeatureSpec, feature_matrix, spec_for_frame
from shared.labels import CLASSES, LabelSpec, class_balance, make_labels
from shared.params import ForestParams

MIN_LABELLED_ROWS = 1000
TEST_FRACTION = 0.2
CALIBRATION_FRACTION = 0.2
ONNX_TOLERANCE = 1e-5
IMPORTANCE_REPEATS = 3
STOP_CHECK_SECONDS = 0.5  # with should_stop: about this much tree growing between two checks

Progress = Callable[[str, float], None]
ShouldStop = Callable[[], bool]
FitContext = Callable[[], AbstractContextManager]


class TrainingStopped(Exception):
    """Raised inside `train` when its `should_stop` callable answered True."""


@dataclass(frozen=True)
class Dataset:
    X: np.ndarray  # float32 (n, k), rows in time order
    y: np.ndarray  # int codes into CLASSES
    open_time_ms: np.ndarray
    spec: FeatureSpec


@dataclass(frozen=True)
class TrainedModel:
    spec: FeatureSpec
    label: LabelSpec
    params: ForestParams
    prior: np.ndarray
    shrink_weight: float
    metrics: dict[str, float]
    train_start_ms: int
    train_end_ms: int
    onnx_bytes: bytes
    sklearn_bytes: bytes
    versions: dict[str, str]


def min_candles_needed(spec: FeatureSpec, label: LabelSpec) -> int:
    """Candles a training window needs: warm-up, the unlabelled tail, and MIN_LABELLED_ROWS rows to learn from."""
    return spec.warmup_bars - 1 + label.horizon_bars + MIN_LABELLED_ROWS


def build_dataset(frame: pd.DataFrame, label: LabelSpec, base_spec: FeatureSpec = FeatureSpec()) -> Dataset:
    """Features and labels for every candle that has both (warm-up and the last h rows drop out)."""
    spec = spec_for_frame(frame, base_spec)
    cols = {c: frame[c].to_numpy(dtype=np.float64) for c in ("open", "high", "low", "close", "volume")}
    for c in ("funding_rate", "open_interest"):
        if c in frame:
            cols[c] = frame[c].to_numpy(dtype=np.float64)
    X = feature_matrix(cols, spec)
    y = make_labels(cols["close"], label)
    keep = (y >= 0) & np.isfinite(X).all(axis=1)
    return Dataset(
        X=X[keep].astype(np.float32),
        y=y[keep].astype(np.int64),
        open_time_ms=frame["open_time_ms"].to_numpy(dtype=np.int64)[keep],
        spec=spec,
    )


def first_input_ms(frame: pd.DataFrame, data: Dataset) -> int:
    """Open time of the first candle the model learned from: the warm-up history of its first training row.

    Rows without features (missing funding rate or open interest at the start) are not trained on, so the window a
    model reports starts where its data does, not where the request did.
    """
    times = frame["open_time_ms"].to_numpy(dtype=np.int64)
    first_row = int(np.searchsorted(times, data.open_time_ms[0]))
    return int(times[max(0, first_row - (data.spec.warmup_bars - 1))])


def purged_splits(n: int, horizon: int) -> tuple[slice, slice, slice]:
    """Index ranges (fit, calibration, test) in time order with a gap of `horizon` rows before each boundary."""
    test_start = n - round(n * TEST_FRACTION)
    cal_len = round(test_start * CALIBRATION_FRACTION)
    cal_start = test_start - horizon - cal_len
    fit_end = cal_start - horizon
    if fit_end < MIN_LABELLED_ROWS // 2 or cal_len < 100 or n - test_start < 100:
        raise FailedPrecondition(
            f"{n} labelled rows are too few to split into fit/calibration/test parts with a purge gap of "
            f"{horizon} rows; use a longer time range or a shorter horizon",
            field="start_time",
        )
    return slice(0, fit_end), slice(cal_start, cal_start + cal_len), slice(test_start, n)


def _require_all_classes(y: np.ndarray, where: str) -> None:
    present = set(np.unique(y).tolist())
    missing = [CLASSES[k] for k in range(len(CLASSES)) if k not in present]
    if missing:
        raise FailedPrecondition(
            f"the {where} part of the window has no '{', '.join(missing)}' labels; "
            "choose a smaller label.threshold, a longer horizon or a longer time range",
            field="label.threshold",
        )


def fit_forest(X, y, params: ForestParams, n_jobs: int, on_progress: Callable[[float], None],
               should_stop: ShouldStop | None = None, fit_context: FitContext | None = None):
    """Fit a RandomForest in chunks of trees (warm start), reporting the fraction of trees grown.

    Growing the same trees in chunks gives exactly the forest of one fit: scikit-learn draws each tree's seed
    from random_state in order either way. Without `should_stop` the trees grow in 10 chunks. With it, chunks are
    sized from the measured time per tree so that `should_stop()` is asked about every STOP_CHECK_SECONDS, and
    TrainingStopped is raised when it answers True. `fit_context()`, when given, wraps every fit call (e.g. a joblib
    backend that grows the trees elsewhere).
    """
    from contextlib import nullcontext

    from sklearn.ensemble import RandomForestClassifier

    context = fit_context or nullcontext

    total = params.n_estimators
    forest = RandomForestClassifier(n_jobs=n_jobs, warm_start=True, **{**params.sklearn_kwargs(), "n_estimators": 0})
    if should_stop is None:
        steps = min(10, total)
        for i in range(1, steps + 1):
            forest.set_params(n_estimators=round(total * i / steps))
            with context():
                forest.fit(X, y)
            on_progress(i / steps)
    else:
        grown, chunk, largest = 0, 1, max(1, total // 10)
        while grown < total:
            if should_stop():
                raise TrainingStopped("stopped on request while growing trees")
            target = min(total, grown + chunk)
            t0 = time.perf_counter()
            forest.set_params(n_estimators=target)
            with context():
                forest.fit(X, y)
            per_tree = (time.perf_counter() - t0) / (target - grown)
            grown = target
            on_progress(grown / total)
            chunk = max(1, min(largest, int(STOP_CHECK_SECONDS / max(per_tree, 1e-6))))
    forest.set_params(n_jobs=1)  # prediction and the stored model do not depend on the fitting machine
    return forest


def _stop_check(should_stop: ShouldStop | None) -> None:
    if should_stop is not None and should_stop():
        raise TrainingStopped("stopped on request while scoring feature importance")


def _proba(forest, X: np.ndarray) -> np.ndarray:
    """predict_proba with columns in CLASSES order."""
    p = forest.predict_proba(X)
    out = np.zeros((len(X), len(CLASSES)))
    out[:, forest.classes_.astype(int)] = p
    return out


def _prob_metrics(prefix: str, p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {
        f"{prefix}log_loss": cal.log_loss(p, y),
        f"{prefix}brier": cal.brier(p, y),
        f"{prefix}balanced_accuracy": cal.balanced_accuracy(p, y, len(CLASSES)),
    }


class _ShrunkForest:
    """Minimal estimator for sklearn's permutation_importance: forest probabilities shrunk toward the prior."""

    def __init__(self, forest, prior, weight):
        self.forest, self.prior, self.weight = forest, prior, weight

    def fit(self, X, y):  # pragma: no cover - required by the estimator protocol, never called
        return self

    def predict_proba(self, X):
        return cal.shrink_to_prior(_proba(self.forest, X), self.prior, self.weight)


def export_onnx(forest, n_features: int) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    onx = convert_sklearn(
        forest,
        initial_types=[("features", FloatTensorType([None, n_features]))],
        options={id(forest): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.graph.name = "mlsignal_forest"  # skl2onnx picks a random name; the same forest must give the same bytes
    return onx.SerializeToString()


def onnx_max_abs_diff(onnx_bytes: bytes, forest, X: np.ndarray) -> float:
    from shared.onnxmodel import OnnxForest

    served = OnnxForest(onnx_bytes).predict_proba(X)
    return float(np.max(np.abs(served - _proba(forest, X)))) if len(X) else 0.0


def library_versions() -> dict[str, str]:
    import onnxruntime
    import skl2onnx
    import sklearn

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "scikit-learn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def train(
    frame: pd.DataFrame,
    label: LabelSpec,
    params: ForestParams,
    progress: Progress = lambda stage, frac: None,
    n_jobs: int = -1,
    base_spec: FeatureSpec = FeatureSpec(),
    should_stop: ShouldStop | None = None,
    fit_context: FitContext | None = None,
) -> TrainedModel:
    """Train, evaluate, calibrate and export one model from a candle frame (see the module docstring).

    `should_stop`, when given, is asked between stages, between chunks of trees (about every STOP_CHECK_SECONDS)
    and between permutation-importance rounds; when it answers True, TrainingStopped is raised. `fit_context()`,
    when given, wraps every forest fit (and nothing else), e.g. ``lambda: joblib.parallel_config(backend="dask")``.
    """
    import joblib
    from sklearn.inspection import permutation_importance

    if should_stop is not None:
        report = progress

        def progress(stage: str, frac: float) -> None:
            if should_stop():
                raise TrainingStopped(f"stopped on request at stage {stage!r}")
            report(stage, frac)

    progress("features", 0.05)
    data = build_dataset(frame, label, base_spec)
    progress("labels", 0.10)
    n = len(data.y)
    if n < MIN_LABELLED_ROWS:
        raise FailedPrecondition(
            f"only {n} candles have both features and a label (need {MIN_LABELLED_ROWS}); "
            "use a longer time range",
            field="start_time",
        )
    fit, calib, test = purged_splits(n, label.horizon_bars)
    X, y = data.X, data.y
    _require_all_classes(y[fit], "fitting")

    def stage(name: str, lo: float, hi: float) -> Callable[[float], None]:
        return lambda f: progress(name, lo + (hi - lo) * f)

    # 1. Honest evaluation.
    progress("fitting", 0.10)
    forest = fit_forest(X[fit], y[fit], params, n_jobs, stage("fitting", 0.10, 0.40), should_stop,
                        fit_context)
    progress("evaluating", 0.40)
    prior_fit = cal.class_prior(y[fit], len(CLASSES))
    raw_calib = _proba(forest, X[calib])
    w_eval = cal.fit_shrink_weight(raw_calib, y[calib], prior_fit)
    raw_test = _proba(forest, X[test])
    p_test = cal.shrink_to_prior(raw_test, prior_fit, w_eval)
    yt = y[test]
    prior_test = np.tile(prior_fit, (len(yt), 1))
    metrics: dict[str, float] = {}
    metrics.update(_prob_metrics("", p_test, yt))
    metrics.update(_prob_metrics("prior_", prior_test, yt))
    metrics["raw_log_loss"] = cal.log_loss(raw_test, yt)
    metrics["log_loss_ratio"] = metrics["log_loss"] / metrics["prior_log_loss"]
    metrics["beats_prior"] = float(metrics["log_loss"] < metrics["prior_log_loss"])
    metrics["eval_shrink_weight"] = w_eval
    for name, frac in class_balance(yt).items():
        metrics[f"test_class_{name}"] = frac
    for name, frac in class_balance(y[fit]).items():
        metrics[f"train_class_{name}"] = frac
    metrics["n_fit"] = float(fit.stop - fit.start)
    metrics["n_calibration"] = float(calib.stop - calib.start)
    metrics["n_test"] = float(len(yt))
    metrics["test_start_ms"] = float(data.open_time_ms[test.start])

    def scoring(est, Xs, ys) -> float:
        _stop_check(should_stop)
        return -cal.log_loss(est.predict_proba(Xs), ys)

    imp = permutation_importance(
        _ShrunkForest(forest, prior_fit, w_eval),
        X[test],
        yt,
        scoring=scoring,
        n_repeats=IMPORTANCE_REPEATS,
        random_state=params.random_state,
        n_jobs=1,
    )
    for name, value in zip(data.spec.feature_names, imp.importances_mean, strict=True):
        metrics[f"importance.{name}"] = float(value)
    progress("evaluating", 0.50)

    # 2. The registered model: the shrink weight comes from both purged out-of-sample slices (the evaluation
    # forest on `calibration`, and a forest fitted on everything before `test` on `test`, the end of the window),
    # which halves its variance compared with one slice; then the forest is refitted on everything.
    head = slice(0, test.start - label.horizon_bars)
    _require_all_classes(y[head], "calibration-fit")
    forest_cal = fit_forest(X[head], y[head], params, n_jobs, stage("calibrating", 0.50, 0.70), should_stop,
                            fit_context)
    prior_head = cal.class_prior(y[head], len(CLASSES))
    weight = cal.fit_shrink_weight(
        np.vstack([raw_calib, _proba(forest_cal, X[test])]),
        np.concatenate([y[calib], yt]),
        np.vstack([np.tile(prior_fit, (len(raw_calib), 1)), np.tile(prior_head, (len(yt), 1))]),
    )
    metrics["shrink_weight"] = weight
    del forest_cal
    final = fit_forest(X, y, params, n_jobs, stage("refitting", 0.70, 0.92), should_stop, fit_context)
    prior_all = cal.class_prior(y, len(CLASSES))

    progress("saving", 0.92)
    onnx_bytes = export_onnx(final, X.shape[1])
    metrics["onnx_max_abs_diff"] = onnx_max_abs_diff(onnx_bytes, final, X[test])
    if not metrics["onnx_max_abs_diff"] <= ONNX_TOLERANCE:
        raise RuntimeError(
            f"the ONNX export disagrees with scikit-learn by {metrics['onnx_max_abs_diff']:.3g} "
            f"(tolerance {ONNX_TOLERANCE}); refusing to register it"
        )
    buf = io.BytesIO()
    joblib.dump(final, buf, compress=3)
    return TrainedModel(
        spec=data.spec,
        label=label,
        params=params,
        prior=prior_all,
        shrink_weight=weight,
        metrics=metrics,
        train_start_ms=first_input_ms(frame, data),
        train_end_ms=int(frame["open_time_ms"].iloc[-1]),
        onnx_bytes=onnx_bytes,
        sklearn_bytes=buf.getvalue(),
        versions=library_versions(),
    )
