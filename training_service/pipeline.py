"""The training pipeline: candles in, an evaluated, calibrated, ONNX-exported forest out.

Labels follow the request's `LabelSpec` (fixed horizon or triple barrier); a label whose horizon spans missing
candles is dropped, and the model reports how many were (`dropped_gap_labels`) and the holes in its window
(`window_gaps`, `window_missing_candles`).

Time order is respected everywhere. The labelled rows are split as

    [ fit | gap | calibration | gap | test ]      gap = horizon_bars rows (purge: labels look ahead h bars)

1. evaluation: a forest fitted on `fit`, shrunk toward the prior with a weight fitted on `calibration`, scored on
   `test` only, next to the class-prior baseline; permutation importance and a reliability diagram on `test`;
2. cross-validation: purged, embargoed k-fold CV over the whole window (training_service.evaluation) gives the
   spread of the log-loss ratio (`cv_folds`, `cv_log_loss_ratio_mean`, `cv_log_loss_ratio_std`, one
   `cv_fold_<k>_log_loss_ratio` per fold);
3. the registered model: a forest fitted on `fit + calibration` gives the shrink weight on `test` (the slice at
   the end of the window), then the forest is refitted on every labelled row of the window.

Trust signals are fitted on the same rows as the forests they accompany. The registered model's out-of-distribution
score (shared.ood) and feature deciles (shared.drift) are fitted on every labelled row of the window, like its forest
(`ood_threshold`, `ood_rate_train`: about 1 % by construction). The held-back numbers use a score fitted on `fit`
only, the evaluation forest's rows, so the `test` rows are as new to the score as to the forest: `ood_rate_test`
(share of test rows flagged), `test_ood_rows`, the log-loss ratio (model / prior) of the flagged and of the unflagged
test rows (`test_ood_log_loss_ratio`, `test_in_distribution_log_loss_ratio`; a key is left out when its group is
empty, since metrics hold no NaN), `test_psi_max` (the largest population stability index of a feature over the test
rows against the deciles of `fit`) and `test_expected_log_loss` (the mean entropy of the test probabilities, to set
against `log_loss`).
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
from shared import drift as drift_stats
from shared.drift import DriftModel, fit_drift
from shared.errors import FailedPrecondition
from shared.features import TRAINING_SPEC, FeatureSpec, feature_matrix, spec_for_frame
from shared.labels import CLASSES, LabelSpec, class_balance, make_labels
from shared.ood import OodModel, fit_ood
from shared.params import UNIQUENESS, ForestParams
from training_service import evaluation

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
    timeframe_ms: int = 0
    dropped_gap_labels: int = 0  # labels dropped because their horizon spans missing candles
    window_gaps: int = 0  # holes in the window's candles
    window_missing_candles: int = 0  # candles missing in those holes


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
    # The held-out probabilities the shrink weight was fitted on: (raw forest probabilities, labels, prior per row).
    # Not part of the artifact; for research on calibration methods.
    calibration_rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # Trust signals fitted on the registered forest's rows: the out-of-distribution score and the feature deciles.
    ood: OodModel | None = None
    drift: DriftModel | None = None


def min_candles_needed(spec: FeatureSpec, label: LabelSpec) -> int:
    """Candles a training window needs: warm-up, the unlabelled tail, and MIN_LABELLED_ROWS rows to learn from."""
    return spec.warmup_bars - 1 + label.horizon_bars + MIN_LABELLED_ROWS


def infer_timeframe_ms(open_time_ms: np.ndarray) -> int:
    """The candle spacing of sorted open times: the smallest step between two of them."""
    steps = np.diff(np.asarray(open_time_ms, dtype=np.int64))
    steps = steps[steps > 0]
    if steps.size == 0:
        raise ValueError("cannot tell the timeframe from fewer than two distinct open times")
    return int(steps.min())


def build_dataset(frame: pd.DataFrame, label: LabelSpec, base_spec: FeatureSpec = TRAINING_SPEC,
                  timeframe_ms: int | None = None) -> Dataset:
    """Features and labels for every candle that has both (warm-up and the last h rows drop out, and so does every
    label whose horizon spans missing candles). `timeframe_ms` defaults to the candles' spacing."""
    spec = spec_for_frame(frame, base_spec)
    cols = {c: frame[c].to_numpy(dtype=np.float64) for c in ("open", "high", "low", "close", "volume")}
    for c in ("funding_rate", "open_interest"):
        if c in frame:
            cols[c] = frame[c].to_numpy(dtype=np.float64)
    times = frame["open_time_ms"].to_numpy(dtype=np.int64)
    tf_ms = int(timeframe_ms) if timeframe_ms else infer_timeframe_ms(times)
    X = feature_matrix(cols, spec)
    y_all = make_labels(cols["close"], label)
    y = make_labels(cols["close"], label, times, tf_ms)
    finite = np.isfinite(X).all(axis=1)
    keep = (y >= 0) & finite
    steps = np.diff(times)
    holes = steps > tf_ms
    return Dataset(
        X=X[keep].astype(np.float32),
        y=y[keep].astype(np.int64),
        open_time_ms=times[keep],
        spec=spec,
        timeframe_ms=tf_ms,
        dropped_gap_labels=int(((y_all >= 0) & (y < 0) & finite).sum()),
        window_gaps=int(holes.sum()),
        window_missing_candles=int((steps[holes] // tf_ms - 1).sum()),
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
               should_stop: ShouldStop | None = None, fit_context: FitContext | None = None,
               uniqueness: float | None = None):
    """Fit a RandomForest in chunks of trees (warm start), reporting the fraction of trees grown.

    Growing the same trees in chunks gives exactly the forest of one fit: scikit-learn draws each tree's seed
    from random_state in order either way. Without `should_stop` the trees grow in 10 chunks. With it, chunks are
    sized from the measured time per tree so that `should_stop()` is asked about every STOP_CHECK_SECONDS, and
    TrainingStopped is raised when it answers True. `fit_context()`, when given, wraps every fit call (e.g. a joblib
    backend that grows the trees elsewhere). `uniqueness` is the average label uniqueness of these rows, which
    `max_samples="uniqueness"` needs.
    """
    from contextlib import nullcontext

    from sklearn.ensemble import RandomForestClassifier

    context = fit_context or nullcontext

    total = params.n_estimators
    kwargs = {**params.sklearn_kwargs(uniqueness), "n_estimators": 0}
    forest = RandomForestClassifier(n_jobs=n_jobs, warm_start=True, **kwargs)
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


def forest_proba(forest, X: np.ndarray) -> np.ndarray:
    """`forest.predict_proba(X)` bit for bit, without its per-tree dispatch (about 0.15 ms a tree, most of a
    prediction's cost on a few thousand rows): the trees' leaf fractions summed in the forest's order, then divided by
    the number of trees, as scikit-learn does with one job."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    k = len(forest.classes_)
    out = np.zeros((len(X), k), dtype=np.float64)
    for tree in forest.estimators_:
        out += tree.tree_.predict(X)[:, :k]
    out /= len(forest.estimators_)
    return out


def class_proba(forest, X: np.ndarray) -> np.ndarray:
    """predict_proba with columns in CLASSES order."""
    p = forest_proba(forest, X)
    out = np.zeros((len(X), len(CLASSES)))
    out[:, forest.classes_.astype(int)] = p
    return out


def _prob_metrics(prefix: str, p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {
        f"{prefix}log_loss": cal.log_loss(p, y),
        f"{prefix}brier": cal.brier(p, y),
        f"{prefix}balanced_accuracy": cal.balanced_accuracy(p, y, len(CLASSES)),
    }


def _held_back_trust(X_fit: np.ndarray, X_test: np.ndarray, p_test: np.ndarray, prior_test: np.ndarray,
                     y_test: np.ndarray) -> dict[str, float]:
    """The trust signals on the held-back rows, fitted on the evaluation forest's rows (see the module docstring)."""
    ood = fit_ood(X_fit)
    flagged = ood.flags(X_test)
    out = {"ood_rate_test": float(np.mean(flagged)), "test_ood_rows": float(np.count_nonzero(flagged))}
    for key, rows in (("test_ood_log_loss_ratio", flagged), ("test_in_distribution_log_loss_ratio", ~flagged)):
        if rows.any():
            out[key] = cal.log_loss(p_test[rows], y_test[rows]) / cal.log_loss(prior_test[rows], y_test[rows])
    drift = fit_drift(X_fit)
    out["test_psi_max"] = float(np.max(drift.psi(drift_stats.bin_counts(drift.bins(X_test)))))
    out["test_expected_log_loss"] = drift_stats.expected_log_loss(p_test)
    return out


class _ShrunkForest:
    """Minimal estimator for sklearn's permutation_importance: forest probabilities shrunk toward the prior."""

    def __init__(self, forest, prior, weight):
        self.forest, self.prior, self.weight = forest, prior, weight

    def fit(self, X, y):  # pragma: no cover - required by the estimator protocol, never called
        return self

    def predict_proba(self, X):
        return cal.shrink_to_prior(class_proba(self.forest, X), self.prior, self.weight)


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
    return float(np.max(np.abs(served - class_proba(forest, X)))) if len(X) else 0.0


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
    base_spec: FeatureSpec = TRAINING_SPEC,
    should_stop: ShouldStop | None = None,
    fit_context: FitContext | None = None,
    timeframe_ms: int | None = None,
    cv_folds: int = evaluation.DEFAULT_CV_FOLDS,
    importance_repeats: int = IMPORTANCE_REPEATS,
) -> TrainedModel:
    """Train, evaluate, calibrate and export one model from a candle frame (see the module docstring).

    `should_stop`, when given, is asked between stages, between chunks of trees (about every STOP_CHECK_SECONDS)
    and between permutation-importance rounds; when it answers True, TrainingStopped is raised. `fit_context()`,
    when given, wraps every forest fit (and nothing else), e.g. ``lambda: joblib.parallel_config(backend="dask")``.
    `timeframe_ms` is the candles' timeframe (default: their spacing), which tells where candles are missing;
    `cv_folds` the folds of the cross-validation (fewer when the window is too short, 0 for none);
    `importance_repeats` the rounds of permutation importance (0 for none).
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
    data = build_dataset(frame, label, base_spec, timeframe_ms)
    progress("labels", 0.10)
    n = len(data.y)
    if n < MIN_LABELLED_ROWS:
        raise FailedPrecondition(
            f"only {n} candles have both features and a label (need {MIN_LABELLED_ROWS}); "
            "use a longer time range",
            field="start_time",
        )
    h = label.horizon_bars
    fit, calib, test = purged_splits(n, h)
    X, y = data.X, data.y
    _require_all_classes(y[fit], "fitting")
    uniq = (evaluation.average_uniqueness(data.open_time_ms, h, data.timeframe_ms)
            if params.max_samples == UNIQUENESS else None)

    def stage(name: str, lo: float, hi: float) -> Callable[[float], None]:
        return lambda f: progress(name, lo + (hi - lo) * f)

    def forest_on(rows, name: str, lo: float, hi: float):
        u = None if uniq is None else float(np.mean(uniq[rows]))
        return fit_forest(X[rows], y[rows], params, n_jobs, stage(name, lo, hi), should_stop, fit_context, u)

    # 1. Honest evaluation on the held-back test part.
    progress("fitting", 0.10)
    forest = forest_on(fit, "fitting", 0.10, 0.30)
    progress("evaluating", 0.30)
    prior_fit = cal.class_prior(y[fit], len(CLASSES))
    raw_calib = class_proba(forest, X[calib])
    w_eval = cal.fit_shrink_weight(raw_calib, y[calib], prior_fit)
    raw_test = class_proba(forest, X[test])
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
    for name, frac in class_balance(y).items():
        metrics[f"window_class_{name}"] = frac
    metrics["n_rows"] = float(n)
    metrics["n_fit"] = float(fit.stop - fit.start)
    metrics["n_calibration"] = float(calib.stop - calib.start)
    metrics["n_test"] = float(len(yt))
    metrics["test_start_ms"] = float(data.open_time_ms[test.start])
    metrics["dropped_gap_labels"] = float(data.dropped_gap_labels)
    metrics["window_gaps"] = float(data.window_gaps)
    metrics["window_missing_candles"] = float(data.window_missing_candles)
    metrics.update(evaluation.reliability(p_test, yt, CLASSES))
    metrics.update(_held_back_trust(X[fit], X[test], p_test, prior_test, yt))

    def scoring(est, Xs, ys) -> float:
        _stop_check(should_stop)
        return -cal.log_loss(est.predict_proba(Xs), ys)

    if importance_repeats > 0:
        imp = permutation_importance(
            _ShrunkForest(forest, prior_fit, w_eval),
            X[test],
            yt,
            scoring=scoring,
            n_repeats=importance_repeats,
            random_state=params.random_state,
            n_jobs=1,
        )
        for name, value in zip(data.spec.feature_names, imp.importances_mean, strict=True):
            metrics[f"importance.{name}"] = float(value)
    del forest
    progress("evaluating", 0.36)

    # 2. Purged, embargoed k-fold cross-validation over the whole window: the spread of the log-loss ratio.
    warmup = data.spec.warmup_bars
    folds = evaluation.folds_that_fit(n, h, cv_folds, warmup_bars=warmup) if cv_folds >= 2 else []
    ratios = []
    for k, fold in enumerate(folds):
        lo = 0.36 + 0.24 * k / len(folds)
        f_forest = forest_on(fold.fit, "cross-validating", lo, lo + 0.24 / len(folds))
        f_prior = cal.class_prior(y[fold.fit], len(CLASSES))
        f_w = cal.fit_shrink_weight(class_proba(f_forest, X[fold.calibration]), y[fold.calibration], f_prior)
        f_p = cal.shrink_to_prior(class_proba(f_forest, X[fold.test]), f_prior, f_w)
        del f_forest
        f_y = y[fold.test]
        ll, prior_ll = cal.log_loss(f_p, f_y), cal.log_loss(np.tile(f_prior, (len(f_y), 1)), f_y)
        ratios.append(ll / prior_ll)
        metrics[f"cv_fold_{k}_log_loss"] = ll
        metrics[f"cv_fold_{k}_prior_log_loss"] = prior_ll
        metrics[f"cv_fold_{k}_log_loss_ratio"] = ll / prior_ll
        metrics[f"cv_fold_{k}_shrink_weight"] = f_w
        metrics[f"cv_fold_{k}_start_ms"] = float(data.open_time_ms[fold.test[0]])
        metrics[f"cv_fold_{k}_end_ms"] = float(data.open_time_ms[fold.test[-1]])
        metrics[f"cv_fold_{k}_n_fit"] = float(len(fold.fit))
        metrics[f"cv_fold_{k}_n_test"] = float(len(fold.test))
    metrics["cv_folds"] = float(len(folds))
    if ratios:
        metrics["cv_log_loss_ratio_mean"] = float(np.mean(ratios))
        metrics["cv_log_loss_ratio_std"] = float(np.std(ratios, ddof=1)) if len(ratios) > 1 else 0.0
        metrics["cv_embargo_rows"] = float(evaluation.embargo_rows(n, warmup))
    progress("cross-validating", 0.60)

    # 3. The registered model: the shrink weight comes from both purged out-of-sample slices (the evaluation
    # forest on `calibration`, and a forest fitted on everything before `test` on `test`, the end of the window),
    # which halves its variance compared with one slice; then the forest is refitted on everything.
    head = slice(0, test.start - h)
    _require_all_classes(y[head], "calibration-fit")
    forest_cal = forest_on(head, "calibrating", 0.60, 0.72)
    prior_head = cal.class_prior(y[head], len(CLASSES))
    cal_raw = np.vstack([raw_calib, class_proba(forest_cal, X[test])])
    cal_y = np.concatenate([y[calib], yt])
    cal_prior = np.vstack([np.tile(prior_fit, (len(raw_calib), 1)), np.tile(prior_head, (len(yt), 1))])
    weight = cal.fit_shrink_weight(cal_raw, cal_y, cal_prior)
    metrics["shrink_weight"] = weight
    del forest_cal
    final = forest_on(slice(0, n), "refitting", 0.72, 0.92)
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
    ood = fit_ood(X)
    metrics["ood_threshold"] = ood.threshold
    metrics["ood_rate_train"] = ood.rate_train
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
        calibration_rows=(cal_raw, cal_y, cal_prior),
        ood=ood,
        drift=fit_drift(X),
    )
