"""Serving a forest through ONNX Runtime: no pickle, microseconds per row, identical results for any batch size.

The portable way to execute a registered forest, and inference's fallback when the native forest runtime
(`shared.forest_runtime`) cannot run (MLSIGNAL_FOREST_RUNTIME); its float32 arithmetic differs from scikit-learn's
probabilities by up to about 1e-6.

One session per model, single-threaded per call: ONNX Runtime's tree ensemble then sums trees in a fixed order,
so a row's probabilities are bit-identical whether it is predicted alone or inside a batch (the stream == batch
guarantee rests on this).
"""

from __future__ import annotations

import numpy as np


class OnnxForest:
    def __init__(self, onnx_bytes: bytes):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.n_features = int(self._session.get_inputs()[0].shape[1])
        self._outputs = ["probabilities"]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Raw forest probabilities (n, 3) as float64, for float features (cast to float32 like scikit-learn)."""
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        return self._session.run(self._outputs, {self._input: X32})[0].astype(np.float64)
