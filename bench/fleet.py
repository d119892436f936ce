"""A fleet of retrains: 100 markets, one year of 1h candles each, default parameters, all trained through the training
service as ordinary production jobs until every market has a model registered with a stage (through the offline
gate), on the local executor and on a Dask LocalCluster.

    .venv/bin/python -m bench.fleet [--markets 100] [--quick] [--executors local,dask] [--workers 2]
        [--fit-jobs N] [--json]     (or: make bench-fleet)

What it does:

1. imports the one-year slice 2018-01-01 .. 2019-01-01 of the bundled BTC/USD 1h sample (8,760 candles) under N
   symbols (FLEET000/USD, ...; each market's prices scaled by its own factor, so no two markets store the same
   candles), and once more as WARMUP/USD for the jobs that are not part of the fleet, into a temporary SQLite
   database;
2. for each executor, on a fresh copy of that database and an empty model directory, starts the real training
   service in this process with MLSIGNAL_TRAINING_WORKERS = --workers and default settings otherwise:
   - local: the default executor (a pool of warm worker processes);
   - dask: a `distributed.LocalCluster` of --workers single-threaded worker processes, MLSIGNAL_DASK_SCHEDULER
     pointing at it (as tests/integration/test_dask.py does);
3. warms the service up as a running service is: one tiny job (8 trees, five months of WARMUP/USD) per worker, all
   at once (the "first jobs" column: their longest started_at .. finished_at, where a worker pays its start-up);
4. gives it the fleet: with retrain policies (SetRetrainPolicy: every 30 days on a 365-day window) when the service
   has them, else (or with --submit start) one StartTraining per market over the year; the clock starts just before
   the first request;
5. waits until every market has a model registered with a stage (SERVING, REJECTED or CANDIDATE), polling ListModels;
   the wall time is from the first request to the last job's finished_at;
6. measures the per-job overhead against the fit time, the same market's training
   (`training_service.worker.train_job`, warm) in this process on one core: (a) CPU: the CPU seconds the workers
   (local worker processes or Dask workers) spent per fleet job against the fit's CPU seconds; (b) wall: wall x
   workers / markets against the fit's wall time (this includes waiting for a core on a loaded machine); (c) the
   fixed cost of a job: a tiny job through the warm service, one at a time, minus the same job in this process;
7. prints a table and writes everything as JSON (bench/results/fleet.json).

DESIGN target: 100 markets retrained and through the gate within 6 minutes on 2 cores (scaled to N markets for
other N). Timings depend on the machine and on whatever else runs on it; the load average is recorded next to the
results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import grpc
import pandas as pd

from bench.inference import SAMPLE, TIMEFRAME, _loadavg, machine

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "fleet.json"
YEAR_START, YEAR_END = "2018-01-01", "2019-01-01"
TINY_START, TINY_END, TINY_TREES = "2018-03-01", "2018-08-01", 8
TINY_JOBS = 3
DEFAULT_MARKETS, QUICK_MARKETS = 100, 10
TARGET_S, TARGET_MARKETS = 360.0, 100  # 100 markets within 6 minutes on 2 cores
POLICY_EVERY_S, POLICY_WINDOW_S = 30 * 86_400, 365 * 86_400
POLL_S = 0.5
TIMEOUT_S = 3600.0  # a fleet that has not finished by then is reported as incomplete


WARMUP = "WARMUP/USD"  # the market of the warm-up and tiny jobs, outside the fleet


def symbol_of(i: int) -> str:
    return f"FLEET{i:03d}/USD"


def _ms(text: str) -> int:
    return int(pd.Timestamp(text, tz="UTC").value // 1_000_000)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# set-up


def year_frame() -> pd.DataFrame:
    from shared.store.importers import read_candles

    frame = read_candles(SAMPLE, TIMEFRAME)
    t = frame["open_time_ms"]
    return frame[(t >= _ms(YEAR_START)) & (t < _ms(YEAR_END))].reset_index(drop=True)


def prepare_database(url: str, markets: int, frame: pd.DataFrame) -> None:
    from shared.store.db import make_engine
    from shared.store.marketdata import insert_candles
    from shared.store.migrate import upgrade

    upgrade(url)
    engine = make_engine(url)
    try:
        for i in range(markets):
            scaled = frame.copy()
            factor = 1.0 + i / 100.0
            for col in ("open", "high", "low", "close"):
                scaled[col] = frame[col] * factor
            insert_candles(engine, symbol_of(i), TIMEFRAME, scaled)
        insert_candles(engine, WARMUP, TIMEFRAME, frame)
    finally:
        engine.dispose()


def _settings(**values: Any):
    """Settings with the given values; fields this version of the service does not have are left out."""
    from shared.settings import Settings

    known = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in known})


# ----------------------------------------------------------------------------------------------------------------------
# reference times in this process


def in_process_seconds(url: str, symbol: str, start: str, end: str, trees: int,
                       repeats: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of `train_job` for one market on one core, in this (warm) process; the first call warms
    up."""
    from shared.params import ForestParams
    from training_service.jobs import TrainingRequest
    from training_service.worker import train_job

    params = ForestParams(n_estimators=trees) if trees else ForestParams()
    request = TrainingRequest(symbol, TIMEFRAME, _ms(start), _ms(end), params=params).to_json()
    train_job(request, url, 1, lambda stage, frac: None)
    seconds = []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        train_job(request, url, 1, lambda stage, frac: None)
        seconds.append((time.perf_counter() - t, time.process_time() - c))
    return seconds


def _proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            after = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(after[11]) + int(after[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# ----------------------------------------------------------------------------------------------------------------------
# one fleet


@dataclass
class FleetResult:
    executor: str
    description: str
    markets: int
    workers: int
    submitted_with: str
    complete: bool
    wall_s: float | None  # first request to the last job's finished_at
    observed_s: float  # first request to this client seeing every market's model
    jobs: list[dict] = field(default_factory=list)
    stages: dict[str, int] = field(default_factory=dict)
    failed_jobs: int = 0
    tiny_job_s: list[float] = field(default_factory=list)
    first_jobs_s: float | None = None  # the warm-up jobs: their longest started_at .. finished_at
    worker_cpu_s: float | None = None  # CPU the workers (Dask workers, or child processes) spent during the fleet
    service_cpu_s: float | None = None  # CPU this process (the service, and this client) spent during the fleet
    worker_rss_mib: list[float] = field(default_factory=list)
    load_before: list[float] | None = None
    load_after: list[float] | None = None

    def summary(self, fit_s: float, fit_cpu_s: float, tiny_in_process_s: float) -> dict:
        run = [j["run_s"] for j in self.jobs if j["run_s"] is not None]
        wait = [j["queued_s"] for j in self.jobs if j["queued_s"] is not None]
        wall = self.wall_s
        target = TARGET_S * self.markets / TARGET_MARKETS
        per_slot = wall * self.workers / self.markets if wall else None
        tiny = statistics.median(self.tiny_job_s) if self.tiny_job_s else None
        return {
            "executor": self.executor,
            "description": self.description,
            "markets": self.markets,
            "workers": self.workers,
            "submitted_with": self.submitted_with,
            "complete": self.complete,
            "wall_s": wall,
            "jobs_per_min": self.markets / wall * 60 if wall else None,
            "job_run_s_median": statistics.median(run) if run else None,
            "job_run_s_max": max(run) if run else None,
            "job_queued_s_max": max(wait) if wait else None,
            "fit_s": fit_s,
            "fit_cpu_s": fit_cpu_s,
            "worker_cpu_s_per_job": self.worker_cpu_s / self.markets if self.worker_cpu_s is not None else None,
            "service_cpu_s_per_job": self.service_cpu_s / self.markets if self.service_cpu_s is not None else None,
            "first_jobs_s": self.first_jobs_s,
            "slot_s_per_job": per_slot,
            "overhead_s_per_job": per_slot - fit_s if per_slot is not None else None,
            "tiny_job_s": tiny,
            "tiny_in_process_s": tiny_in_process_s,
            "tiny_overhead_s": tiny - tiny_in_process_s if tiny is not None else None,
            "stages": self.stages,
            "failed_jobs": self.failed_jobs,
            "target_s": target,
            "pass": bool(self.complete and wall is not None and wall <= target),
            "worker_rss_mib": self.worker_rss_mib,
            "load_before": self.load_before,
            "load_after": self.load_after,
        }


def _ts_ms(ts) -> int | None:
    return ts.ToMilliseconds() if ts.seconds or ts.nanos else None


def _submit_policies(stub, markets: int) -> bool:
    """Set one retrain policy per market; False when the service has no retrain policies."""
    from google.protobuf.duration_pb2 import Duration

    from mlsignal.v1 import training_pb2

    if not hasattr(stub, "SetRetrainPolicy") or not hasattr(training_pb2, "RetrainPolicy"):
        return False
    for i in range(markets):
        policy = training_pb2.RetrainPolicy(symbol=symbol_of(i), timeframe=TIMEFRAME,
                                            every=Duration(seconds=POLICY_EVERY_S),
                                            window=Duration(seconds=POLICY_WINDOW_S))
        try:
            stub.SetRetrainPolicy(policy, timeout=30)
        except grpc.RpcError as exc:
            if i == 0 and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return False
            raise
    return True


def _submit_jobs(stub, markets: int) -> None:
    from google.protobuf.timestamp_pb2 import Timestamp

    from mlsignal.v1 import training_pb2

    start, end = Timestamp(), Timestamp()
    start.FromMilliseconds(_ms(YEAR_START))
    end.FromMilliseconds(_ms(YEAR_END))
    for i in range(markets):
        stub.StartTraining(training_pb2.StartTrainingRequest(symbol=symbol_of(i), timeframe=TIMEFRAME,
                                                             start_time=start, end_time=end), timeout=30)


def _rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class _WorkerCpu:
    """CPU seconds spent by the executor's workers: the Dask workers, or this process's child processes (the local
    workers: those still running, read from /proc, and those that ended, from the children's times)."""

    def __init__(self, executor, client) -> None:
        self.executor = executor
        self.client = client

    def read(self) -> dict[str, float]:
        if self.client is not None:
            return {str(k): float(v) for k, v in self.client.run(_own_cpu_s).items()}
        t = os.times()
        cpu = {"ended": t.children_user + t.children_system}
        pids = getattr(self.executor, "worker_pids", None)
        if pids is not None:
            cpu.update({str(pid): c for pid in pids() if (c := _proc_cpu_s(pid)) is not None})
        return cpu

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> float:
        """CPU spent between two readings: a worker that ended meanwhile moved its CPU into the children's times,
        a new one started from nothing."""
        return sum(after.values()) - sum(before.values())


def _tiny_request(training_pb2, common_pb2):
    return training_pb2.StartTrainingRequest(
        symbol=WARMUP, timeframe=TIMEFRAME, start_time=_timestamp(TINY_START), end_time=_timestamp(TINY_END),
        params=common_pb2.ModelParams(n_estimators=TINY_TREES), purpose=training_pb2.TRAINING_PURPOSE_RESEARCH)


def _run_s(job) -> float | None:
    started, finished = _ts_ms(job.started_at), _ts_ms(job.finished_at)
    return (finished - started) / 1e3 if started and finished else None


def run_fleet(executor: str, base_db: Path, root: Path, markets: int, workers: int, submit: str,
              fit_jobs: int | None) -> FleetResult:
    from mlsignal.client.training import model_stage_name
    from mlsignal.v1 import common_pb2, training_pb2, training_pb2_grpc
    from training_service.server import start as start_training

    db = root / f"{executor}.db"
    shutil.copyfile(base_db, db)
    url = f"sqlite:///{db}"
    values: dict[str, Any] = dict(database_url=url, model_dir=root / f"{executor}-models", log_level="WARNING",
                                  training_workers=workers)
    if fit_jobs is not None:
        values["training_fit_jobs"] = fit_jobs
    if submit == "start":
        values["training_queue_size"] = max(16, markets)  # every market's job is queued at once
    cluster = client = None
    if executor == "dask":
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=workers, processes=True, threads_per_worker=1, dashboard_address=None,
                               local_directory=str(root / "dask-scratch"))
        client = Client(cluster)
        values["dask_scheduler"] = cluster.scheduler_address
    training = start_training(_settings(**values), "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{training.port}")
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    description = training.scheduler.executor.description
    cpu = _WorkerCpu(training.scheduler.executor, client)
    try:
        # a running service: every worker has run a job
        warm = [stub.StartTraining(_tiny_request(training_pb2, common_pb2), timeout=30) for _ in range(workers)]
        first = [_run_s(_wait_job(stub, job.job_id)) for job in warm]
        first_jobs_s = max((r for r in first if r is not None), default=None)
        _log(f"{executor}: warm-up jobs took up to {_f(first_jobs_s, 2)} s")

        load_before = _loadavg()
        cpu_before, own_before = cpu.read(), _own_cpu_s()
        t0 = time.time()
        t0_mono = time.monotonic()
        submitted_with = "SetRetrainPolicy" if submit != "start" and _submit_policies(stub, markets) else ""
        if not submitted_with:
            if submit == "policies":
                raise RuntimeError("the training service has no retrain policies (SetRetrainPolicy)")
            _submit_jobs(stub, markets)
            submitted_with = "StartTraining"
        _log(f"{executor}: {markets} markets given to the service with {submitted_with} "
             f"({time.monotonic() - t0_mono:.1f} s)")
        symbols = {symbol_of(i) for i in range(markets)}
        done: dict[str, Any] = {}
        reported = 0
        while time.monotonic() - t0_mono < TIMEOUT_S:
            models = stub.ListModels(training_pb2.ListModelsRequest(), timeout=30).models
            done = {m.symbol: m for m in models if m.symbol in symbols and m.stage}
            bad = stub.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(
                states=[training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED], limit=10_000),
                timeout=30).jobs
            failed = {j.request.symbol for j in bad if j.request.symbol in symbols}
            if len(done) // 10 > reported // 10 or len(done) == markets:
                reported = len(done)
                _log(f"{executor}: {len(done)}/{markets} markets trained ({time.monotonic() - t0_mono:.0f} s)")
            if len(done) + len(failed - set(done)) >= markets:  # every market has a model or a failed job
                break
            time.sleep(POLL_S)
        observed = time.monotonic() - t0_mono
        worker_cpu = _WorkerCpu.spent(cpu_before, cpu.read())
        service_cpu = _own_cpu_s() - own_before
        load_after = _loadavg()

        jobs = stub.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(limit=10_000), timeout=30).jobs
        rows = []
        for j in jobs:
            if j.request.symbol not in symbols:
                continue
            created, started, finished = _ts_ms(j.created_at), _ts_ms(j.started_at), _ts_ms(j.finished_at)
            rows.append({
                "symbol": j.request.symbol,
                "state": training_pb2.JobState.Name(j.state),
                "queued_s": (started - created) / 1e3 if started and created else None,
                "run_s": _run_s(j),
                "finished_after_s": finished / 1e3 - t0 if finished else None,
                "error": j.error,
            })
        finished_after = [r["finished_after_s"] for r in rows if r["state"] == "JOB_STATE_SUCCEEDED"
                          and r["finished_after_s"] is not None]
        complete = len(done) == markets
        stages: dict[str, int] = {}
        for m in done.values():
            name = model_stage_name(m.stage)
            stages[name] = stages.get(name, 0) + 1

        # the fixed cost of a job on the warm service: tiny jobs, one at a time
        tiny = []
        for _ in range(TINY_JOBS):
            job = stub.StartTraining(_tiny_request(training_pb2, common_pb2), timeout=30)
            seconds = _run_s(_wait_job(stub, job.job_id))
            if seconds is not None:
                tiny.append(seconds)
        pids = getattr(training.scheduler.executor, "worker_pids", None)
        rss = [r for r in (_rss_mib(pid) for pid in pids()) if r is not None] if pids is not None else []
        return FleetResult(
            executor=executor, description=description, markets=markets, workers=workers,
            submitted_with=submitted_with, complete=complete,
            wall_s=max(finished_after) if complete and finished_after else None, observed_s=observed,
            jobs=rows, stages=stages, failed_jobs=len([r for r in rows if r["state"] != "JOB_STATE_SUCCEEDED"]),
            tiny_job_s=tiny, first_jobs_s=first_jobs_s, worker_cpu_s=worker_cpu, service_cpu_s=service_cpu,
            worker_rss_mib=rss, load_before=load_before, load_after=load_after)
    finally:
        channel.close()
        training.stop(0.5)
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def _timestamp(text: str):
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    t.FromMilliseconds(_ms(text))
    return t


def _wait_job(stub, job_id: str, timeout: float = 300.0):
    from mlsignal.v1 import training_pb2

    final_states = {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED,
                    training_pb2.JOB_STATE_CANCELLED}
    for job in stub.WatchTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job_id), timeout=timeout):
        if job.state in final_states:
            return job
    raise RuntimeError(f"job {job_id} did not finish in {timeout:.0f} s")


# ----------------------------------------------------------------------------------------------------------------------
# report


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def format_table(summaries: list[dict], meta: dict) -> str:
    head = (f"{'executor':<8} {'markets':>7} {'submitted with':<16} {'wall s':>7} {'jobs/min':>8} {'job s p50':>9} "
            f"{'CPU s/job':>9} {'fit CPU s':>9} {'slot s/job':>10} {'fit s':>6} {'1st jobs s':>10} {'tiny s':>6} "
            f"{'tiny ovh s':>10}  stages")
    lines = [head, "-" * len(head)]
    for s in summaries:
        stages = ", ".join(f"{k} {v}" for k, v in sorted(s["stages"].items())) or "-"
        lines.append(
            f"{s['executor']:<8} {s['markets']:>7,} {s['submitted_with']:<16} {_f(s['wall_s']):>7} "
            f"{_f(s['jobs_per_min']):>8} {_f(s['job_run_s_median'], 2):>9} {_f(s['worker_cpu_s_per_job'], 2):>9} "
            f"{_f(s['fit_cpu_s'], 2):>9} {_f(s['slot_s_per_job'], 2):>10} {_f(s['fit_s'], 2):>6} "
            f"{_f(s['first_jobs_s'], 2):>10} {_f(s['tiny_job_s'], 2):>6} {_f(s['tiny_overhead_s'], 2):>10}  {stages}")
    lines.append("")
    lines.append("wall s: first request to the last job's finished_at; job s p50: a job's started_at .. finished_at "
                 f"({meta['workers']} run at once);")
    lines.append("CPU s/job: CPU seconds the workers spent during the fleet / markets; fit CPU s and fit s: the same "
                 f"market's training in this process on one core, warm (median of {meta['fit_repeats']});")
    lines.append("slot s/job: wall x workers / markets, to compare with fit s (it includes waiting for a core on a "
                 "loaded machine);")
    lines.append(f"1st jobs s: the warm-up, one {TINY_TREES}-tree job per worker at once (a worker's first job); "
                 f"tiny s: the same job through the warm service, one at a time (median of {TINY_JOBS});")
    lines.append(f"tiny ovh s: tiny s minus the same job in this process ({_f(meta['tiny_in_process_s'], 2)} s): "
                 "the fixed cost of a job")
    for s in summaries:
        extra = []
        if s["service_cpu_s_per_job"] is not None:
            extra.append(f"service process CPU {s['service_cpu_s_per_job']:.2f} s/job")
        if s["worker_rss_mib"]:
            extra.append(f"worker RSS after the fleet {', '.join(f'{r:,.0f}' for r in s['worker_rss_mib'])} MiB")
        extra.append(f"load average before {s['load_before']}, after {s['load_after']}")
        lines.append(f"{s['executor']}: {s['description']}; " + "; ".join(extra))
    lines.append("")
    lines.append("DESIGN target")
    for s in summaries:
        scaled = "" if s["markets"] == TARGET_MARKETS else f" (scaled from {TARGET_S:.0f} s for {TARGET_MARKETS})"
        measured = f"{_f(s['wall_s'])} s" if s["complete"] else \
            f"incomplete: {s['failed_jobs']} job(s) did not succeed"
        lines.append(f"  [{'PASS' if s['pass'] else 'FAIL'}] {s['executor']}: {s['markets']} markets retrained and "
                     f"through the gate within {s['target_s']:.0f} s{scaled}: {measured}")
    m = meta["machine"]
    lines.append("")
    lines.append(f"markets: {YEAR_START} .. {YEAR_END} of the bundled BTC/USD 1h sample ({meta['candles']:,} candles) "
                 f"per market, default parameters; MLSIGNAL_TRAINING_FIT_JOBS {meta['fit_jobs']}")
    lines.append(f"machine: {m['cores']} cores ({m['usable_cores']} usable), Python {m['python']}; load average "
                 f"before {meta['load_before']}, after {meta['load_after']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet",
                                 description="Retrain a fleet of markets through the training service and time it.")
    ap.add_argument("--markets", type=int, default=None, help=f"markets in the fleet (default: {DEFAULT_MARKETS})")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_MARKETS} markets")
    ap.add_argument("--executors", default="local,dask", help="comma-separated: local, dask (default: both)")
    ap.add_argument("--workers", type=int, default=2,
                    help="MLSIGNAL_TRAINING_WORKERS, and the Dask LocalCluster's worker processes (default: 2)")
    ap.add_argument("--submit", choices=("auto", "policies", "start"), default="auto",
                    help="auto: retrain policies when the service has them, else StartTraining (default)")
    ap.add_argument("--fit-jobs", type=int, default=None,
                    help="MLSIGNAL_TRAINING_FIT_JOBS for the service (default: the service's default, -1)")
    ap.add_argument("--fit-repeats", type=int, default=1, help="in-process fit timings (median; default: 1)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"also write the JSON here (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    markets = args.markets or (QUICK_MARKETS if args.quick else DEFAULT_MARKETS)
    executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    if markets < 1 or args.workers < 1 or args.fit_repeats < 1:
        ap.error("--markets, --workers and --fit-repeats must be >= 1")
    if not executors or set(executors) - {"local", "dask"}:
        ap.error("--executors: local, dask or both")
    # Dask workers take the database URL the service sends; a caller's own must not leak into them.
    os.environ.pop("MLSIGNAL_DATABASE_URL", None)

    t_all = time.perf_counter()
    load_before = _loadavg()
    results: list[FleetResult] = []
    with tempfile.TemporaryDirectory(prefix="mlsignal-fleet-") as tmp:
        root = Path(tmp)
        base = root / "base.db"
        frame = year_frame()
        _log(f"importing {markets} markets x {len(frame):,} candles ...")
        prepare_database(f"sqlite:///{base}", markets, frame)
        _log("timing one market's training in this process ...")
        fit = in_process_seconds(f"sqlite:///{base}", symbol_of(0), YEAR_START, YEAR_END, 0, args.fit_repeats)
        tiny_in_process = in_process_seconds(f"sqlite:///{base}", WARMUP, TINY_START, TINY_END, TINY_TREES, 3)
        fit_s = statistics.median(w for w, _ in fit)
        fit_cpu_s = statistics.median(c for _, c in fit)
        tiny_s = statistics.median(w for w, _ in tiny_in_process)
        _log(f"fit {fit_s:.2f} s ({fit_cpu_s:.2f} s CPU), tiny job {tiny_s:.2f} s in process")
        for executor in executors:
            _log(f"{executor}: starting the training service ({args.workers} workers) ...")
            results.append(run_fleet(executor, base, root, markets, args.workers, args.submit, args.fit_jobs))
    summaries = [r.summary(fit_s, fit_cpu_s, tiny_s) for r in results]
    meta = {
        "markets": markets,
        "workers": args.workers,
        "fit_jobs": args.fit_jobs if args.fit_jobs is not None else "default",
        "candles": len(frame),
        "window": [YEAR_START, YEAR_END],
        "fit_repeats": args.fit_repeats,
        "fit_s": [w for w, _ in fit],
        "fit_cpu_s": [c for _, c in fit],
        "tiny_in_process_s": tiny_s,
        "machine": machine(),
        "load_before": load_before,
        "load_after": _loadavg(),
        "wall_seconds": time.perf_counter() - t_all,
    }
    report = {"meta": meta, "target": {"markets": TARGET_MARKETS, "seconds": TARGET_S}, "summary": summaries,
              "jobs": {r.executor: r.jobs for r in results}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(summaries, meta))
        print(f"\nwrote {args.out} ({meta['wall_seconds']:.0f} s in all)")
    return 0 if all(s["complete"] for s in summaries) else 1


if __name__ == "__main__":
    raise SystemExit(main())
