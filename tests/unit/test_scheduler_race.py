"""The race between a job's registration and cancel()/stop(), in both orders, on real parts: a JobStore on a SQLite
file, the real LocalProcessExecutor training a small forest, and the scheduler's registration hooks to stop the
worker at the exact point of the race.

(a) The CANCELLED/FAILED update commits first: the registration finds the job no longer RUNNING, rolls its model row
    back and removes the artifact files. (b) The registration commits first: cancel()/stop() find the job no longer
    QUEUED/RUNNING and leave it SUCCEEDED with its model. A model whose job is not SUCCEEDED never exists.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from service_fixtures import load_market, ms
from shared.errors import FailedPrecondition
from shared.params import ForestParams
from shared.store.db import make_engine
from shared.store.db import models as models_table
from training_service.jobs import CANCELLED, FAILED, RUNNING, SUCCEEDED, Job, JobStore, TrainingRequest
from training_service.scheduler import Scheduler

REQUEST = TrainingRequest(symbol="BTC/USD", timeframe="1h", start_ms=ms("2018-03-01"), end_ms=ms("2018-08-01"),
                          params=ForestParams(n_estimators=10))


@dataclass
class Rig:
    scheduler: Scheduler
    store: JobStore
    engine: sa.Engine
    model_dir: Path
    finished: dict[str, threading.Event]

    def submit(self) -> str:
        job_id = self.scheduler.submit(REQUEST).job_id
        self.finished.setdefault(job_id, threading.Event())
        return job_id

    def wait_finished(self, job_id: str, timeout: float = 120) -> Job:
        """The job once its worker is done with it (not merely once the database says it is final)."""
        assert self.finished[job_id].wait(timeout), f"job {job_id} did not finish in {timeout}s"
        return self.store.get_existing(job_id)

    def models_of(self, job_id: str) -> list[str]:
        with self.engine.connect() as conn:
            q = sa.select(models_table.c.model_id).where(models_table.c.job_id == job_id)
            return [r.model_id for r in conn.execute(q)]

    def artifacts(self) -> list[str]:
        return sorted(p.name for p in self.model_dir.iterdir())

    def wait_state(self, job_id: str, state: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.store.get_existing(job_id).state != state:
            assert time.monotonic() < deadline, f"job {job_id} did not become {state}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def market(tmp_path_factory, sample_frame) -> str:
    """A SQLite file with the 2018 BTC/USD candles, copied per test."""
    root = tmp_path_factory.mktemp("race-market")
    url = f"sqlite:///{root}/market.db"
    t = sample_frame["open_time_ms"]
    load_market(url, sample_frame[(t >= ms("2018-01-01")) & (t < ms("2019-01-01"))])
    return str(root / "market.db")


@pytest.fixture
def rig(tmp_path, market) -> Iterator[Rig]:
    import shutil

    db = tmp_path / "mlsignal.db"
    shutil.copyfile(market, db)
    url = f"sqlite:///{db}"
    engine = make_engine(url)
    store = JobStore(engine)
    model_dir = tmp_path / "models"
    scheduler = Scheduler(store, url, model_dir, workers=1, fit_jobs=1)
    finished: dict[str, threading.Event] = {}
    scheduler.on_job_finished = lambda job: finished.setdefault(job.job_id, threading.Event()).set()
    scheduler.start()
    try:
        yield Rig(scheduler, store, engine, model_dir, finished)
    finally:
        scheduler.stop(0)
        engine.dispose()


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    """Run fn() in another thread (as a gRPC call or the server's shutdown would); its result or error lands in
    the returned dict."""
    out: dict = {}

    def target():
        try:
            out["result"] = fn()
        except Exception as exc:
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


# -- (a) the cancel or interruption commits first ---------------------------------------------------------------


def test_cancel_committed_before_the_registration_leaves_no_model(rig):
    seen: dict = {}

    def before_register(job_id: str) -> None:
        seen["artifacts_in_place"] = [n for n in rig.artifacts() if n.endswith((".onnx", ".joblib"))]
        canceller, out = _in_thread(lambda: rig.scheduler.cancel(job_id))
        canceller.join(30)
        seen.update(out)

    rig.scheduler.before_register = before_register
    job_id = rig.submit()
    job = rig.wait_finished(job_id)

    assert len(seen["artifacts_in_place"]) == 2  # the files were renamed into place before the race
    assert "error" not in seen and seen["result"].state == CANCELLED
    assert job.state == CANCELLED and job.error == "cancelled on request" and not job.model_id
    assert rig.models_of(job_id) == []
    assert rig.artifacts() == []  # the renamed files were removed again


def test_stop_committed_before_the_registration_leaves_no_model(rig):
    seen: dict = {}

    def before_register(job_id: str) -> None:
        seen["artifacts_in_place"] = [n for n in rig.artifacts() if n.endswith((".onnx", ".joblib"))]
        seen["stopper"] = _in_thread(lambda: rig.scheduler.stop(0))[0]
        rig.wait_state(job_id, FAILED)  # stop() marked it interrupted while this worker waits here

    rig.scheduler.before_register = before_register
    job_id = rig.submit()
    job = rig.wait_finished(job_id)
    seen["stopper"].join(30)

    assert len(seen["artifacts_in_place"]) == 2
    assert not seen["stopper"].is_alive()
    assert job.state == FAILED and job.stage == "interrupted" and "interrupted" in job.error and not job.model_id
    assert rig.models_of(job_id) == []
    assert rig.artifacts() == []


# -- (b) the registration commits first ---------------------------------------------------------------------------


def test_registration_committed_before_stop_stays_succeeded(rig):
    seen: dict = {}

    def before_commit(job_id: str) -> None:
        assert rig.store.get_existing(job_id).state == RUNNING  # the success is not committed yet
        stopper, _ = _in_thread(lambda: rig.scheduler.stop(0))
        stopper.join(0.5)  # stop() marks the job interrupted, and waits for this transaction to end
        seen["stopper"] = stopper

    rig.scheduler.before_register_commit = before_commit
    job_id = rig.submit()
    job = rig.wait_finished(job_id)
    seen["stopper"].join(30)

    assert not seen["stopper"].is_alive()
    job = rig.store.get_existing(job_id)  # read again after stop() has finished
    assert job.state == SUCCEEDED and job.stage == "done" and job.error == "" and job.model_id
    assert rig.models_of(job_id) == [job.model_id]
    assert rig.artifacts() == sorted([f"{job.model_id}.joblib", f"{job.model_id}.onnx"])


def test_registration_committed_before_cancel_stays_succeeded(rig):
    seen: dict = {}

    def before_commit(job_id: str) -> None:
        canceller, out = _in_thread(lambda: rig.scheduler.cancel(job_id))
        canceller.join(0.5)  # the cancel's conditional update waits for this transaction to end
        seen["canceller"], seen["out"] = canceller, out

    rig.scheduler.before_register_commit = before_commit
    job_id = rig.submit()
    job = rig.wait_finished(job_id)
    seen["canceller"].join(30)

    error = seen["out"].get("error")
    assert isinstance(error, FailedPrecondition) and "already finished (SUCCEEDED)" in str(error), seen["out"]
    assert job.state == SUCCEEDED and job.model_id
    assert rig.models_of(job_id) == [job.model_id]
    assert rig.artifacts() == sorted([f"{job.model_id}.joblib", f"{job.model_id}.onnx"])

    # the scheduler goes on: the next job runs and registers normally
    rig.scheduler.before_register_commit = None
    nxt = rig.wait_finished(rig.submit())
    assert nxt.state == SUCCEEDED and rig.models_of(nxt.job_id) == [nxt.model_id]
