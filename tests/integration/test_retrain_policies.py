"""Retrain policies end to end: real training servers on 127.0.0.1:0 with the test's clock, real SQLite and
PostgreSQL, real jobs, policies set and read through the generated stubs, and the runner's `tick` called directly
(the servers run no background ticks: MLSIGNAL_POLICY_INTERVAL_SECONDS=0). Nothing sleeps: jobs are followed with
WatchTrainingJob.

The history is stored as `mlsignal data import` stores a file (`insert_candles`); the candles that arrive later are
pushed with ImportCandles, which takes only candles closed by the service's clock (the test's).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import grpc
import pandas as pd
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conftest import _free_port
from mlsignal.v1 import common_pb2, training_pb2, training_pb2_grpc
from service_fixtures import inverted, wait_job
from shared.settings import Settings
from shared.store.db import make_engine
from shared.store.marketdata import insert_candles
from shared.timeframes import ms_to_iso, parse_time

H = 3_600_000
D = 24 * H
T0 = parse_time("2018-03-01T00:00:00Z")
HISTORY = parse_time("2018-01-01T00:00:00Z")
WINDOW = 50 * D  # 1,200 candles: enough for horizon 4 (1,103)
MARKETS = ("BTC/USD", "ETH/USD", "INV/USD")


class Clock:
    """The test's clock: epoch milliseconds, moved by hand."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def duration(text: str) -> Duration:
    d = Duration()
    d.FromMilliseconds(_ms(text))
    return d


def _ms(text: str) -> int:
    from shared.timeframes import parse_duration

    return parse_duration(text)


def policy(symbol: str, every: str = "1d", window: str = "50d", horizon: int = 4, trees: int = 8,
           **fields) -> training_pb2.RetrainPolicy:
    return training_pb2.RetrainPolicy(
        symbol=symbol, timeframe="1h", every=duration(every), window=duration(window),
        label=common_pb2.LabelSpec(horizon_bars=horizon), params=common_pb2.ModelParams(n_estimators=trees),
        **fields)


def market_frame(sample: pd.DataFrame, symbol: str, start_ms: int, end_ms: int) -> pd.DataFrame:
    """Candles of a test market with open times in [start_ms, end_ms): BTC/USD as sampled, INV/USD its reciprocal,
    any other symbol BTC/USD scaled."""
    part = sample[(sample.open_time_ms >= start_ms) & (sample.open_time_ms < end_ms)].reset_index(drop=True)
    if symbol == "INV/USD":
        return inverted(part)
    if symbol != "BTC/USD":
        part = part.copy()
        for c in ("open", "high", "low", "close"):
            part[c] = part[c] / 20
    return part


def add_candles(url: str, sample: pd.DataFrame, symbols, start_ms: int, end_ms: int) -> None:
    """Store history directly, as a file import does."""
    engine = make_engine(url)
    try:
        for symbol in symbols:
            insert_candles(engine, symbol, "1h", market_frame(sample, symbol, start_ms, end_ms))
    finally:
        engine.dispose()


def push_candles(stub, sample: pd.DataFrame, symbols, start_ms: int, end_ms: int) -> None:
    """New candles arriving over gRPC: one ImportCandles call per market."""
    for symbol in symbols:
        frame = market_frame(sample, symbol, start_ms, end_ms)
        candles = [common_pb2.Candle(open_time_ms=int(r.open_time_ms), open=r.open, high=r.high, low=r.low,
                                     close=r.close, volume=r.volume) for r in frame.itertuples()]
        sent = stub.ImportCandles(iter([training_pb2.ImportCandlesRequest(symbol=symbol, timeframe="1h",
                                                                          candles=candles)]), timeout=30)
        assert sent.inserted + sent.unchanged == len(candles) and sent.conflicting == 0, sent


@contextlib.contextmanager
def training_server(url: str, model_dir: Path, clock: Clock, **overrides):
    """A training server on the test's clock; yields (running server, stub)."""
    from training_service.server import start

    values = {"policy_interval_seconds": 0, "promotion_tolerance": 0.5, **overrides}
    settings = Settings(database_url=url, model_dir=model_dir, **values)
    running = start(settings, "127.0.0.1:0", clock=clock)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield running, training_pb2_grpc.TrainingServiceStub(channel)
    finally:
        channel.close()
        running.stop(0.5)


def policies_by_symbol(stub) -> dict[str, training_pb2.RetrainPolicy]:
    listed = stub.ListRetrainPolicies(training_pb2.ListRetrainPoliciesRequest(), timeout=10)
    return {p.symbol: p for p in listed.policies}


def job_of(stub, job_id: str) -> training_pb2.TrainingJob:
    return stub.GetTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job_id), timeout=10)


def jobs_of(stub, symbol: str) -> list[training_pb2.TrainingJob]:
    return list(stub.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(symbol=symbol, timeframe="1h"),
                                      timeout=10).jobs)


def started_by_symbol(stub, job_ids: list[str]) -> dict[str, str]:
    return {job_of(stub, j).request.symbol: j for j in job_ids}


def sample_value(running, name: str, labels: dict | None = None) -> float:
    return running.handle.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_policies_retrain_each_market_once_per_due_time_skip_without_new_candles_retry_failures_and_survive_a_restart(
        db_url, tmp_path, sample_frame):
    models = tmp_path / "models"
    clock = Clock(T0)
    add_candles(db_url, sample_frame, MARKETS, HISTORY, T0)
    # The candle opening at T0 is still forming at T0: stored for BTC and INV, but not trained on until it closes.
    add_candles(db_url, sample_frame, ("BTC/USD", "INV/USD"), T0, T0 + H)
    with training_server(db_url, models, clock, metrics_port=_free_port()) as (running, stub):
        runner = running.policies
        for symbol in MARKETS:
            stored = stub.SetRetrainPolicy(policy(symbol, cross_validate=symbol == "ETH/USD"), timeout=10)
            assert stored.cross_validate == (symbol == "ETH/USD")
            assert stored.next_run_at.ToMilliseconds() == T0, "a new policy is due at once"
            assert stored.every.ToMilliseconds() == D and stored.window.ToMilliseconds() == WINDOW
            assert stored.label.horizon_bars == 4 and stored.label.threshold == pytest.approx(0.02)
            assert stored.params.n_estimators == 8 and stored.params.max_depth == 6  # defaults filled in
            assert not stored.last_job_id and not stored.last_outcome

        # T0: every market is due and retrains on the last 50 days of closed candles
        report = runner.tick()
        assert len(report.started) == 3 and report.skipped == 0
        first = started_by_symbol(stub, report.started)
        assert set(first) == set(MARKETS)
        for job_id in first.values():
            job = wait_job(stub, job_id)
            assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
            req = job.request
            assert req.end_time.ToMilliseconds() == T0  # the close of the newest closed candle
            assert req.start_time.ToMilliseconds() == T0 - WINDOW
            assert req.purpose == training_pb2.TRAINING_PURPOSE_PRODUCTION
            assert (req.label.horizon_bars, req.params.n_estimators) == (4, 8)
        listed = policies_by_symbol(stub)
        for symbol in MARKETS:
            assert listed[symbol].next_run_at.ToMilliseconds() == T0 + D
            assert listed[symbol].last_job_id == first[symbol]
            assert listed[symbol].last_outcome.startswith(f"started: job {first[symbol]} on ")
        report = runner.tick()  # not due again; records how the jobs ended
        assert report.started == [] and report.succeeded == 3
        listed = policies_by_symbol(stub)
        t0_models = {}
        registered = {m.model_id: m for m in stub.ListModels(training_pb2.ListModelsRequest(), timeout=10).models}
        for symbol in MARKETS:
            job = job_of(stub, first[symbol])
            t0_models[symbol] = job.model_id
            # cross-validation only where the policy asks for it; the gate's held-back evaluation always
            metrics = registered[job.model_id].metrics
            assert (metrics["cv_folds"] >= 2) == (symbol == "ETH/USD") and metrics["cv_folds"] != 1, symbol
            assert metrics["prior_log_loss"] > 0 and metrics["n_test"] > 0
            assert listed[symbol].last_outcome.startswith(
                f"succeeded: job {first[symbol]} registered model {job.model_id} as SERVING")

        # T0 + 1d: new candles for BTC and INV only; ETH has nothing after its model and is skipped
        clock.ms = T0 + D
        push_candles(stub, sample_frame, ("BTC/USD", "INV/USD"), T0 + H, T0 + D)
        report = runner.tick()
        second = started_by_symbol(stub, report.started)
        assert set(second) == {"BTC/USD", "INV/USD"} and report.skipped == 1
        for job_id in second.values():
            job = wait_job(stub, job_id)
            assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
            assert job.request.end_time.ToMilliseconds() == T0 + D
        eth = policies_by_symbol(stub)["ETH/USD"]
        assert eth.last_outcome == (f"skipped: no candle after {ms_to_iso(T0 - H)}, the end of model "
                                    f"{t0_models['ETH/USD']}")
        assert eth.last_job_id == first["ETH/USD"] and eth.next_run_at.ToMilliseconds() == T0 + 2 * D

        # T0 + 2d: all three retrain; ETH's job is cancelled, which counts as a failure retried at the next due time
        clock.ms = T0 + 2 * D
        push_candles(stub, sample_frame, ("BTC/USD", "INV/USD"), T0 + D, T0 + 2 * D)
        push_candles(stub, sample_frame, ("ETH/USD",), T0, T0 + 2 * D)
        report = runner.tick()
        third = started_by_symbol(stub, report.started)
        assert set(third) == set(MARKETS)
        cancelled = stub.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(job_id=third["ETH/USD"]), timeout=10)
        assert cancelled.state == training_pb2.JOB_STATE_CANCELLED
        for symbol in ("BTC/USD", "INV/USD"):
            assert wait_job(stub, third[symbol]).state == training_pb2.JOB_STATE_SUCCEEDED
        report = runner.tick()
        assert report.started == [] and report.failed == 1 and report.succeeded == 2
        eth = policies_by_symbol(stub)["ETH/USD"]
        assert eth.last_outcome.startswith(f"failed: job {third['ETH/USD']} CANCELLED: cancelled on request")
        assert eth.next_run_at.ToMilliseconds() == T0 + 3 * D
        assert runner.tick().started == [], "a failure is retried at the next due time, not at once"

        # Prometheus: jobs started, skips and failures per market; nothing due; the age of each serving model
        labels = {"symbol": "ETH/USD", "timeframe": "1h"}
        assert sample_value(running, "mlsignal_policy_jobs_started_total", labels) == 2
        assert sample_value(running, "mlsignal_policy_jobs_started_total", {**labels, "symbol": "BTC/USD"}) == 3
        assert sample_value(running, "mlsignal_policy_skips_total", labels) == 1
        assert sample_value(running, "mlsignal_policy_failures_total", labels) == 1
        assert sample_value(running, "mlsignal_policy_failures_total", {**labels, "symbol": "BTC/USD"}) == 0
        assert running.handle.metrics.registry.get_sample_value("mlsignal_policies_due") == 0
        ages = {s.labels["symbol"]: s.value for family in running.handle.metrics.registry.collect()
                if family.name == "mlsignal_serving_model_age_seconds" for s in family.samples}
        assert set(ages) == set(MARKETS) and all(0 <= age < 3600 for age in ages.values()), ages
        jobs_before = {symbol: len(jobs_of(stub, symbol)) for symbol in MARKETS}
        assert jobs_before == {"BTC/USD": 3, "ETH/USD": 2, "INV/USD": 3}

    # The service is down while three due times pass (T0 + 3d, 4d, 5d); after the restart each market runs once.
    clock.ms = T0 + 5 * D + H
    add_candles(db_url, sample_frame, MARKETS, T0 + 2 * D, T0 + 5 * D + H)  # a file import while it is down
    with training_server(db_url, models, clock) as (running, stub):
        listed = policies_by_symbol(stub)
        assert set(listed) == set(MARKETS), "policies live in the database"
        assert running.handle.metrics is None
        report = running.policies.tick()
        after = started_by_symbol(stub, report.started)
        assert set(after) == set(MARKETS) and len(report.started) == 3
        for job_id in after.values():
            job = wait_job(stub, job_id)
            assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
            assert job.request.end_time.ToMilliseconds() == T0 + 5 * D + H
        assert running.policies.tick().started == []
        listed = policies_by_symbol(stub)
        for symbol in MARKETS:
            assert listed[symbol].next_run_at.ToMilliseconds() == T0 + 6 * D  # the first due time after now
            assert listed[symbol].last_outcome.startswith(f"succeeded: job {after[symbol]}")
            assert len(jobs_of(stub, symbol)) == jobs_before[symbol] + 1


def test_a_job_that_fails_is_recorded_and_retried_at_the_next_due_time(db_url, tmp_path, sample_frame):
    clock = Clock(T0)
    add_candles(db_url, sample_frame, ("GAP/USD",), T0 - 2 * D, T0)  # 48 candles: far too few to train on
    with training_server(db_url, tmp_path / "models", clock) as (running, stub):
        stub.SetRetrainPolicy(policy("GAP/USD"), timeout=10)
        report = running.policies.tick()
        assert len(report.started) == 1
        failed = wait_job(stub, report.started[0])
        assert failed.state == training_pb2.JOB_STATE_FAILED and "candles" in failed.error, failed.error
        report = running.policies.tick()
        assert report.started == [] and report.failed == 1
        stored = policies_by_symbol(stub)["GAP/USD"]
        assert stored.last_outcome.startswith(f"failed: job {failed.job_id} FAILED: ")
        assert "the next due time retries" in stored.last_outcome
        for _ in range(3):  # never a tight loop
            assert running.policies.tick().started == []
        assert len(jobs_of(stub, "GAP/USD")) == 1

        clock.ms = T0 + D  # the next due time, with the history now complete
        push_candles(stub, sample_frame, ("GAP/USD",), T0 - 60 * D, T0 + D)
        report = running.policies.tick()
        assert len(report.started) == 1
        retried = wait_job(stub, report.started[0])
        assert retried.state == training_pb2.JOB_STATE_SUCCEEDED, retried.error
        assert running.policies.tick().succeeded == 1
        assert policies_by_symbol(stub)["GAP/USD"].last_outcome.startswith(f"succeeded: job {retried.job_id}")


def test_due_policies_beyond_the_queue_wait_for_room_and_are_never_refused(sqlite_url, tmp_path, sample_frame):
    symbols = [f"M{i}/USD" for i in range(5)]
    clock = Clock(T0)
    add_candles(sqlite_url, sample_frame, symbols, T0 - WINDOW, T0)
    with training_server(sqlite_url, tmp_path / "models", clock, training_queue_size=2) as (running, stub):
        for symbol in symbols:
            stub.SetRetrainPolicy(policy(symbol), timeout=10)
        started: list[str] = []
        cancelled = 0
        for _ in range(5):
            report = running.policies.tick()
            assert report.failed == cancelled, "only the jobs cancelled below count as failures"
            assert len(report.started) <= 2, "a tick queues no more jobs than the queue has room for"
            started += report.started
            listed = policies_by_symbol(stub)
            waiting = [s for s in symbols if not listed[s].last_job_id]
            assert report.waiting == len(waiting)
            for s in waiting:  # still due, untouched: queued by a later tick
                assert listed[s].next_run_at.ToMilliseconds() == T0 and listed[s].last_outcome == ""
            for job_id in report.started:  # make room
                stub.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(job_id=job_id), timeout=10)
            cancelled = len(report.started)
            if not waiting:
                break
        assert sorted(job_of(stub, j).request.symbol for j in started) == symbols
        assert all(len(jobs_of(stub, s)) == 1 for s in symbols)


@pytest.mark.postgres
def test_two_replicas_on_one_postgresql_run_each_due_policy_once(pg_url, tmp_path, sample_frame):
    symbols = [f"R{i}/USD" for i in range(6)]
    clock = Clock(T0)
    add_candles(pg_url, sample_frame, symbols, T0 - WINDOW, T0)
    with contextlib.ExitStack() as stack:
        a, stub = stack.enter_context(training_server(pg_url, tmp_path / "models", clock))
        b, _ = stack.enter_context(training_server(pg_url, tmp_path / "models", clock))
        for symbol in symbols:
            stub.SetRetrainPolicy(policy(symbol), timeout=10)
        by_replica = {"a": 0, "b": 0}
        for period in range(3):
            clock.ms = T0 + period * D
            push_candles(stub, sample_frame, symbols, T0 + (period - 1) * D, T0 + period * D)
            barrier = threading.Barrier(2)
            reports: dict = {}
            threads = [threading.Thread(target=tick_together, args=(barrier, reports, name, running))
                       for name, running in (("a", a), ("b", b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            started = reports["a"].started + reports["b"].started
            assert len(started) == len(set(started)) == len(symbols), (period, reports)
            assert sorted(job_of(stub, j).request.symbol for j in started) == symbols
            by_replica["a"] += len(reports["a"].started)
            by_replica["b"] += len(reports["b"].started)
            for job_id in started:  # no model: the next period retrains again
                stub.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(job_id=job_id), timeout=10)
            # both replicas tick again at the same time: nothing is due any more
            assert a.policies.tick().started == [] and b.policies.tick().started == []
        for symbol in symbols:
            assert len(jobs_of(stub, symbol)) == 3, symbol
        print(f"jobs started per replica: {by_replica}")


def tick_together(barrier: threading.Barrier, reports: dict, name: str, running) -> None:
    barrier.wait()
    reports[name] = running.policies.tick()


def field_violations(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    out = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out += [v.field for v in bad.field_violations]
    return out


@pytest.mark.parametrize("message, field, words", [
    (policy("BTC/USD", every="30m"), "every", "at least one 1h candle"),
    (policy("BTC/USD", window="40d"), "window", "needs at least 1103"),
    (policy("BTC/USD", window="45d", horizon=48), "window", "label.horizon_bars=48"),
    (policy("BTC/USD", horizon=-1), "label.horizon_bars", "between 1 and"),
    (policy("BTC/USD", trees=-3), "params.n_estimators", "between 1 and"),
    (policy("BTC USD"), "symbol", ""),
    (training_pb2.RetrainPolicy(symbol="BTC/USD", timeframe="2h", every=duration("1d"), window=duration("365d")),
     "timeframe", "not supported"),
    (training_pb2.RetrainPolicy(symbol="BTC/USD", timeframe="1h", window=duration("365d")), "every", "required"),
    (training_pb2.RetrainPolicy(symbol="BTC/USD", timeframe="1h", every=duration("1d")), "window", "required"),
    (training_pb2.RetrainPolicy(symbol="BTC/USD", timeframe="1h", every=Duration(seconds=-60),
                                window=duration("365d")), "every", "positive"),
])
def test_invalid_policies_are_refused_naming_the_field(validation_server, message, field, words):
    _, stub = validation_server
    with pytest.raises(grpc.RpcError) as caught:
        stub.SetRetrainPolicy(message, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ") and words in caught.value.details()
    assert field_violations(caught.value) == [field]
    assert stub.ListRetrainPolicies(training_pb2.ListRetrainPoliciesRequest(), timeout=10).policies == []


@pytest.fixture(scope="module")
def validation_server(tmp_path_factory):
    from shared.store.migrate import upgrade

    root = tmp_path_factory.mktemp("policy-validation")
    url = f"sqlite:///{root}/mlsignal.db"
    upgrade(url)
    with training_server(url, root / "models", Clock(T0)) as served:
        yield served


def test_delete_returns_the_policy_and_an_unknown_one_is_not_found(validation_server):
    _, stub = validation_server
    stub.SetRetrainPolicy(policy("DEL/USD"), timeout=10)
    deleted = stub.DeleteRetrainPolicy(training_pb2.DeleteRetrainPolicyRequest(symbol="DEL/USD", timeframe="1h"),
                                       timeout=10)
    assert deleted.symbol == "DEL/USD" and deleted.window.ToMilliseconds() == WINDOW
    with pytest.raises(grpc.RpcError) as caught:
        stub.DeleteRetrainPolicy(training_pb2.DeleteRetrainPolicyRequest(symbol="DEL/USD", timeframe="1h"),
                                 timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "no retrain policy for DEL/USD 1h" in \
        caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.DeleteRetrainPolicy(training_pb2.DeleteRetrainPolicyRequest(symbol="DEL/USD", timeframe="3h"),
                                 timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(caught.value) == ["timeframe"]


def test_replacing_a_policy_keeps_its_schedule_and_pausing_stops_it(validation_server):
    running, stub = validation_server
    clock = running.policies.clock
    stub.SetRetrainPolicy(policy("REP/USD", every="7d"), timeout=10)
    stub.SetRetrainPolicy(policy("OTH/USD", every="1d"), timeout=10)
    clock.ms = T0 + H
    assert running.policies.tick().skipped == 2  # no candles at all: skipped, next due a period later
    listed = policies_by_symbol(stub)
    assert listed["REP/USD"].next_run_at.ToMilliseconds() == T0 + 7 * D
    assert listed["REP/USD"].last_outcome == "skipped: no closed 1h candle of REP/USD is stored"
    # a replacement keeps the history and the schedule, but is next due no later than one new period from now
    replaced = stub.SetRetrainPolicy(policy("REP/USD", every="2d", trees=16), timeout=10)
    assert replaced.next_run_at.ToMilliseconds() == T0 + H + 2 * D
    assert replaced.params.n_estimators == 16 and replaced.last_outcome == listed["REP/USD"].last_outcome
    paused = stub.SetRetrainPolicy(policy("OTH/USD", paused=True), timeout=10)
    assert paused.paused and paused.next_run_at.ToMilliseconds() == T0 + D
    clock.ms = T0 + 30 * D
    report = running.policies.tick()
    assert report.skipped == 1  # REP/USD only; OTH/USD is paused
    listed = policies_by_symbol(stub)
    assert listed["REP/USD"].next_run_at.ToMilliseconds() == T0 + H + 2 * D * 15  # once, not once per period
    assert listed["OTH/USD"].next_run_at.ToMilliseconds() == T0 + D
    only = stub.ListRetrainPolicies(training_pb2.ListRetrainPoliciesRequest(symbol="OTH/USD"), timeout=10).policies
    assert [p.symbol for p in only] == ["OTH/USD"]
    for symbol in ("REP/USD", "OTH/USD"):
        stub.DeleteRetrainPolicy(training_pb2.DeleteRetrainPolicyRequest(symbol=symbol, timeframe="1h"), timeout=10)


def test_the_cli_sets_lists_and_deletes_policies(validation_server, capsys):
    from mlsignal.cli import main

    running, _ = validation_server
    target = ["--target", f"127.0.0.1:{running.port}"]
    assert main(["policies", "set", "CLI/USD", "1h", "--every", "12h", "--window", "60d", "--horizon", "6",
                 "--threshold", "0.01", "--label-kind", "triple-barrier", "--trees", "8", *target]) == 0
    out = capsys.readouterr().out
    assert out.startswith("policy CLI/USD 1h: every 12h on the last 60d, next due ")
    assert main(["policies", "set", "CLI/USD", "4h", "--every", "1d", "--window", "365d", "--paused",
                 "--cross-validate", *target]) == 0
    assert "CLI/USD 4h: every 1d on the last 365d, cross-validated, paused" in capsys.readouterr().out
    assert main(["policies", "list", "--symbol", "CLI/USD", *target]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["symbol", "tf", "every", "window"]
    rows = [line.split() for line in lines[2:]]
    assert [r[:10] for r in rows] == [
        ["CLI/USD", "1h", "12h", "60d", "6", "0.01", "triple-barrier", "8", "no", "no"],
        ["CLI/USD", "4h", "1d", "365d", "24", "0.02", "fixed-horizon", "200", "yes", "yes"],
    ]
    assert main(["policies", "list", "--timeframe", "4h", *target]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3

    assert main(["policies", "set", "CLI/USD", "1h", "--every", "30m", "--window", "60d", *target]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: every: must be at least one 1h candle")
    with pytest.raises(SystemExit) as exited:
        main(["policies", "set", "CLI/USD", "1h", "--every", "soon", "--window", "60d", *target])
    assert exited.value.code == 2 and "is not a positive duration" in capsys.readouterr().err

    assert main(["policies", "delete", "CLI/USD", "1h", *target]) == 0
    assert capsys.readouterr().out.strip() == "deleted policy CLI/USD 1h: every 12h on the last 60d"
    assert main(["policies", "delete", "CLI/USD", "1h", *target]) == 2
    assert "error: NOT_FOUND: no retrain policy for CLI/USD 1h" in capsys.readouterr().err
    assert main(["policies", "delete", "CLI/USD", "4h", *target]) == 0
    capsys.readouterr()
    assert main(["policies", "list", *target]) == 0
    assert capsys.readouterr().out.strip() == "no retrain policies"


def test_the_server_runs_due_policies_by_itself_every_interval(sqlite_url, tmp_path):
    """The background thread (MLSIGNAL_POLICY_INTERVAL_SECONDS > 0) ticks on its own; the test waits for its first
    outcome, and stopping the server stops the thread."""
    ticked = threading.Event()
    with training_server(sqlite_url, tmp_path / "models", Clock(T0), policy_interval_seconds=0.05) as (running, stub):
        running.policies.on_outcome = lambda kind, symbol, timeframe: ticked.set()
        stub.SetRetrainPolicy(policy("AUTO/USD"), timeout=10)
        assert ticked.wait(30), "no tick within 30 s"
        stored = policies_by_symbol(stub)["AUTO/USD"]
        assert stored.last_outcome == "skipped: no closed 1h candle of AUTO/USD is stored"
        assert stored.next_run_at.ToMilliseconds() == T0 + D
        thread = running.policies._thread
        assert thread is not None and thread.is_alive()
    assert not thread.is_alive()
