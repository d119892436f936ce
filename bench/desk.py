"""Desk scale: thousands of open StreamPredict streams on one inference replica, and a candle-close burst.

    .venv/bin/python -m bench.desk [--streams 100,1000,5000] [--quick] [--json]     (or: make bench-desk)
    .venv/bin/python -m bench.desk --markets 1000 [--promotion-check] [--idle-seconds 10]   (a fleet: bench.desk_fleet)

What it does:

1. imports the bundled BTC/USD 1h sample into a temporary SQLite database and trains a model through the training
   service (the set-up of `bench.inference`: 200 trees, 40 with --quick);
2. for each N, starts a fresh inference server as its own process (`python -m inference_service.server`, with
   MLSIGNAL_MAX_STREAMS = N + 100) and drives it from this process, a separate client process, with one asyncio event
   loop over a few `grpc.aio` channels (each its own HTTP/2 connection);
3. the floor: N concurrent `grpc.health.v1` Check calls released at the same instant, on an idle server;
4. opens N streams at once, each warmed with one message of 120 candles (BTC/USD 1h after the training window, a
   different window per stream), and reads the server's RSS (/proc/<pid>/status VmRSS) before and with all N open;
5. then, `--rounds` times: N concurrent health checks with the streams open, and the candle-close burst: every
   stream sends its next candle at the same instant. Burst time is from that instant (the first send) to the last
   answer; a stream's latency is from that instant to its own answer;
6. prints a table (medians over the rounds) with the ratios to the floor, or JSON with --json.

Every call has a deadline (`--timeout`), so a server that cannot hold the streams shows up as timed-out or refused
streams in the table instead of a hang. Timings depend on the machine and on whatever else runs on it; the client
shares the machine's cores with the server, and the load average is recorded next to the results.

`--markets N` is the fleet mode (`bench.desk_fleet`): the same set-up, but one stream per market and N markets, each
with its own serving model, so the server loads, holds and watches N models.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.inference import (
    SYMBOL,
    TIMEFRAME,
    TRAIN_END,
    TRAIN_START,
    _loadavg,
    machine,
    prepare_database,
    train_model,
)
from mlsignal.v1 import inference_pb2, inference_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "desk.json"
FLEET_OUT = REPO / "bench" / "results" / "desk_fleet.json"
DEFAULT_STREAMS = (100, 1000, 5000)
QUICK_STREAMS = (100, 1000)
WARM_CANDLES = 120  # candles in each stream's first message
WINDOWS = 256  # distinct candle windows; stream i uses window i % WINDOWS
STREAM_HEADROOM = 100  # MLSIGNAL_MAX_STREAMS = N + STREAM_HEADROOM
TARGET_RATIO = 1.0  # the 1,000-stream burst completes in <= 1.0 x the time of 1,000 concurrent health checks
TARGET_N = 1000
SERVER_START_TIMEOUT_S = 60.0


# ----------------------------------------------------------------------------------------------------------------------
# the inference server, in its own process


class ServerProcess:
    """`python -m inference_service.server` on 127.0.0.1:<free port>, configured through the environment."""

    def __init__(self, url: str, model_dir: Path, max_streams: int, log_path: Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.target = f"127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update({
            "MLSIGNAL_DATABASE_URL": url,
            "MLSIGNAL_MODEL_DIR": str(model_dir),
            "MLSIGNAL_INFERENCE_ADDR": self.target,
            "MLSIGNAL_MAX_STREAMS": str(max_streams),
            "MLSIGNAL_LOG_LEVEL": "WARNING",
            "MLSIGNAL_GRACE_SECONDS": "1",
        })
        env.update(extra_env or {})
        env.pop("MLSIGNAL_METRICS_PORT", None)
        env.pop("MLSIGNAL_AUTH_TOKEN", None)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "inference_service.server"], env=env, cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_serving(self, timeout: float = SERVER_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the inference server exited with code {self.proc.returncode}: "
                                       f"{self.log_path.read_text(errors='replace')[-2000:]}")
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the inference server is not SERVING after {timeout:.0f} s")
                time.sleep(0.1)

    def rss_bytes(self) -> int:
        """The server's resident set size, from /proc/<pid>/status (VmRSS, in kB)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS in /proc/{self.pid}/status")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


_SET_BY_BENCH = {"MLSIGNAL_DATABASE_URL", "MLSIGNAL_MODEL_DIR", "MLSIGNAL_INFERENCE_ADDR", "MLSIGNAL_MAX_STREAMS",
                 "MLSIGNAL_LOG_LEVEL", "MLSIGNAL_GRACE_SECONDS", "MLSIGNAL_METRICS_PORT", "MLSIGNAL_AUTH_TOKEN",
                 "MLSIGNAL_MODEL_POLL_SECONDS", "MLSIGNAL_MODEL_CACHE_SIZE"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------------------------------------------------
# the client: one asyncio loop, a few grpc.aio channels


@dataclass
class Burst:
    """N concurrent calls released at one instant: the burst time and the per-call latencies (successful calls)."""

    calls: int
    ok: int = 0
    timeouts: int = 0
    refused: int = 0
    failed: int = 0
    burst_ms: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    server_cpu_s: float | None = None
    client_cpu_s: float | None = None  # this process, all threads
    errors: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, outcomes: list[tuple[str, float]], server_cpu_s: float | None = None) -> Burst:
        b = cls(calls=len(outcomes), server_cpu_s=server_cpu_s)
        lat = sorted(ms for kind, ms in outcomes if kind == "ok")
        b.ok = len(lat)
        for kind, _ in outcomes:
            if kind == "timeout":
                b.timeouts += 1
            elif kind == "refused":
                b.refused += 1
            elif kind != "ok":
                b.failed += 1
                if len(b.errors) < 3 and kind not in b.errors:
                    b.errors.append(kind)
        if lat:
            b.burst_ms = lat[-1]
            b.p50_ms = _percentile(lat, 50)
            b.p99_ms = _percentile(lat, 99)
            b.max_ms = lat[-1]
        return b


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on an already sorted list."""
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _classify(err: BaseException) -> str:
    if isinstance(err, asyncio.TimeoutError):
        return "timeout"
    if isinstance(err, grpc.aio.AioRpcError):
        code = err.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "timeout"
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return "refused"
        return f"{code.name}: {err.details()}"
    return f"{type(err).__name__}: {err}"


class Stream:
    """One open StreamPredict call and the candles it sends."""

    def __init__(self, call: Any, warm: inference_pb2.PredictRequest, nexts: list[inference_pb2.PredictRequest]):
        self.call = call
        self.warm = warm
        self.nexts = nexts
        self.open = False
        self.last_ready = False
        self.model_id = ""  # the model that answered the last message

    def sender(self, i: int):
        """A call that sends this stream's i-th next candle; a stream that fails is marked closed (out of step)."""
        async def run() -> str:
            try:
                kind = await self.exchange(self.nexts[i])
            except BaseException:
                self.open = False
                raise
            self.open = kind == "ok"
            return kind
        return run

    async def exchange(self, request: inference_pb2.PredictRequest) -> str:
        """Send one message and read its answer: "ok", or what went wrong."""
        await self.call.write(request)
        resp = await self.call.read()
        if resp is grpc.aio.EOF:
            code = await self.call.code()
            return "refused" if code == grpc.StatusCode.RESOURCE_EXHAUSTED else \
                f"{code.name}: {await self.call.details()}"
        if resp.HasField("error"):
            return f"stream error {resp.error.code}: {resp.error.message}"
        if len(resp.predictions) != len(request.candles):
            return f"{len(resp.predictions)} predictions for {len(request.candles)} candles"
        self.last_ready = resp.predictions[-1].ready
        self.model_id = resp.model_id
        return "ok"


async def _released(start: asyncio.Event, t0: list[float], call, timeout: float) -> tuple[str, float]:
    """Wait for the common start, run `call()`, and return (outcome, ms from the common start)."""
    await start.wait()
    try:
        kind = await asyncio.wait_for(call(), timeout)
    except Exception as exc:  # an RPC error or the deadline: counted, never raised
        kind = _classify(exc)
    return kind, (time.perf_counter() - t0[0]) * 1000


async def burst(make_calls: list, timeout: float, server: ServerProcess | None = None) -> Burst:
    """Release `make_calls` (coroutine factories) at one instant; every task is waiting on the event before it."""
    start = asyncio.Event()
    t0 = [0.0]
    tasks = [asyncio.ensure_future(_released(start, t0, c, timeout)) for c in make_calls]
    await asyncio.sleep(0)  # every task reaches start.wait()
    await asyncio.sleep(0)
    cpu0 = server.cpu_seconds() if server else None
    client0 = time.process_time()
    t0[0] = time.perf_counter()
    start.set()
    outcomes = await asyncio.gather(*tasks)
    client = time.process_time() - client0
    cpu = server.cpu_seconds() - cpu0 if server and cpu0 is not None else None
    b = Burst.of(list(outcomes), cpu)
    b.client_cpu_s = client
    return b


def health_calls(stubs: list, n: int, timeout: float) -> list:
    request = health_pb2.HealthCheckRequest(service="")

    def make(stub):
        async def check() -> str:
            resp = await stub.Check(request, timeout=timeout)
            return "ok" if resp.status == health_pb2.HealthCheckResponse.SERVING else f"status {resp.status}"
        return check

    return [make(stubs[i % len(stubs)]) for i in range(n)]


@dataclass
class DeskResult:
    streams: int
    channels: int
    rounds: int
    warm_candles: int
    max_streams_setting: int
    floor: list[Burst]
    opened: Burst
    health_open: list[Burst]
    candle: list[Burst]
    rss_before_bytes: int
    rss_open_bytes: int
    rss_after_bytes: int
    warm_predict_ms: float
    ready_in_last_burst: int
    client_cpu_s: float
    wall_s: float

    def median(self, bursts: list[Burst], key: str) -> float | None:
        values = [getattr(b, key) for b in bursts if getattr(b, key) is not None]
        return statistics.median(values) if values else None

    def summary(self) -> dict:
        floor = self.median(self.floor, "burst_ms")
        candle = self.median(self.candle, "burst_ms")
        health_open = self.median(self.health_open, "burst_ms")
        opened = self.opened.ok
        complete = opened == self.streams and all(b.ok == b.calls for b in self.candle) \
            and all(b.ok == b.calls for b in self.floor)
        return {
            "streams": self.streams,
            "opened": opened,
            "open_refused": self.opened.refused,
            "open_timeouts": self.opened.timeouts,
            "open_failed": self.opened.failed,
            "open_ms": self.opened.burst_ms,
            "floor_burst_ms": floor,
            "floor_p50_ms": self.median(self.floor, "p50_ms"),
            "floor_p99_ms": self.median(self.floor, "p99_ms"),
            "floor_failures": sum(b.calls - b.ok for b in self.floor),
            "health_open_burst_ms": health_open,
            "health_open_p99_ms": self.median(self.health_open, "p99_ms"),
            "health_open_failures": sum(b.calls - b.ok for b in self.health_open),
            "candle_burst_ms": candle,
            "candle_p50_ms": self.median(self.candle, "p50_ms"),
            "candle_p99_ms": self.median(self.candle, "p99_ms"),
            "candle_failures": sum(b.calls - b.ok for b in self.candle),
            "candle_server_cpu_ms": _ms(self.median(self.candle, "server_cpu_s")),
            "floor_server_cpu_ms": _ms(self.median(self.floor, "server_cpu_s")),
            "burst_to_floor": candle / floor if candle and floor else None,
            "health_open_to_floor": health_open / floor if health_open and floor else None,
            "complete": complete,
            "ready_in_last_burst": self.ready_in_last_burst,
            "rss_before_mib": self.rss_before_bytes / 2**20,
            "rss_open_mib": self.rss_open_bytes / 2**20,
            "kib_per_stream": (self.rss_open_bytes - self.rss_before_bytes) / 1024 / opened if opened else None,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def open_channels(target: str, n: int) -> list[grpc.aio.Channel]:
    """`n` channels to `target`, each its own HTTP/2 connection (a local subchannel pool)."""
    return [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1),
                                                       ("grpc.max_receive_message_length", 64 << 20)])
            for _ in range(n)]


async def ready_stubs(chans: list[grpc.aio.Channel], timeout: float) -> tuple[list, list]:
    """Health and inference stubs on every channel, once every channel is connected."""
    for c in chans:
        await asyncio.wait_for(c.channel_ready(), timeout)
    return ([health_pb2_grpc.HealthStub(c) for c in chans],
            [inference_pb2_grpc.InferenceServiceStub(c) for c in chans])


def _windows(frame: pd.DataFrame, rounds: int) -> tuple[list, list]:
    """WINDOWS candle windows after the training window: (warm request, next-candle requests) per window."""
    from mlsignal.client.frames import frame_to_candles

    after = frame[frame.open_time_ms >= pd.Timestamp(TRAIN_END, tz="UTC").value // 1_000_000].reset_index(drop=True)
    length = WARM_CANDLES + rounds
    if len(after) < WINDOWS + length:
        raise RuntimeError(f"the sample has {len(after)} candles after {TRAIN_END}; need {WINDOWS + length}")
    candles = frame_to_candles(after.iloc[:WINDOWS + length])
    warm, nexts = [], []
    for j in range(WINDOWS):
        warm.append(inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TIMEFRAME,
                                                 candles=candles[j:j + WARM_CANDLES]))
        nexts.append([inference_pb2.PredictRequest(candles=[candles[j + WARM_CANDLES + r]]) for r in range(rounds)])
    return warm, nexts


async def desk_run(server: ServerProcess, n: int, frame: pd.DataFrame, channels: int, rounds: int,
                   timeout: float, log) -> DeskResult:
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    warm, nexts = _windows(frame, rounds)
    chans = open_channels(server.target, channels)
    try:
        health_stubs, infer_stubs = await ready_stubs(chans, timeout)

        # The model loads on first use: one Predict before anything is measured.
        t = time.perf_counter()
        await infer_stubs[0].Predict(warm[0], timeout=max(timeout, 60.0))
        warm_predict_ms = (time.perf_counter() - t) * 1000
        await burst(health_calls(health_stubs, min(n, 100), timeout), timeout)  # warm the connections

        log(f"  floor: {n} concurrent health checks x {rounds} ...")
        floor = [await burst(health_calls(health_stubs, n, timeout), timeout, server) for _ in range(rounds)]
        rss_before = server.rss_bytes()

        # Open the streams. A stream's deadline covers its whole life; each phase has its own wait below.
        life = timeout * (3 + 2 * rounds) + 60
        streams = [Stream(infer_stubs[i % channels].StreamPredict(timeout=life), warm[i % WINDOWS],
                          nexts[i % WINDOWS]) for i in range(n)]

        def opener(s: Stream):
            async def run() -> str:
                kind = await s.exchange(s.warm)
                s.open = kind == "ok"
                return kind
            return run

        log(f"  opening {n} streams, {WARM_CANDLES} candles each ...")
        opened = await burst([opener(s) for s in streams], timeout, server)
        for s in streams:
            if not s.open:
                s.call.cancel()
        await asyncio.sleep(0.5)
        rss_open = server.rss_bytes()

        health_open, candle = [], []
        for r in range(rounds):
            live = [s for s in streams if s.open]  # a stream that failed a round is out of step: not used again
            log(f"  round {r + 1}/{rounds}: {n} health checks with the streams open, then the candle-close burst "
                f"of {len(live)} streams ...")
            health_open.append(await burst(health_calls(health_stubs, n, timeout), timeout, server))

            candle.append(await burst([s.sender(r) for s in live], timeout, server))
        # Whether the burst's candles were ready (the warm-up covered the model's warmup_bars).
        ready = sum(s.last_ready for s in streams if s.open)
        for s in streams:
            s.call.cancel()
        await asyncio.sleep(0.5)
        rss_after = server.rss_bytes()
    finally:
        for c in chans:
            await c.close()
    return DeskResult(
        streams=n, channels=channels, rounds=rounds, warm_candles=WARM_CANDLES, max_streams_setting=n + STREAM_HEADROOM,
        floor=floor, opened=opened, health_open=health_open, candle=candle, rss_before_bytes=rss_before,
        rss_open_bytes=rss_open, rss_after_bytes=rss_after, warm_predict_ms=warm_predict_ms,
        ready_in_last_burst=ready, client_cpu_s=time.process_time() - cpu_start, wall_s=time.perf_counter() - t_start,
    )


# ----------------------------------------------------------------------------------------------------------------------
# report


def _f(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def format_table(results: list[DeskResult], meta: dict) -> str:
    rows = [r.summary() for r in results]
    head = (f"{'streams':>7} {'opened':>7} {'refused':>7} {'timeout':>7} | {'floor ms':>9} {'p99':>7} {'srv CPU':>7} | "
            f"{'hlth open':>9} {'x floor':>7} | {'burst ms':>9} {'p50':>7} {'p99':>7} {'srv CPU':>7} {'x floor':>7} | "
            f"{'RSS MiB':>7} {'KiB/strm':>8}")
    lines = [head, "-" * len(head)]
    for s in rows:
        ratio = f"{s['burst_to_floor']:.2f}x" if s["burst_to_floor"] else "-"
        hratio = f"{s['health_open_to_floor']:.2f}x" if s["health_open_to_floor"] else "-"
        lines.append(
            f"{s['streams']:>7,} {s['opened']:>7,} {s['open_refused']:>7,} {s['open_timeouts']:>7,} | "
            f"{_f(s['floor_burst_ms']):>9} {_f(s['floor_p99_ms']):>7} {_f(s['floor_server_cpu_ms'], 0):>7} | "
            f"{_f(s['health_open_burst_ms']):>9} {hratio:>7} | "
            f"{_f(s['candle_burst_ms']):>9} {_f(s['candle_p50_ms']):>7} {_f(s['candle_p99_ms']):>7} "
            f"{_f(s['candle_server_cpu_ms'], 0):>7} {ratio:>7} | "
            f"{_f(s['rss_open_mib']):>7} {_f(s['kib_per_stream']):>8}"
        )
    lines.append("")
    lines.append("floor: N concurrent grpc.health.v1 Check calls on the idle server; hlth open: the same with the N "
                 "streams open;")
    lines.append("burst: every open stream sends its next candle at one instant, first send to last answer; p50/p99: "
                 "per stream, from that instant;")
    lines.append("srv CPU: milliseconds of server-process CPU time (user + system) during the burst; the client "
                 "shares the machine's cores with the server")
    lines.append(f"medians over {meta['rounds']} rounds; RSS: the server process with the streams open, KiB/strm: "
                 "(RSS open - RSS before) / streams opened")
    problems = []
    for s in rows:
        parts = []
        if s["opened"] < s["streams"]:
            parts.append(f"{s['streams'] - s['opened']:,} of {s['streams']:,} streams did not open "
                         f"({s['open_timeouts']:,} timed out, {s['open_refused']:,} refused, {s['open_failed']:,} "
                         "failed)")
        if s["health_open_failures"]:
            parts.append(f"{s['health_open_failures']:,} health checks with the streams open failed or timed out")
        if s["candle_failures"]:
            parts.append(f"{s['candle_failures']:,} burst candles failed or timed out")
        if s["floor_failures"]:
            parts.append(f"{s['floor_failures']:,} floor health checks failed or timed out")
        if parts:
            problems.append(f"N={s['streams']:,}: " + "; ".join(parts))
    if problems:
        lines.append("")
        lines.append("incomplete (deadline " + f"{meta['timeout_s']:g} s per phase):")
        lines.extend(f"  {p}" for p in problems)
        for r in results:
            errs = {e for b in [r.opened, *r.candle, *r.health_open] for e in b.errors}
            if errs:
                lines.append(f"  N={r.streams:,} errors: {'; '.join(sorted(errs))[:300]}")
                if any(e.startswith("CANCELLED") for e in errs):
                    lines.append("    CANCELLED by the server in a burst: gRPC core cancels calls beyond its pending-"
                                 "request limits (server options grpc.server.max_pending_requests, default 1000, and "
                                 "grpc.server.max_pending_requests_hard_limit, default 3000)")
    not_ready = [f"N={s['streams']}: {s['ready_in_last_burst']:,} of {s['opened']:,}" for s in rows
                 if s["opened"] and s["ready_in_last_burst"] < s["opened"]]
    if not_ready:
        lines.append("")
        lines.append(f"burst candles that were not ready (warm-up shorter than warmup_bars {meta['warmup_bars']}?): "
                     + ", ".join(not_ready))
    target = next((s for s in rows if s["streams"] == TARGET_N), None)
    lines.append("")
    lines.append("DESIGN target")
    if target is None:
        lines.append(f"  [----] the {TARGET_N:,}-stream burst was not measured in this run")
    else:
        ok = target["complete"] and target["burst_to_floor"] is not None and target["burst_to_floor"] <= TARGET_RATIO
        measured = (f"{target['burst_to_floor']:.2f}x ({_f(target['candle_burst_ms'])} ms vs "
                    f"{_f(target['floor_burst_ms'])} ms)") if target["burst_to_floor"] else "not measured"
        if not target["complete"]:
            measured += f", only {target['opened']:,} of {TARGET_N:,} streams opened or answered"
        lines.append(f"  [{'PASS' if ok else 'FAIL'}] {TARGET_N:,}-stream candle-close burst <= {TARGET_RATIO:g}x "
                     f"the time of {TARGET_N:,} concurrent health checks: {measured}")
    m = meta["machine"]
    lines.append("")
    lines.append(f"model: {meta['model_id']} ({meta['trees']} trees), warmup_bars {meta['warmup_bars']}; each stream "
                 f"warmed with {WARM_CANDLES} candles")
    lines.append(f"client: one asyncio loop in a separate process, {meta['channels']} grpc.aio channels; server: "
                 "python -m inference_service.server, MLSIGNAL_MAX_STREAMS = N + "
                 f"{STREAM_HEADROOM}")
    lines.append(f"machine: {m['cores']} cores ({m['usable_cores']} usable), Python {m['python']}, grpcio "
                 f"{grpc.__version__}; load average before {meta['load_before']}, after {meta['load_after']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------


def _streams_arg(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated stream counts, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive stream counts, got {text!r}")
    return values


def _source_state() -> dict:
    """The commit measured, and the files that differ from it (a measurement of uncommitted code says so)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD").strip(),
            "modified": [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.desk",
                                 description="Thousands of open streams on one inference replica, and a candle-close "
                                             "burst against as many concurrent health checks; with --markets, one "
                                             "stream per market, each market with its own model.")
    ap.add_argument("--streams", type=_streams_arg, default=None,
                    help="comma-separated open-stream counts (default: 100,1000,5000)")
    ap.add_argument("--markets", type=_streams_arg, default=None,
                    help="fleet mode: comma-separated market counts, one stream and one serving model per market "
                         "(see bench.desk_fleet)")
    ap.add_argument("--quick", action="store_true",
                    help="100 and 1,000 streams, a 40-tree model (with --markets: only the 40-tree model)")
    ap.add_argument("--rounds", type=int, default=3, help="bursts per N; the table shows medians (default: 3)")
    ap.add_argument("--channels", type=int, default=4, help="grpc.aio channels (connections) in the client")
    ap.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds for each call in each phase")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"also write the JSON here (default: {DEFAULT_OUT}, with --markets {FLEET_OUT})")
    fleet = ap.add_argument_group("fleet mode (--markets)")
    fleet.add_argument("--idle-seconds", type=float, default=10.0,
                       help="how long the server's idle CPU is measured (default: 10; 60 includes one pass of "
                            "the work the server does once a minute)")
    fleet.add_argument("--poll-seconds", type=float, default=2.0,
                       help="MLSIGNAL_MODEL_POLL_SECONDS of the server (default: 2)")
    fleet.add_argument("--model-cache-size", type=int, default=0,
                       help="MLSIGNAL_MODEL_CACHE_SIZE of the server (default: 0, unbounded)")
    fleet.add_argument("--warm-timeout", type=float, default=600.0,
                       help="deadline in seconds for the warm-up messages, which load the models (default: 600)")
    fleet.add_argument("--promotion-check", action="store_true",
                       help="promote another model in one market while its stream is open, and time the switch")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.channels < 1 or args.timeout <= 0:
        ap.error("--rounds and --channels must be >= 1 and --timeout > 0")
    if args.markets and args.streams:
        ap.error("--streams and --markets are separate modes; give one of them")
    if args.idle_seconds <= 0 or args.poll_seconds <= 0 or args.warm_timeout <= 0 or args.model_cache_size < 0:
        ap.error("--idle-seconds, --poll-seconds and --warm-timeout must be > 0, --model-cache-size >= 0")
    counts = args.markets or args.streams or list(QUICK_STREAMS if args.quick else DEFAULT_STREAMS)
    trees = 40 if args.quick else 200
    out = args.out or (FLEET_OUT if args.markets else DEFAULT_OUT)

    from shared.settings import Settings
    from shared.store.db import make_engine
    from shared.store.registry import get_model
    from training_service.server import start as start_training

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_all = time.perf_counter()
    load_before = _loadavg()
    results: list = []
    with tempfile.TemporaryDirectory(prefix="mlsignal-desk-") as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root}/bench.db"
        log("importing the sample ...")
        frame = prepare_database(url)
        settings = Settings(database_url=url, model_dir=root / "models", log_level="WARNING")
        training = start_training(settings, "127.0.0.1:0")
        try:
            log(f"training {trees} trees on {TRAIN_START} .. {TRAIN_END} ...")
            job, _ = train_model(training.port, trees)
        finally:
            training.stop(0.5)
        engine = make_engine(url)
        try:
            record = get_model(engine, job.model_id)
        finally:
            engine.dispose()
        if record is None:
            raise RuntimeError(f"model {job.model_id} is not registered")
        if args.markets:
            from bench import desk_fleet as fleet_mode

            log(f"registering {max(counts):,} copies of {job.model_id}, one per market ...")
            registered = fleet_mode.register_fleet(url, settings.model_dir, job.model_id, max(counts),
                                                   args.promotion_check)
        for n in counts:
            extra = fleet_mode.fleet_env(args.poll_seconds, args.model_cache_size) if args.markets else {}
            log(f"N = {n:,}: starting the inference server (MLSIGNAL_MAX_STREAMS={n + STREAM_HEADROOM}"
                + "".join(f", {k}={v}" for k, v in extra.items()) + ") ...")
            server = ServerProcess(url, settings.model_dir, n + STREAM_HEADROOM, root / f"inference-{n}.log", extra)
            try:
                server.wait_serving()
                if args.markets:
                    results.append(asyncio.run(fleet_mode.fleet_run(server, registered, n, frame, url, args, log)))
                else:
                    results.append(asyncio.run(desk_run(server, n, frame, args.channels, args.rounds, args.timeout,
                                                        log)))
            finally:
                server.stop()
    meta = {
        "model_id": job.model_id,
        "trees": record.params.n_estimators,
        "warmup_bars": record.warmup_bars,
        "warm_candles": WARM_CANDLES,
        "channels": args.channels,
        "rounds": args.rounds,
        "timeout_s": args.timeout,
        "machine": machine(),
        "grpcio": grpc.__version__,
        "load_before": load_before,
        "load_after": _loadavg(),
        "wall_seconds": time.perf_counter() - t_all,
        "source": _source_state(),
        # MLSIGNAL_* settings this process passes on to the servers it starts, beyond those it sets itself
        "inherited_env": {k: v for k, v in sorted(os.environ.items())
                          if k.startswith("MLSIGNAL_") and k not in _SET_BY_BENCH},
    }
    if args.markets:
        meta.update(idle_seconds=args.idle_seconds, poll_seconds=args.poll_seconds,
                    cache_size=args.model_cache_size, warm_timeout_s=args.warm_timeout)
        target = {"markets": fleet_mode.TARGET_N, "max_burst_to_floor": fleet_mode.TARGET_RATIO,
                  "max_idle_cpu_pct": fleet_mode.TARGET_IDLE_CPU_PCT,
                  "max_promotion_s": args.poll_seconds + fleet_mode.PROMOTION_SLACK_S}
    else:
        target = {"streams": TARGET_N, "max_burst_to_floor": TARGET_RATIO}
    report = {
        "meta": meta,
        "target": target,
        "summary": [r.summary() for r in results],
        "runs": [asdict(r) for r in results],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(fleet_mode.format_table(results, meta) if args.markets else format_table(results, meta))
        print(f"\nwrote {out} ({meta['wall_seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
