"""CompareLivePerformance: which two models of a market are compared, and the live test between them.

An empty challenger is the baseline's class prior; an empty baseline is the market's serving model. The test is the
one that promotes shadows (`shared.live_comparison`), with the service's MLSIGNAL_SHADOW_* settings, so what an
operator sees is what training decides on.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from inference_service.service import validate_key
from shared.errors import InvalidArgument, NotFound
from shared.live_comparison import DEFAULT_TEST, LiveTestSettings, compare
from shared.sequential_test import Comparison
from shared.store import registry
from shared.store.registry import ModelRecord


@dataclass(frozen=True)
class LiveComparison:
    model_id: str  # "" for the class prior
    baseline_model_id: str
    result: Comparison


def _model_of_market(engine: sa.Engine, model_id: str, symbol: str, timeframe: str, field: str) -> ModelRecord:
    record = registry.get_model(engine, model_id)
    if record is None:
        raise NotFound(f"{field}: no model {model_id!r} in the registry", field=field)
    if (record.symbol, record.timeframe) != (symbol, timeframe):
        raise InvalidArgument(f"{field}: model {model_id} is for {record.symbol} {record.timeframe}, not {symbol} "
                              f"{timeframe}", field=field)
    return record


def compare_live(engine: sa.Engine, symbol: str, timeframe: str, model_id: str, baseline_model_id: str,
                 settings: LiveTestSettings = DEFAULT_TEST) -> LiveComparison:
    """The live test of `model_id` (empty: the baseline's prior) against `baseline_model_id` (empty: the serving
    model). NOT_FOUND for an unknown model or a market that nothing serves; INVALID_ARGUMENT for a model of
    another market or a model compared with itself."""
    validate_key(symbol, timeframe)
    if baseline_model_id:
        baseline = _model_of_market(engine, baseline_model_id, symbol, timeframe, "baseline_model_id")
    else:
        found = registry.serving_model(engine, symbol, timeframe)
        if found is None:
            raise NotFound(f"baseline_model_id: no model is serving {symbol} {timeframe}; name the baseline",
                           field="baseline_model_id")
        baseline = found
    model = _model_of_market(engine, model_id, symbol, timeframe, "model_id") if model_id else None
    if model is not None and model.model_id == baseline.model_id:
        raise InvalidArgument(f"model_id: {model_id} is the baseline itself; compare it with another model or "
                              "leave model_id empty for its class prior", field="model_id")
    return LiveComparison(model.model_id if model is not None else "", baseline.model_id,
                          compare(engine, model, baseline, settings))


def prior_comparison(engine: sa.Engine, record: ModelRecord, settings: LiveTestSettings = DEFAULT_TEST) -> Comparison:
    """The live test of a model's class prior against the model: `promote` means the model is worse than its prior."""
    return compare(engine, None, record, settings)
