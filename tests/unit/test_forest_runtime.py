"""The native forest runtime: scikit-learn's predict_proba bit for bit, read from the joblib file without unpickling
it, and the model store's choice between it and ONNX Runtime (MLSIGNAL_FOREST_RUNTIME)."""

from __future__ import annotations

import io
import logging
import os
import pickle
from dataclasses import replace
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier

from inference_service.model_store import ModelStore, load_model
from shared import forest_runtime
from shared.artifacts import sha256_bytes, write_atomic
from shared.calibration import shrink_to_prior
from shared.errors import DataLoss
from shared.features import FeatureSpec
from shared.forest_runtime import ForestArtifactError, NativeForest, float32_floor, read_forest
from shared.labels import CLASSES, LabelSpec
from shared.params import ForestParams
from shared.store.registry import SERVING, ModelRecord
from training_service.pipeline import export_onnx, forest_proba

N_FEATURES = len(FeatureSpec().feature_names)


def _joblib_bytes(forest) -> bytes:
    buf = io.BytesIO()
    joblib.dump(forest, buf, compress=3)  # as training stores it
    return buf.getvalue()


def _data(seed: int, n: int = 1500, n_features: int = N_FEATURES) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features))
    y = (X[:, 0] + X[:, 1] * X[:, 2] + rng.normal(size=n) > 0).astype(int) + (X[:, 3] > 0.8)
    return X, y


def _fit(seed: int = 0, **params) -> tuple[RandomForestClassifier, np.ndarray]:
    X, y = _data(seed)
    kw = {"n_estimators": 12, "max_depth": 6, "min_samples_leaf": 25, "random_state": seed, "n_jobs": 1} | params
    forest = RandomForestClassifier(**kw).fit(X[:1000].astype(np.float32), y[:1000])
    return forest, X[1000:]


def _native(forest, **kw) -> NativeForest:
    return NativeForest(read_forest(_joblib_bytes(forest)), **kw)


@pytest.mark.parametrize("params", [
    {},  # the default shape: depth 6, min_samples_leaf 25
    {"class_weight": "balanced", "max_samples": 0.6},  # leaf values that are not simple fractions
    {"max_depth": None, "min_samples_leaf": 1},  # deep trees: the node walk
])
def test_probabilities_are_scikit_learns_bit_for_bit(params):
    forest, X = _fit(1, **params)
    native = _native(forest)
    got = native.predict_proba(X)
    assert got.dtype == np.float64 and got.shape == (len(X), 3)
    assert np.array_equal(got, forest.predict_proba(X.astype(np.float32)))
    assert np.array_equal(got, forest_proba(forest, X))
    # a row alone, and in batches of every remainder of the kernel's row blocks, gives the same bits
    alone = np.vstack([native.predict_proba(X[i:i + 1]) for i in range(40)])
    assert np.array_equal(alone, got[:40])
    for size in (3, 8, 13, 17):
        assert np.array_equal(native.predict_proba(X[:size]), got[:size])
    assert native.predict_proba(X[:0]).shape == (0, 3)
    # ONNX Runtime's float32 answer is near, not equal
    onnx = forest_runtime_onnx(forest).predict_proba(X)
    assert np.max(np.abs(onnx - got)) < 1e-5


def forest_runtime_onnx(forest):
    from shared.onnxmodel import OnnxForest

    return OnnxForest(export_onnx(forest, forest.n_features_in_))


def test_the_complete_layout_and_the_node_walk_agree():
    forest, X = _fit(2)
    complete, nodes = _native(forest), _native(forest, complete_max_depth=0)
    assert complete.depth == 6 and nodes.depth == -1
    assert np.array_equal(complete.predict_proba(X), nodes.predict_proba(X))


def test_features_equal_to_the_float32_neighbours_of_every_threshold_split_as_scikit_learn():
    """scikit-learn compares float32 features with float64 thresholds; ONNX stores float32 thresholds. Rows whose
    features sit exactly on, just below and just above each threshold's float32 neighbours, including adjacent
    float32 training values (whose midpoint no float32 represents), go the same way as in scikit-learn."""
    rng = np.random.default_rng(3)
    # adjacent float32 values 1 ulp (2**-22) apart, more than scikit-learn's smallest split (1e-7)
    base = np.float32(2.0) + np.arange(40, dtype=np.float32) * np.float32(2**-22)
    X = rng.choice(base, size=(800, 4)).astype(np.float32)
    y = rng.integers(0, 3, 800)
    forest = RandomForestClassifier(n_estimators=6, max_depth=5, random_state=0, n_jobs=1).fit(X, y)
    flat = read_forest(_joblib_bytes(forest))
    t = flat.threshold[flat.left >= 0]
    assert np.any(t.astype(np.float32).astype(np.float64) > t), "some threshold rounds up in float32"
    lo = float32_floor(t)
    probes = np.unique(np.concatenate([lo, np.nextafter(lo, np.float32(np.inf)), np.nextafter(lo, np.float32(0))]))
    Xp = np.repeat(probes[:, None], 4, axis=1).astype(np.float32)
    Xp = np.vstack([Xp, rng.choice(probes, size=(400, 4))]).astype(np.float32)
    native = NativeForest(flat)
    assert np.array_equal(native.predict_proba(Xp), forest.predict_proba(Xp))


def test_float32_floor_is_the_largest_float32_not_above():
    t = np.array([1.0 + 2**-30, 1.0 - 2**-30, 0.5, -1.0 - 2**-30, 1e300, -1e300, 3.4028235e38])
    f = float32_floor(t)
    assert f.dtype == np.float32
    assert np.all(f.astype(np.float64) <= t)
    with np.errstate(over="ignore"):  # the float32 above the largest is infinity
        assert np.all(np.nextafter(f, np.float32(np.inf)).astype(np.float64) > t)


def test_missing_values_go_where_each_node_says_and_infinities_compare():
    forest, X = _fit(4)
    X = X[:60].copy()
    X[::3, 5] = np.nan
    X[::7, :] = np.nan
    X[1::5, 2] = np.inf
    X[2::5, 1] = -np.inf
    native = _native(forest)
    assert np.array_equal(native.predict_proba(X), forest_proba(forest, X))  # tree_.predict takes infinities
    finite_or_nan = ~np.isinf(X).any(axis=1)
    assert np.array_equal(native.predict_proba(X[finite_or_nan]), forest.predict_proba(X[finite_or_nan]))


def test_the_reader_never_calls_what_a_file_names(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for data in (pickle.dumps(Payload()), _joblib_bytes({"forest": Payload()})):
        with pytest.raises(ForestArtifactError, match=r"refers to (posix|os)\."):
            read_forest(data)
    assert not marker.exists()
    with pytest.raises(ForestArtifactError, match="not a RandomForestClassifier"):
        read_forest(_joblib_bytes([1, 2, 3]))
    with pytest.raises(ForestArtifactError, match="neither"):
        read_forest(b"PK\x03\x04 not a joblib file")
    whole = _joblib_bytes(_fit(0, n_estimators=2)[0])
    with pytest.raises(ForestArtifactError, match=r"ends inside an array|cannot be read"):
        read_forest(whole[: len(whole) // 2])


def test_a_malformed_tree_is_refused():
    forest, _ = _fit(5, n_estimators=2)
    tree = forest.estimators_[1].tree_
    state = tree.__getstate__()
    nodes = state["nodes"].copy()
    nodes["left_child"][0] = 0  # the root its own child: a walk would never end
    tree.__setstate__({**state, "nodes": nodes})
    with pytest.raises(ForestArtifactError, match="child index"):
        read_forest(_joblib_bytes(forest))
    forest, _ = _fit(5, n_estimators=2)
    state = forest.estimators_[0].tree_.__getstate__()
    nodes = state["nodes"].copy()
    nodes["feature"][0] = N_FEATURES + 3
    forest.estimators_[0].tree_.__setstate__({**state, "nodes": nodes})
    with pytest.raises(ForestArtifactError, match="split feature"):
        read_forest(_joblib_bytes(forest))


def test_the_kernel_library_is_built_here_and_its_sha256_recorded():
    forest_runtime.native_library()
    sha = forest_runtime.library_sha256()
    assert sha is not None and len(sha) == 64 and int(sha, 16) >= 0


# -- the model store's choice --------------------------------------------------------------------------------------
def _register_files(model_dir: Path, forest, model_id: str = "m1") -> ModelRecord:
    onnx = export_onnx(forest, N_FEATURES)
    skl = _joblib_bytes(forest)
    return ModelRecord(
        model_id=model_id, symbol="BTC/USD", timeframe="1h", created_at_ms=0, train_start_ms=0, train_end_ms=1,
        label=LabelSpec(), feature_spec=FeatureSpec(), params=ForestParams(n_estimators=12), classes=CLASSES,
        prior=(0.3, 0.4, 0.3), shrink_weight=0.6, metrics={}, artifact=f"{model_id}.onnx",
        sha256=write_atomic(model_dir / f"{model_id}.onnx", onnx), sklearn_artifact=f"{model_id}.joblib",
        sklearn_sha256=write_atomic(model_dir / f"{model_id}.joblib", skl), stage=SERVING,
    )


def test_served_probabilities_are_scikit_learns_then_shrunk(tmp_path):
    forest, X = _fit(6)
    record = _register_files(tmp_path, forest)
    model = load_model(record, tmp_path, "native")
    assert model.runtime == "native"
    expected = shrink_to_prior(forest.predict_proba(X.astype(np.float32)), np.array(record.prior), 0.6)
    assert np.max(np.abs(model.predict_proba(X) - expected)) <= 1e-12
    assert np.array_equal(model.predict_proba(X), expected)
    onnx = load_model(record, tmp_path, "onnx")
    assert onnx.runtime == "onnx"
    assert np.max(np.abs(onnx.predict_proba(X) - expected)) < 1e-5
    assert load_model(record, tmp_path, "auto").runtime == "native"


def test_without_a_usable_scikit_learn_file_auto_serves_onnx_and_native_refuses(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="inference_service.model_store")
    forest, _ = _fit(7)
    record = _register_files(tmp_path, forest)
    no_file = replace(record, sklearn_artifact="", sklearn_sha256="")
    tampered = replace(record, sklearn_sha256=sha256_bytes(b"something else"))
    for bad, why in ((no_file, "no scikit-learn artifact"), (tampered, "sha256")):
        assert load_model(bad, tmp_path, "auto").runtime == "onnx"
        assert why in caplog.text
        with pytest.raises(DataLoss, match=f"MLSIGNAL_FOREST_RUNTIME=native.*{why}"):
            load_model(bad, tmp_path, "native")


def test_without_a_compiler_auto_falls_back_with_a_log_line_and_native_refuses(tmp_path, caplog, monkeypatch):
    forest, _ = _fit(8)
    record = _register_files(tmp_path, forest)
    monkeypatch.setattr(forest_runtime, "_lib", None)
    monkeypatch.setattr(forest_runtime, "_lib_error", None)
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-dir"))
    monkeypatch.setattr("inference_service.model_store._fallback_logged", False)
    assert load_model(record, tmp_path, "auto").runtime == "onnx"
    assert "no C compiler" in caplog.text and "served through ONNX Runtime" in caplog.text
    with pytest.raises(DataLoss, match="MLSIGNAL_FOREST_RUNTIME=native, but no C compiler"):
        load_model(record, tmp_path, "native")


def test_the_store_takes_the_setting(tmp_path, monkeypatch):
    from shared.store.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path}/x.db")
    try:
        monkeypatch.setenv("MLSIGNAL_FOREST_RUNTIME", "onnx")
        assert ModelStore(engine, tmp_path).forest_runtime == "onnx"
        monkeypatch.delenv("MLSIGNAL_FOREST_RUNTIME")
        assert ModelStore(engine, tmp_path).forest_runtime == "auto"
        assert ModelStore(engine, tmp_path, forest_runtime="native").forest_runtime == "native"
        with pytest.raises(ValueError, match="forest_runtime"):
            ModelStore(engine, tmp_path, forest_runtime="fast")
    finally:
        engine.dispose()
    monkeypatch.setenv("MLSIGNAL_FOREST_RUNTIME", "gpu")
    from shared.settings import Settings

    with pytest.raises(ValueError, match="MLSIGNAL_FOREST_RUNTIME='gpu'"):
        Settings.from_env()


@pytest.mark.parametrize(("n_features", "n_classes"), [(5, 2), (40, 3), (90, 5), (140, 3)])
def test_any_feature_count_and_class_count_the_kernel_takes(n_features, n_classes):
    """Row strides of 16, 64 and 128 floats, rows wider than that, and leaves of 2 to 5 classes."""
    rng = np.random.default_rng(n_features)
    X = rng.normal(size=(700, n_features))
    y = (np.abs(X[:, 0] + X[:, 1]) * n_classes).astype(int) % n_classes
    forest = RandomForestClassifier(n_estimators=5, max_depth=5, min_samples_leaf=5, random_state=0, n_jobs=1)
    forest.fit(X[:400].astype(np.float32), y[:400])
    native = _native(forest)
    assert np.array_equal(native.predict_proba(X[400:]), forest.predict_proba(X[400:].astype(np.float32)))


def test_a_kernel_built_ahead_of_time_loads_only_when_its_record_and_ownership_vouch_for_it(tmp_path):
    """Without a compiler (an image without build tools) the kernel built ahead of time is used: only its own
    source's build, only with the recorded sha256, only when root owns it and alone can write it."""
    import subprocess
    import sys

    prebuilt = tmp_path / "kernel"
    sha = forest_runtime.build_prebuilt(str(prebuilt))
    forest, X = _fit(9)
    (tmp_path / "forest.joblib").write_bytes(_joblib_bytes(forest))
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "want.npy", forest.predict_proba(X.astype(np.float32)))
    script = (
        "import sys, numpy as np\n"
        "import shared.forest_runtime as fr\n"
        f"fr.PREBUILT_DIR = {str(prebuilt)!r}\n"
        "try:\n"
        "    native = fr.NativeForest(fr.read_forest(open(sys.argv[1] + '/forest.joblib', 'rb').read()))\n"
        "except fr.NativeUnavailable as exc:\n"
        "    print('UNAVAILABLE', exc); raise SystemExit(0)\n"
        "X, want = np.load(sys.argv[1] + '/X.npy'), np.load(sys.argv[1] + '/want.npy')\n"
        "print('LOADED', fr.library_sha256(), np.array_equal(native.predict_proba(X), want))\n"
    )

    def run() -> str:
        env = {**os.environ, "PATH": str(tmp_path / "no-compiler-here")}
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True,
                              text=True, timeout=120, cwd=Path(__file__).resolve().parents[2], check=True)
        return proc.stdout.strip()

    if os.geteuid() == 0:
        assert run() == f"LOADED {sha} True"
    else:
        assert "not owned by root" in run()
    os.chmod(prebuilt / forest_runtime.PREBUILT_LIBRARY, 0o666)
    assert "not owned by root and writable by root only" in run()
    os.chmod(prebuilt / forest_runtime.PREBUILT_LIBRARY, 0o644)
    if os.geteuid() == 0:
        with open(prebuilt / forest_runtime.PREBUILT_LIBRARY, "ab") as fh:
            fh.write(b"\0")
        assert f"its record says {sha}" in run()
        record = prebuilt / forest_runtime.PREBUILT_RECORD
        record.write_text(record.read_text().replace('"source_sha256": "', '"source_sha256": "0'))
        assert "of another source version" in run()
    (prebuilt / forest_runtime.PREBUILT_LIBRARY).unlink()
    assert "no kernel built ahead of time" in run()


def test_models_registered_from_the_same_file_share_one_native_forest(tmp_path):
    forest, X = _fit(10)
    record = _register_files(tmp_path, forest, "a")
    copy = replace(record, model_id="b")  # another registration of the same files
    first, second = load_model(record, tmp_path, "native"), load_model(copy, tmp_path, "native")
    assert first.forest is second.forest
    assert np.array_equal(first.predict_proba(X), second.predict_proba(X))
    other = load_model(_register_files(tmp_path, _fit(11)[0], "c"), tmp_path, "native")
    assert other.forest is not first.forest
    (tmp_path / "a.joblib").unlink()  # the file is still read and verified for every load
    with pytest.raises(DataLoss, match="missing"):
        load_model(copy, tmp_path, "native")
