"""A model's live scores against a baseline's on the same candles: the numbers behind a shadow's promotion,
`CompareLivePerformance` and the prior challenger.

Both services use it: training decides with it (`training_service.promotion`), inference reports it. The statistics
are in `shared.sequential_test`; this module reads the scores and pairs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from shared.sequential_test import Comparison, decide, paired_differences
from shared.store import live
from shared.store.registry import ModelRecord

PROMOTE, REJECT, UNDECIDED = "promote", "reject", "undecided"


@dataclass(frozen=True)
class LiveTestSettings:
    min_scored: int = 500
    max_scored: int = 5000
    alpha: float = 0.05


DEFAULT_TEST = LiveTestSettings()  # MLSIGNAL_SHADOW_* defaults

def compare(engine: sa.Engine, model: ModelRecord | None, baseline: ModelRecord | None,
            settings: LiveTestSettings = DEFAULT_TEST) -> Comparison:
    """The sequential test of `model` against `baseline` on the candles both have scored; None stands for the class
    prior of the other one (its prior log loss on each of its scored candles). Positive differences favour
    `model`."""
    if model is None and baseline is None:
        raise ValueError("compare needs a model or a baseline")
    if model is not None and baseline is not None:
        a, b = live.read_scores(engine, baseline.model_id), live.read_scores(engine, model.model_id)
        same = baseline.label == model.label
        _, d = paired_differences(a.open_time_ms, a.loss, a.prior_loss, b.open_time_ms, b.loss, b.prior_loss,
                                      same_label=same)
        horizon = max(baseline.label.horizon_bars, model.label.horizon_bars)
    else:
        only = model if model is not None else baseline
        assert only is not None
        s = live.read_scores(engine, only.model_id)
        # against the prior: positive when the prior is better; for the model: when the model is
        d = s.loss - s.prior_loss if model is None else s.prior_loss - s.loss
        horizon = only.label.horizon_bars
    return decide(np.asarray(d, dtype=np.float64), lag=max(horizon - 1, 0), alpha=settings.alpha,
                  min_scored=settings.min_scored, max_scored=settings.max_scored)
