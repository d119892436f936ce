"""The local executor's pool of warm worker processes, on real parts: a SQLite file holding BTC/USD 1h and the real
LocalProcessExecutor training small forests.

A worker pays its start-up (process, imports) once: consecutive jobs run in the same process. Cancelling a job kills
its worker at once and a new one takes its place in the background; so does a worker that dies, idle or mid-job.
A failed job leaves its worker in the pool. Behaviour only: nothing here is timed except as a bound on waiting.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service_fixtures import load_market, ms
from shared.params import ForestParams
from training_service.executors import CANCELLED, DIED, ERROR, RESULT, LocalProcessExecutor, LocalRun, Outcome
from training_service.jobs import TrainingRequest

SMALL = TrainingRequest(symbol="BTC/USD", timeframe="1h", start_ms=ms("2018-03-01"), end_ms=ms("2018-08-01"),
                        params=ForestParams(n_estimators=8)).to_json()
BIG = TrainingRequest(symbol="BTC/USD", timeframe="1h", start_ms=ms("2018-01-01"), end_ms=ms("2019-01-01"),
                      params=ForestParams(n_estimators=3000)).to_json()  # minutes of fitting: only ever stopped
NO_CANDLES = TrainingRequest(symbol="NONE/USD", timeframe="1h", start_ms=None, end_ms=None).to_json()


@pytest.fixture(scope="module")
def url(tmp_path_factory, sample_frame) -> str:
    root = tmp_path_factory.mktemp("local-workers")
    url = f"sqlite:///{root}/mlsignal.db"
    t = sample_frame["open_time_ms"]
    load_market(url, sample_frame[(t >= ms("2018-01-01")) & (t < ms("2019-01-01"))])
    return url


@pytest.fixture
def executor(url) -> Iterator[LocalProcessExecutor]:
    ex = LocalProcessExecutor(url, fit_jobs=1, workers=1)
    ex.start()
    try:
        yield ex
    finally:
        ex.close()


def _run(ex: LocalProcessExecutor, request_json: str, job_id: str) -> tuple[LocalRun, Outcome, list[str]]:
    stages: list[str] = []
    run = ex.submit(job_id, request_json)
    outcome = run.wait(lambda stage, frac: stages.append(stage))
    return run, outcome, stages


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _start_fitting(ex: LocalProcessExecutor, job_id: str) -> tuple[LocalRun, dict]:
    """Submit BIG and return once its worker reports fitting; the outcome lands in the dict."""
    fitting = threading.Event()
    out: dict = {}
    run = ex.submit(job_id, BIG)

    def follow() -> None:
        out["outcome"] = run.wait(lambda stage, frac: fitting.set() if stage == "fitting" else None)

    out["thread"] = threading.Thread(target=follow, daemon=True)
    out["thread"].start()
    assert fitting.wait(120), "the big job never reached fitting"
    return run, out


def test_consecutive_jobs_run_in_the_same_warm_worker(executor):
    (pid,) = executor.worker_pids()  # started with the pool, before any job
    first, outcome1, stages1 = _run(executor, SMALL, "job-1")
    second, outcome2, _ = _run(executor, SMALL, "job-2")
    assert outcome1.kind == outcome2.kind == RESULT, (outcome1.message, outcome2.message)
    assert first.pid == second.pid == pid  # no new process: the second job did not pay the start-up again
    assert executor.worker_pids() == [pid]
    assert "fitting" in stages1 and "saving" in stages1  # progress comes over the worker's pipe
    assert outcome1.result is not None and outcome2.result is not None
    assert outcome1.result["onnx_bytes"] == outcome2.result["onnx_bytes"]  # a reused process trains the same model


def test_a_failed_job_leaves_its_worker_in_the_pool(executor):
    failed, outcome, _ = _run(executor, NO_CANDLES, "no-candles")
    assert outcome.kind == ERROR and "no candles for NONE/USD 1h" in outcome.message
    after, outcome2, _ = _run(executor, SMALL, "after-failure")
    assert outcome2.kind == RESULT and after.pid == failed.pid


def test_cancel_kills_the_worker_and_a_replacement_runs_the_next_job(executor):
    warm, outcome, _ = _run(executor, SMALL, "warm")
    assert outcome.kind == RESULT
    run, out = _start_fitting(executor, "big")
    assert run.pid == warm.pid
    run.cancel()
    out["thread"].join(10)
    assert not out["thread"].is_alive() and out["outcome"].kind == CANCELLED
    assert _gone(warm.pid)  # the job's process was killed: fitting stopped with it
    # a replacement is started in the background, and it runs the next job
    assert _wait_until(lambda: len(executor.worker_pids()) == 1 and executor.worker_pids() != [warm.pid])
    (replacement,) = executor.worker_pids()
    nxt, outcome, _ = _run(executor, SMALL, "after-cancel")
    assert outcome.kind == RESULT and nxt.pid == replacement != warm.pid
    again, outcome, _ = _run(executor, SMALL, "after-cancel-2")
    assert outcome.kind == RESULT and again.pid == replacement  # and stays warm for the one after


def test_a_worker_killed_mid_job_fails_the_job_and_is_replaced(executor):
    run, out = _start_fitting(executor, "killed")
    assert run.pid is not None
    os.kill(run.pid, signal.SIGKILL)
    out["thread"].join(10)
    assert out["outcome"].kind == DIED and f"code {-signal.SIGKILL}" in out["outcome"].message
    nxt, outcome, _ = _run(executor, SMALL, "after-kill")
    assert outcome.kind == RESULT and nxt.pid != run.pid


def test_a_worker_that_died_idle_is_replaced_before_the_next_job(executor):
    (pid,) = executor.worker_pids()
    os.kill(pid, signal.SIGKILL)
    assert _wait_until(lambda: _gone(pid) or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z")
    run, outcome, _ = _run(executor, SMALL, "after-idle-death")
    assert outcome.kind == RESULT and run.pid != pid


def test_close_stops_every_worker(url):
    ex = LocalProcessExecutor(url, fit_jobs=1, workers=2)
    ex.start()
    pids = ex.worker_pids()
    assert len(pids) == 2
    ex.close()
    assert all(_gone(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="closed"):
        ex.submit("late", SMALL)
