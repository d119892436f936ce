"""The live promotion decision: shadows against the serving model, and the serving model against its class prior.

Inference scores every prediction the serving model and each SHADOW model of a market made on the same candles
(`inference_service.shadows`, `inference_service.journal`). Each tick, for every market with shadows, this pairs a
shadow's scores with the serving model's on the candles both have scored and runs the sequential test
(`shared.sequential_test`): `promote` makes the shadow SERVING (the serving model RETIRED), `reject` makes it
REJECTED, `undecided` waits for more candles; the numbers go into `stage_reason` and the stage history. The test
pairs exactly, so looking after every tick does not raise the chance of a false promotion above
MLSIGNAL_SHADOW_ALPHA.

The prior is a permanent challenger: the same test between the serving model and the class prior it was trained
with. A serving model the test finds worse than its prior is logged (and reported by inference's
GetLivePerformance and metrics); with MLSIGNAL_DEMOTE_WORSE_THAN_PRIOR=1 it is rolled back to the model that served
before it.

A decision is applied under the market's lock and only while the shadow is still SHADOW and the serving model the
one it was compared with, so several training replicas apply it once. Scores are read again only for models whose
count of scores changed since the last tick.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa

from shared.errors import FailedPrecondition, MlsignalError, one_line
from shared.live_comparison import DEFAULT_TEST, PROMOTE, UNDECIDED, LiveTestSettings, compare
from shared.store import live, registry

log = logging.getLogger(__name__)

@dataclass
class PromotionReport:
    promoted: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    undecided: list[str] = field(default_factory=list)
    worse_than_prior: list[str] = field(default_factory=list)
    demoted: list[str] = field(default_factory=list)


class PromotionRunner:
    """Runs the live test for every market with shadows, and the prior challenger for every serving model."""

    def __init__(self, engine: sa.Engine, settings: LiveTestSettings = DEFAULT_TEST,
                 demote_worse_than_prior: bool = False, interval_seconds: float = 5.0) -> None:
        self.engine = engine
        self.settings = settings
        self.demote_worse_than_prior = demote_worse_than_prior
        self.interval_seconds = interval_seconds
        self._counts: dict[tuple[str, str], int] = {}  # (model, baseline) -> scores of both when last tested
        self._worse: dict[str, tuple[str, str]] = {}  # serving models worse than their prior -> their market
        self.on_decision: Callable[[str, str, str], None] = lambda decision, symbol, timeframe: None
        # Checks a model's file before a rollback brings it back (`TrainingService.verify_artifact`).
        self.verify: Callable[[str, str, str], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> PromotionReport:
        """One round over the registry; returns what it decided."""
        report = PromotionReport()
        serving = {(s, tf): m for s, tf, m, _ in registry.serving_models(self.engine)}
        shadowed = []  # (serving model, its market's shadows): a market nothing serves waits for an operator
        for key in registry.markets_with_shadows(self.engine):
            if key in serving:
                shadowed.append((serving[key], [row.model_id for row in registry.shadow_rows(self.engine, *key)]))
        ids = [*serving.values(), *(m for _, shadows in shadowed for m in shadows)]
        counts = {m: s.scored for m, s in live.summaries(self.engine, ids).items()}  # only the models tested
        for serving_id, shadows in shadowed:
            for shadow_id in shadows:
                if self._test_shadow(shadow_id, serving_id, counts, report):
                    break  # a new model serves: the other shadows are compared with it from the next tick
        for model_id in serving.values():
            self._test_prior(model_id, counts, report)
        for model_id in set(self._worse) - set(serving.values()):  # no longer serving
            del self._worse[model_id]
        return report

    def _changed(self, key: tuple[str, str], counts: dict[str, int]) -> bool:
        now = counts.get(key[0], 0) + counts.get(key[1], 0)
        if self._counts.get(key) == now:
            return False
        self._counts[key] = now
        return True

    def _test_shadow(self, shadow_id: str, serving_id: str, counts: dict[str, int], report: PromotionReport) -> bool:
        """Test one shadow against the serving model; returns whether it was promoted."""
        if counts.get(shadow_id, 0) < self.settings.min_scored or not self._changed((shadow_id, serving_id), counts):
            report.undecided.append(shadow_id)
            return False
        shadow, serving = registry.get_model(self.engine, shadow_id), registry.get_model(self.engine, serving_id)
        if shadow is None or serving is None:
            return False
        result = compare(self.engine, shadow, serving, self.settings)
        if result.decision == UNDECIDED:
            report.undecided.append(shadow_id)
            return False
        promote_it = result.decision == PROMOTE
        verdict = "better than" if promote_it else "not shown better than"
        reason = f"live test against {serving_id}: {verdict} it; {result.reason}"
        if not registry.settle_shadow(self.engine, shadow_id, serving_id, promote_it, reason):
            return False  # decided meanwhile (another replica), or the serving model changed: the next tick looks
        (report.promoted if promote_it else report.rejected).append(shadow_id)
        self.on_decision(result.decision, shadow.symbol, shadow.timeframe)
        log.info("shadow %s %s: %s", shadow_id, "promoted" if promote_it else "rejected", reason)
        return promote_it

    def _test_prior(self, model_id: str, counts: dict[str, int], report: PromotionReport) -> None:
        if counts.get(model_id, 0) < self.settings.min_scored or not self._changed(("", model_id), counts):
            if model_id in self._worse:
                report.worse_than_prior.append(model_id)
            return
        model = registry.get_model(self.engine, model_id)
        if model is None:
            return
        result = compare(self.engine, None, model, self.settings)
        if result.decision != PROMOTE:  # the prior is not shown better
            self._worse.pop(model_id, None)
            return
        report.worse_than_prior.append(model_id)
        if model_id not in self._worse:
            log.warning("serving model %s is worse than its class prior on live candles: %s", model_id,
                        result.reason)
        self._worse[model_id] = (model.symbol, model.timeframe)
        if self.demote_worse_than_prior:
            numbers = result.reason.rsplit(": ", 1)[0]
            reason = f"worse than its class prior on live candles; {numbers}: the prior is better"
            try:
                back = registry.rollback(self.engine, model.symbol, model.timeframe, reason, verify=self.verify)
            except FailedPrecondition as exc:
                log.warning("cannot roll back %s: %s", model_id, one_line(exc))
                return
            report.demoted.append(model_id)
            self._worse.pop(model_id, None)
            log.warning("rolled back %s %s from %s to %s: %s", model.symbol, model.timeframe, model_id,
                        back.model_id, reason)

    def worse_than_prior(self, serving: set[str] | None = None) -> list[tuple[str, str, str]]:
        """(symbol, timeframe, model_id) of the serving models last found worse than their class prior."""
        return [(s, tf, m) for m, (s, tf) in list(self._worse.items()) if serving is None or m in serving]

    # -- the background thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread (none when `interval_seconds` is 0)."""
        if self.interval_seconds <= 0 or self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.interval_seconds):
                try:
                    self.tick()
                except (MlsignalError, sa.exc.SQLAlchemyError) as exc:
                    log.warning("the live promotion test could not run: %s", one_line(exc))
                except Exception:  # never let the thread die
                    log.exception("the live promotion test failed")

        self._thread = threading.Thread(target=loop, name="live-promotion", daemon=True)
        self._thread.start()

    def stop(self, grace: float = 0.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
