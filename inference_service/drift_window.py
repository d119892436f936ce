"""The drift window: per model, the decile bin of every feature and the OOD flag of the last MLSIGNAL_DRIFT_WINDOW
distinct candles this replica served with it, for `LivePerformance.drift` and `ood_rate` and their metrics.

Fed by the prediction journal's writer thread (`inference_service.journal`), never on the answering path: the
features a prediction was computed from travel with it (`Predictions.features`) and are binned here against the
model's training deciles (`shared.drift`). A candle served again (a forming candle, several streams of one market)
counts once, in its last version. The window is in memory: each replica reports what it served, and a restart
starts it again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from inference_service.domain import Predictions
from shared.drift import bin_counts
from shared.store.registry import ModelRecord

DEFAULT_WINDOW = 1000


@dataclass(frozen=True)
class DriftView:
    candles: int  # distinct candles in the window
    psi: np.ndarray | None  # (k,) per feature, None when the model has no stored deciles
    ood_rate: float  # NaN when no candle of the window has a score


class _Model:
    __slots__ = ("bins", "ood")

    def __init__(self) -> None:
        self.bins: OrderedDict[int, np.ndarray] = OrderedDict()  # open time -> int8 bins (k,)
        self.ood: dict[int, float] = {}  # open time -> 1.0 flagged, 0.0 not, NaN no score


class DriftWindows:
    """The last `size` distinct candles each model served: feature bins and OOD flags."""

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if size < 1:
            raise ValueError(f"the drift window must hold at least one candle, got {size}")
        self.size = size
        self._lock = threading.Lock()
        self._models: dict[str, _Model] = {}
        self._records: dict[str, ModelRecord] = {}

    def add(self, record: ModelRecord, predictions: Predictions) -> None:
        """Add the ready candles of one answer (called by the journal's writer thread)."""
        x = predictions.features
        if x is None or not len(x):
            return
        n = len(x)
        times = predictions.open_time_ms[-n:]
        flags = (predictions.ood[-n:].astype(np.float64) if predictions.ood is not None
                 else np.full(n, np.nan))
        bins = record.drift.bins(x) if record.drift is not None else np.zeros((n, 0), dtype=np.int8)
        with self._lock:
            self._records[record.model_id] = record
            model = self._models.get(record.model_id)
            if model is None:
                model = self._models[record.model_id] = _Model()
            for t, row, flag in zip(times.tolist(), bins, flags.tolist(), strict=True):
                model.bins[t] = row
                model.bins.move_to_end(t)
                model.ood[t] = flag
            while len(model.bins) > self.size:
                oldest, _ = model.bins.popitem(last=False)
                model.ood.pop(oldest, None)

    def view(self, model_id: str) -> DriftView:
        """PSI per feature and the OOD rate over the model's window (0 candles when it served none here)."""
        with self._lock:
            model = self._models.get(model_id)
            record = self._records.get(model_id)
            if model is None or record is None or not model.bins:
                return DriftView(0, None, float("nan"))
            rows = np.stack(list(model.bins.values()))
            flags = np.fromiter(model.ood.values(), dtype=np.float64, count=len(model.ood))
        drift = record.drift
        psi = drift.psi(bin_counts(rows)) if drift is not None and rows.shape[1] else None
        scored = flags[~np.isnan(flags)]
        return DriftView(len(rows), psi, float(scored.mean()) if len(scored) else float("nan"))

    def models(self) -> list[ModelRecord]:
        with self._lock:
            return list(self._records.values())
