"""A fleet on one replica: N markets, each with its own serving model, one open stream per market.

    .venv/bin/python -m bench.desk --markets 1000 [--quick] [--promotion-check] [--idle-seconds 10] [--json]

`--streams` opens thousands of streams on one market, so one model answers them all. A desk follows thousands of
markets, each with its own model, and that costs the replica differently: every model is loaded (cold) by its
market's first message, held in memory, and watched for promotions. This measures those costs against the DESIGN
targets of "A fleet on one replica":

1. one model is trained through the training service (as `--streams` does); N copies of it are registered directly
   in the registry as the SERVING models of markets M0001/USDT .. MNNNN/USDT (1h), each with its own model_id and
   its own copy of the ONNX file (same bytes, so the same sha256). With --promotion-check, the first market also
   gets a CANDIDATE copy;
2. for each N, a fresh inference server process (MLSIGNAL_MAX_STREAMS = N + 100, MLSIGNAL_MODEL_CACHE_SIZE=0:
   unbounded, MLSIGNAL_MODEL_POLL_SECONDS set explicitly); on the idle server: its CPU over --idle-seconds, N
   concurrent health checks (the floor) and sequential health checks;
3. N streams on the trained model's own market (BTC/USD, one model, loaded before): the warm-up time on a loaded
   model, the server's RSS with N streams and one model, and `--rounds` candle-close bursts for comparison; then
   those streams close and N streams open on the N markets at once: the cold warm-up (the server loads N models)
   and the RSS with N models. Memory per model is the difference of the two RSS readings over N (the same number of
   streams holding the same candles);
4. the fleet's streams close and reopen: the same warm-up with the N models loaded;
5. with the fleet open: sequential health checks, then `--rounds` rounds of N concurrent health checks followed by
   the candle-close burst (every stream sends its next candle at one instant), each burst once the server is quiet
   (the journal has written what the last phase served: after a warm-up that takes seconds), so that a burst is
   compared with the health checks of its own round under the same conditions; then the
   server's CPU while the N streams sit idle (watching the registry is most of what runs), per thread as well;
6. with --promotion-check: the first market's CANDIDATE is promoted while its stream is open, and the stream
   re-sends its last candle (a still-forming candle replaces the last one) every 50 ms until an answer names the
   new model; then the original is promoted back the same way, so the next N starts from the same registry.

Every stream's answers are checked to come from its own market's model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import pandas as pd
from grpc_health.v1 import health_pb2

from bench.desk import (
    STREAM_HEADROOM,
    WINDOWS,
    Burst,
    ServerProcess,
    Stream,
    _f,
    _percentile,
    _windows,
    burst,
    health_calls,
    open_channels,
    ready_stubs,
)
from bench.inference import SYMBOL, TIMEFRAME
from mlsignal.v1 import inference_pb2

TARGET_N = 1000
TARGET_RATIO = 1.0  # the 1,000-market burst completes in <= 1.0 x the time of 1,000 concurrent health checks
TARGET_IDLE_CPU_PCT = 5.0  # watching the registry costs < 5 % of one core
PROMOTION_SLACK_S = 1.0  # a promotion reaches an open stream within the poll interval + 1 s
SEQUENTIAL_HEALTH = 300  # sequential health checks for p50 / p99 (the first 20 are not counted)
PROMOTION_STEP_S = 0.05
# Before each burst the server must be quiet: at most QUIET_CPU_S of CPU in a QUIET_WINDOW_S window (longer than
# MLSIGNAL_LIVE_FLUSH_SECONDS=1, so the journal has written what the last phase served), waiting at most SETTLE_MAX_S.
QUIET_WINDOW_S = 1.2
QUIET_CPU_S = 0.03
SETTLE_MAX_S = 120.0


# ----------------------------------------------------------------------------------------------------------------------
# the fleet in the registry


@dataclass(frozen=True)
class Fleet:
    """Markets in order, their SERVING model ids, and the first market's CANDIDATE (or "")."""

    source: str  # the trained model, SERVING for SYMBOL
    markets: list[str]
    model_ids: list[str]
    artifact_bytes: int
    candidate: str = ""


def market_symbol(i: int, width: int) -> str:
    """The i-th market (from 1): M0001/USDT, ... (BASE/QUOTE in upper-case letters and digits)."""
    return f"M{i:0{width}d}/USDT"


def register_fleet(url: str, model_dir: Path, source_model_id: str, n: int, candidate: bool) -> Fleet:
    """Register n copies of a trained model as the SERVING models of n markets, each with its own ONNX file."""
    from shared.store.db import make_engine
    from shared.store.registry import CANDIDATE, SERVING, get_model, insert_model, now_ms

    engine = make_engine(url)
    try:
        source = get_model(engine, source_model_id)
        if source is None:
            raise RuntimeError(f"model {source_model_id} is not registered")
        src = model_dir / source.artifact
        width = max(4, len(str(n)))
        stamp = uuid.uuid4().hex[:8]
        markets, ids, records = [], [], []

        def copy(symbol: str, suffix: str, stage: str):
            model_id = f"{symbol.replace('/', '-')}_{TIMEFRAME}_fleet{suffix}_{stamp}"
            shutil.copyfile(src, model_dir / f"{model_id}.onnx")
            return dataclasses.replace(
                source, model_id=model_id, symbol=symbol, created_at_ms=now_ms(), artifact=f"{model_id}.onnx",
                sklearn_artifact="", sklearn_sha256="", job_id=None, stage=stage,
                stage_reason="copy of the trained model for the fleet benchmark")

        for i in range(1, n + 1):
            symbol = market_symbol(i, width)
            rec = copy(symbol, "", SERVING)
            markets.append(symbol)
            ids.append(rec.model_id)
            records.append(rec)
        cand = copy(markets[0], "-candidate", CANDIDATE) if candidate else None
        with engine.begin() as conn:
            for rec in records:
                insert_model(conn, rec)
            if cand is not None:
                insert_model(conn, cand)
    finally:
        engine.dispose()
    return Fleet(source_model_id, markets, ids, src.stat().st_size, cand.model_id if cand else "")


# ----------------------------------------------------------------------------------------------------------------------
# measurements


@dataclass
class FleetResult:
    markets: int
    poll_seconds: float
    cache_size_setting: int
    rounds: int
    idle_seconds: float
    artifact_bytes: int
    floor: list[Burst]
    health_idle_seq: dict
    idle_cpu_empty_s: float
    one_model_warm: Burst
    cold_warm: Burst
    loaded_warm: Burst
    health_one_model: list[Burst]
    candle_one_model: list[Burst]
    health_fleet_seq: dict
    health_fleet: list[Burst]
    candle: list[Burst]
    idle_cpu_fleet_s: float
    idle_threads: list[dict]
    rss_idle_bytes: int
    rss_one_model_bytes: int
    rss_fleet_bytes: int
    rss_after_bytes: int
    wrong_model: int
    promotion_s: float | None = None
    promotion_back_s: float | None = None
    promotion_error: str = ""
    quiet_after_warm_s: float = 0.0  # until the server was quiet after the warm-up (its journal written)
    wall_s: float = 0.0

    def summary(self) -> dict:
        def med(bursts: list[Burst], key: str) -> float | None:
            values = [getattr(b, key) for b in bursts if getattr(b, key) is not None]
            return statistics.median(values) if values else None

        def paired(health: list[Burst], candle: list[Burst]) -> float | None:
            """Median over the rounds of candle burst / health burst of the same round."""
            values = [c.burst_ms / h.burst_ms for h, c in zip(health, candle, strict=True) if c.burst_ms and h.burst_ms]
            return statistics.median(values) if values else None

        floor = med(self.floor, "burst_ms")
        candle = med(self.candle, "burst_ms")
        health = med(self.health_fleet, "burst_ms")
        n = self.markets
        opened = self.loaded_warm.ok
        return {
            "markets": n,
            "poll_seconds": self.poll_seconds,
            "cold_warm_ms": self.cold_warm.burst_ms,
            "cold_warm_ok": self.cold_warm.ok,
            "cold_warm_server_cpu_s": self.cold_warm.server_cpu_s,
            "loaded_warm_ms": self.loaded_warm.burst_ms,
            "loaded_warm_ok": self.loaded_warm.ok,
            "one_model_warm_ms": self.one_model_warm.burst_ms,
            "one_model_warm_ok": self.one_model_warm.ok,
            "floor_burst_ms": floor,
            "health_fleet_burst_ms": health,
            "candle_burst_ms": candle,
            "candle_p50_ms": med(self.candle, "p50_ms"),
            "candle_p99_ms": med(self.candle, "p99_ms"),
            "candle_server_cpu_ms": _ms(med(self.candle, "server_cpu_s")),
            "candle_failures": sum(b.calls - b.ok for b in [*self.candle, *self.candle_one_model]),
            "health_failures": sum(b.calls - b.ok for b in [*self.floor, *self.health_fleet, *self.health_one_model]),
            "health_fleet_server_cpu_ms": _ms(med(self.health_fleet, "server_cpu_s")),
            "floor_server_cpu_ms": _ms(med(self.floor, "server_cpu_s")),
            "floor_client_cpu_ms": _ms(med(self.floor, "client_cpu_s")),
            "health_fleet_client_cpu_ms": _ms(med(self.health_fleet, "client_cpu_s")),
            "candle_client_cpu_ms": _ms(med(self.candle, "client_cpu_s")),
            "one_model_candle_client_cpu_ms": _ms(med(self.candle_one_model, "client_cpu_s")),
            "burst_to_floor": candle / floor if candle and floor else None,
            "burst_to_health_fleet": paired(self.health_fleet, self.candle),
            "one_model_health_burst_ms": med(self.health_one_model, "burst_ms"),
            "one_model_candle_burst_ms": med(self.candle_one_model, "burst_ms"),
            "one_model_candle_server_cpu_ms": _ms(med(self.candle_one_model, "server_cpu_s")),
            "one_model_burst_to_health": paired(self.health_one_model, self.candle_one_model),
            "health_idle_p50_ms": self.health_idle_seq.get("p50_ms"),
            "health_idle_p99_ms": self.health_idle_seq.get("p99_ms"),
            "health_fleet_p50_ms": self.health_fleet_seq.get("p50_ms"),
            "health_fleet_p99_ms": self.health_fleet_seq.get("p99_ms"),
            "idle_cpu_empty_pct": 100 * self.idle_cpu_empty_s / self.idle_seconds,
            "idle_cpu_fleet_pct": 100 * self.idle_cpu_fleet_s / self.idle_seconds,
            "rss_idle_mib": self.rss_idle_bytes / 2**20,
            "rss_one_model_mib": self.rss_one_model_bytes / 2**20,
            "rss_fleet_mib": self.rss_fleet_bytes / 2**20,
            "kib_per_model": (self.rss_fleet_bytes - self.rss_one_model_bytes) / 1024 / n,
            "artifact_kib": self.artifact_bytes / 1024,
            "streams_open": opened,
            "wrong_model": self.wrong_model,
            "promotion_s": self.promotion_s,
            "promotion_back_s": self.promotion_back_s,
            "promotion_error": self.promotion_error,
            "quiet_after_warm_s": self.quiet_after_warm_s,
            "complete": (self.cold_warm.ok == n and self.loaded_warm.ok == n and self.one_model_warm.ok == n
                         and all(b.ok == b.calls == n for b in [*self.candle, *self.candle_one_model])
                         and not self.wrong_model),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every thread of a process, with its name, from /proc/<pid>/task/*/stat."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


async def idle_cpu(server: ServerProcess, seconds: float) -> tuple[float, list[dict]]:
    """The server's CPU seconds over `seconds` of nothing asked of it, and the threads that used most of them."""
    threads0 = _thread_cpu(server.pid)
    cpu0 = server.cpu_seconds()
    await asyncio.sleep(seconds)
    cpu = server.cpu_seconds() - cpu0
    threads1 = _thread_cpu(server.pid)
    used = sorted(((cpu1 - threads0.get(tid, (name, 0.0))[1], tid, name) for tid, (name, cpu1) in threads1.items()),
                  reverse=True)
    return cpu, [{"tid": tid, "name": name, "cpu_s": round(s, 3)} for s, tid, name in used[:4] if s > 0]


async def settle(server: ServerProcess) -> float:
    """Wait until the server is quiet (what the last phase left, such as the journal's writes, is done); returns the
    seconds waited, or raises if it is still busy after SETTLE_MAX_S."""
    t0 = time.perf_counter()
    while True:
        cpu0 = server.cpu_seconds()
        await asyncio.sleep(QUIET_WINDOW_S)
        if server.cpu_seconds() - cpu0 <= QUIET_CPU_S:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > SETTLE_MAX_S:
            raise RuntimeError(f"the inference server is still busy after {SETTLE_MAX_S:g} s with nothing asked of it")


async def sequential_health(stub, count: int, timeout: float) -> dict:
    request = health_pb2.HealthCheckRequest(service="")
    lat = []
    for i in range(count):
        t = time.perf_counter()
        await stub.Check(request, timeout=timeout)
        if i >= 20:
            lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    return {"count": len(lat), "p50_ms": _percentile(lat, 50), "p99_ms": _percentile(lat, 99), "max_ms": lat[-1]}


def _retarget(request: inference_pb2.PredictRequest, symbol: str) -> inference_pb2.PredictRequest:
    copy = inference_pb2.PredictRequest()
    copy.CopyFrom(request)
    copy.symbol = symbol
    return copy


async def open_streams(stubs: list, symbols: list[str], warm: list, nexts: list, life: float, timeout: float,
                       server: ServerProcess) -> tuple[list[Stream], Burst]:
    """Open one stream per symbol at one instant, each warmed with its first message; the burst of those."""
    streams = [Stream(stubs[i % len(stubs)].StreamPredict(timeout=life), _retarget(warm[i % WINDOWS], sym),
                      nexts[i % WINDOWS]) for i, sym in enumerate(symbols)]

    def opener(s: Stream):
        async def run() -> str:
            kind = await s.exchange(s.warm)
            s.open = kind == "ok"
            return kind
        return run

    result = await burst([opener(s) for s in streams], timeout, server)
    for s in streams:
        if not s.open:
            s.call.cancel()
    return streams, result


async def close_streams(streams: list[Stream], timeout: float) -> None:
    """Half-close every stream and wait for its status, so the server has released its slot when this returns."""
    async def close(s: Stream) -> None:
        if not s.open:  # refused, failed or out of step: it may still hold a slot
            s.call.cancel()
            return
        try:
            await s.call.done_writing()
            await asyncio.wait_for(s.call.code(), timeout)
        except Exception:  # a stream that does not end in time is cancelled
            s.call.cancel()
        s.open = False

    await asyncio.gather(*(close(s) for s in streams))


async def promotion_reaches(stream: Stream, request: inference_pb2.PredictRequest, promote, model_id: str,
                            limit_s: float) -> float | None:
    """Seconds from the start of `promote()` until the stream answers with `model_id` (None: not within limit_s).

    The stream re-sends `request`, its last candle, every PROMOTION_STEP_S: a candle with the open time of the last
    one replaces it, so the stream's state does not move on."""
    t0 = time.perf_counter()
    await asyncio.to_thread(promote)
    while time.perf_counter() - t0 < limit_s:
        await stream.exchange(request)
        if stream.model_id == model_id:
            return time.perf_counter() - t0
        await asyncio.sleep(PROMOTION_STEP_S)
    return None


async def burst_rounds(streams: list[Stream], expected: list[str], health_stubs: list, rounds: int, timeout: float,
                       server: ServerProcess, what: str, log) -> tuple[list[Burst], list[Burst], int]:
    """`rounds` times: N concurrent health checks, then the candle-close burst of the open streams; each burst after a
    pause in which the server finishes what the previous one left (the journal writes what was served).

    Returns the health bursts, the candle bursts and how many answers came from a model other than `expected`."""
    health, candle, wrong = [], [], 0
    for r in range(rounds):
        live = [(i, s) for i, s in enumerate(streams) if s.open]  # a stream that failed a round is out of step
        log(f"  round {r + 1}/{rounds}: {len(streams):,} health checks, then the candle-close burst of {len(live):,} "
            f"streams ({what}) ...")
        await settle(server)
        health.append(await burst(health_calls(health_stubs, len(streams), timeout), timeout, server))

        await settle(server)
        candle.append(await burst([s.sender(r) for _, s in live], timeout, server))
        wrong += sum(s.open and s.model_id != expected[i] for i, s in live)
    return health, candle, wrong


async def fleet_run(server: ServerProcess, fleet: Fleet, n: int, frame: pd.DataFrame, url: str, args,
                    log) -> FleetResult:
    t_start = time.perf_counter()
    rounds, timeout, channels = args.rounds, args.timeout, args.channels
    warm, nexts = _windows(frame, rounds)
    markets, expected = fleet.markets[:n], fleet.model_ids[:n]
    chans = open_channels(server.target, channels)
    try:
        health_stubs, infer_stubs = await ready_stubs(chans, timeout)
        await burst(health_calls(health_stubs, min(n, 100), timeout), timeout)  # warm the connections

        log(f"  idle server, no model loaded: CPU over {args.idle_seconds:g} s, health checks ...")
        await asyncio.sleep(1.0)
        rss_idle = server.rss_bytes()
        idle_empty, _ = await idle_cpu(server, args.idle_seconds)
        health_idle_seq = await sequential_health(health_stubs[0], SEQUENTIAL_HEALTH, timeout)
        floor = []
        for _ in range(rounds):
            await settle(server)
            floor.append(await burst(health_calls(health_stubs, n, timeout), timeout, server))

        life = args.warm_timeout * 3 + (timeout + 2 * SETTLE_MAX_S) * (4 + 4 * rounds) + args.idle_seconds + 120
        # One model, N streams: the trained model's own market, its model loaded by one Predict first.
        await infer_stubs[0].Predict(warm[0], timeout=args.warm_timeout)
        log(f"  {n:,} streams on one market ({SYMBOL}, its model loaded) ...")
        one, one_warm = await open_streams(infer_stubs, [SYMBOL] * n, warm, nexts, life, args.warm_timeout, server)
        wrong = sum(s.open and s.model_id != fleet.source for s in one)
        await asyncio.sleep(0.5)
        rss_one = server.rss_bytes()
        health_one, candle_one, w = await burst_rounds(one, [fleet.source] * n, health_stubs, rounds, timeout, server,
                                                       "one market", log)
        wrong += w
        await close_streams(one, timeout)

        log(f"  {n:,} streams on {n:,} markets at once: the server loads {n:,} models ...")
        await settle(server)
        streams, cold = await open_streams(infer_stubs, markets, warm, nexts, life, args.warm_timeout, server)
        wrong += sum(s.open and s.model_id != m for s, m in zip(streams, expected, strict=True))
        await asyncio.sleep(0.5)
        rss_fleet = server.rss_bytes()
        await close_streams(streams, timeout)
        log(f"  the same {n:,} streams again, models loaded ...")
        await settle(server)
        streams, loaded = await open_streams(infer_stubs, markets, warm, nexts, life, args.warm_timeout, server)
        wrong += sum(s.open and s.model_id != m for s, m in zip(streams, expected, strict=True))

        quiet_after_warm = await settle(server)
        health_fleet_seq = await sequential_health(health_stubs[0], SEQUENTIAL_HEALTH, timeout)
        health_fleet, candle, w = await burst_rounds(streams, expected, health_stubs, rounds, timeout, server,
                                                     f"{n:,} markets", log)
        wrong += w

        log(f"  {n:,} streams open and idle: server CPU over {args.idle_seconds:g} s "
            f"(MLSIGNAL_MODEL_POLL_SECONDS={args.poll_seconds:g}) ...")
        await settle(server)
        idle_fleet, threads = await idle_cpu(server, args.idle_seconds)

        promotion_s = promotion_back_s = None
        promotion_error = ""
        if fleet.candidate:
            s0 = streams[0]
            if not s0.open:
                promotion_error = "the first market's stream is not open"
            else:
                from shared.store.db import make_engine
                from shared.store.registry import promote

                engine = make_engine(url)
                limit = args.poll_seconds + PROMOTION_SLACK_S + 30
                again = s0.nexts[rounds - 1]  # the stream's last candle: sending it again replaces it
                try:
                    log(f"  promoting {fleet.candidate} in {markets[0]} with its stream open ...")
                    promotion_s = await promotion_reaches(
                        s0, again, lambda: promote(engine, fleet.candidate, "fleet benchmark"), fleet.candidate, limit)
                    promotion_back_s = await promotion_reaches(
                        s0, again, lambda: promote(engine, expected[0], "fleet benchmark: back"), expected[0], limit)
                finally:
                    engine.dispose()
                if promotion_s is None or promotion_back_s is None:
                    promotion_error = f"the stream did not answer with the promoted model within {limit:g} s"

        await close_streams(streams, timeout)
        await asyncio.sleep(0.5)
        rss_after = server.rss_bytes()
    finally:
        for c in chans:
            await c.close()
    return FleetResult(
        markets=n, poll_seconds=args.poll_seconds, cache_size_setting=args.model_cache_size, rounds=rounds,
        idle_seconds=args.idle_seconds, artifact_bytes=fleet.artifact_bytes, floor=floor,
        health_idle_seq=health_idle_seq, idle_cpu_empty_s=idle_empty, one_model_warm=one_warm, cold_warm=cold,
        loaded_warm=loaded, health_one_model=health_one, candle_one_model=candle_one,
        health_fleet_seq=health_fleet_seq, health_fleet=health_fleet, candle=candle, idle_cpu_fleet_s=idle_fleet,
        idle_threads=threads, rss_idle_bytes=rss_idle, rss_one_model_bytes=rss_one, rss_fleet_bytes=rss_fleet,
        rss_after_bytes=rss_after, wrong_model=wrong, promotion_s=promotion_s, promotion_back_s=promotion_back_s,
        promotion_error=promotion_error, quiet_after_warm_s=quiet_after_warm, wall_s=time.perf_counter() - t_start,
    )


def fleet_env(poll_seconds: float, cache_size: int) -> dict[str, str]:
    """The server settings the fleet runs with, beyond those of `--streams` (0: an unbounded model cache)."""
    return {"MLSIGNAL_MODEL_POLL_SECONDS": f"{poll_seconds:g}", "MLSIGNAL_MODEL_CACHE_SIZE": str(cache_size)}


# ----------------------------------------------------------------------------------------------------------------------
# report


def format_table(results: list[FleetResult], meta: dict) -> str:
    rows = [r.summary() for r in results]

    def ms(v):
        return _f(v, 1)

    def ratio(v):
        return f"{v:.2f}x" if v else "-"

    def exact(v):  # a target line: enough digits to see which side of 1.0 it is
        return f"{v:.3f}x" if v else "-"

    def cpu(s, key):
        return f"{_f(s[key + '_server_cpu_ms'], 0)} / {_f(s[key + '_client_cpu_ms'], 0)}"

    def secs(v):
        return "-" if v is None else f"{v:.2f} s"

    spec = [
        ("markets (one stream, one model each)", lambda s: f"{s['markets']:,}"),
        ("warm-up, N models cold: first send to last answer ms", lambda s: ms(s["cold_warm_ms"])),
        ("  server CPU during it, s", lambda s: _f(s["cold_warm_server_cpu_s"], 2)),
        ("warm-up, N models loaded ms", lambda s: ms(s["loaded_warm_ms"])),
        ("warm-up, N streams on one loaded model ms", lambda s: ms(s["one_model_warm_ms"])),
        ("server busy after the loaded warm-up, s", lambda s: _f(s["quiet_after_warm_s"], 1)),
        ("floor: N health checks, idle server ms", lambda s: ms(s["floor_burst_ms"])),
        ("  CPU during it ms: server / client", lambda s: cpu(s, "floor")),
        ("N health checks, fleet open ms", lambda s: ms(s["health_fleet_burst_ms"])),
        ("  CPU during it ms: server / client", lambda s: cpu(s, "health_fleet")),
        ("candle-close burst, N markets ms", lambda s: ms(s["candle_burst_ms"])),
        ("  per stream p50 / p99 ms", lambda s: f"{ms(s['candle_p50_ms'])} / {ms(s['candle_p99_ms'])}"),
        ("  CPU during it ms: server / client", lambda s: cpu(s, "candle")),
        ("burst / health burst of the same round", lambda s: ratio(s["burst_to_health_fleet"])),
        ("burst / floor (idle server)", lambda s: ratio(s["burst_to_floor"])),
        ("for comparison, N streams on one model: burst ms", lambda s: ms(s["one_model_candle_burst_ms"])),
        ("  CPU during it ms: server / client", lambda s: cpu(s, "one_model_candle")),
        ("  burst / health burst of the same round", lambda s: ratio(s["one_model_burst_to_health"])),
        ("health p50 / p99 ms, idle server", lambda s: f"{_f(s['health_idle_p50_ms'], 3)} / "
                                                       f"{_f(s['health_idle_p99_ms'], 3)}"),
        ("health p50 / p99 ms, fleet open", lambda s: f"{_f(s['health_fleet_p50_ms'], 3)} / "
                                                      f"{_f(s['health_fleet_p99_ms'], 3)}"),
        ("idle CPU, no model loaded, % of a core", lambda s: _f(s["idle_cpu_empty_pct"], 2)),
        ("idle CPU, fleet open, % of a core", lambda s: _f(s["idle_cpu_fleet_pct"], 2)),
        ("RSS MiB: idle / N streams, 1 model / N models",
         lambda s: f"{s['rss_idle_mib']:.0f} / {s['rss_one_model_mib']:.0f} / {s['rss_fleet_mib']:.0f}"),
        ("memory per loaded model KiB", lambda s: _f(s["kib_per_model"], 0)),
        ("ONNX artifact KiB", lambda s: _f(s["artifact_kib"], 0)),
        ("promotion reaches the stream", lambda s: secs(s["promotion_s"]) if not s["promotion_error"]
         else "failed"),
        ("  and back", lambda s: secs(s["promotion_back_s"])),
    ]
    width = max(len(label) for label, _ in spec)
    heads = [f"N={s['markets']:,}" for s in rows]
    lines = [f"{'':<{width}} " + " ".join(f"{h:>14}" for h in heads)]
    lines.append("-" * len(lines[0]))
    for label, get in spec:
        lines.append(f"{label:<{width}} " + " ".join(f"{get(s):>14}" for s in rows))
    lines.append("")
    lines.append("warm-up: N streams opened at one instant, each first message carrying "
                 f"{meta['warm_candles']} candles; cold: each market's first message loads its model")
    lines.append("burst: every stream sends its next candle at one instant, first send to last answer; each round "
                 "is N concurrent health checks, then the burst, each once the server is quiet; medians over "
                 f"{meta['rounds']} rounds")
    lines.append(f"idle CPU: server process user + system over {meta['idle_seconds']:g} s with nothing asked of it; "
                 "memory per model: (RSS with N streams on N models - RSS with N streams on one model) / N")
    for r, s in zip(results, rows, strict=True):
        problems = []
        if s["wrong_model"]:
            problems.append(f"{s['wrong_model']:,} answers from another market's model")
        for label, b in (("cold warm-up", r.cold_warm), ("loaded warm-up", r.loaded_warm),
                         ("one-model warm-up", r.one_model_warm)):
            if b.ok < b.calls:
                problems.append(f"{label}: {b.ok:,} of {b.calls:,} answered ({b.timeouts:,} timed out, "
                                f"{b.refused:,} refused; {'; '.join(b.errors)[:200]})")
        if s["candle_failures"] or s["health_failures"]:
            problems.append(f"{s['candle_failures']:,} burst candles and {s['health_failures']:,} health checks "
                            "failed or timed out")
        if s["promotion_error"]:
            problems.append(s["promotion_error"])
        if problems:
            lines.append(f"N={s['markets']:,} incomplete: " + "; ".join(problems))
        if r.idle_threads:
            busy = ", ".join(f"{t['name']}[{t['tid']}] {t['cpu_s']:.2f} s" for t in r.idle_threads)
            lines.append(f"N={s['markets']:,} idle CPU by server thread: {busy}")
    target = next((s for s in rows if s["markets"] == TARGET_N), None)
    lines.append("")
    lines.append("DESIGN targets (a fleet on one replica)")
    if target is None:
        lines.append(f"  [----] N={TARGET_N:,} was not measured in this run")
    else:
        def check(ok: bool, text: str) -> str:
            return f"  [{'PASS' if ok else 'FAIL'}] {text}"

        b = target["burst_to_health_fleet"]
        lines.append(check(bool(b is not None and b <= TARGET_RATIO and target["complete"]),
                           f"{TARGET_N:,}-market candle-close burst <= {TARGET_RATIO:g}x {TARGET_N:,} concurrent "
                           f"health checks in the same round: {exact(b)} ({ms(target['candle_burst_ms'])} ms vs "
                           f"{ms(target['health_fleet_burst_ms'])} ms, medians)"))
        b = target["burst_to_floor"]
        lines.append(check(bool(b is not None and b <= TARGET_RATIO and target["complete"]),
                           f"the same against the floor (health checks on the idle server, before any stream): "
                           f"{exact(b)} ({ms(target['candle_burst_ms'])} ms vs {ms(target['floor_burst_ms'])} ms)"))
        pct = target["idle_cpu_fleet_pct"]
        lines.append(check(pct < TARGET_IDLE_CPU_PCT, f"watching the registry with {TARGET_N:,} models loaded < "
                                                      f"{TARGET_IDLE_CPU_PCT:g} % of one core: {pct:.2f} % "
                                                      f"(poll every {target['poll_seconds']:g} s)"))
        if target["promotion_s"] is not None or target["promotion_error"]:
            limit = target["poll_seconds"] + PROMOTION_SLACK_S
            p = target["promotion_s"]
            lines.append(check(bool(p is not None and p <= limit
                                    and (target["promotion_back_s"] or 1e9) <= limit),
                               f"a promotion reaches an open stream within {limit:g} s: {secs(p)} "
                               f"(back: {secs(target['promotion_back_s'])})"))
        else:
            lines.append("  [----] promotion: not measured (--promotion-check)")
        lines.append(f"  [info] memory per loaded model: {_f(target['kib_per_model'], 0)} KiB (ONNX file "
                     f"{_f(target['artifact_kib'], 0)} KiB)")
    m = meta["machine"]
    lines.append("")
    lines.append(f"model: {meta['model_id']} ({meta['trees']} trees), copied to every market; warmup_bars "
                 f"{meta['warmup_bars']}")
    lines.append(f"server: python -m inference_service.server, MLSIGNAL_MAX_STREAMS = N + {STREAM_HEADROOM}, "
                 f"MLSIGNAL_MODEL_CACHE_SIZE={meta['cache_size']}, MLSIGNAL_MODEL_POLL_SECONDS="
                 f"{meta['poll_seconds']:g}; client: one asyncio loop in a separate process, {meta['channels']} "
                 "grpc.aio channels")
    lines.append(f"machine: {m['cores']} cores ({m['usable_cores']} usable), Python {m['python']}, grpcio "
                 f"{grpc.__version__}; load average before {meta['load_before']}, after {meta['load_after']}")
    if meta.get("inherited_env"):
        lines.append("also in the server's environment: " + ", ".join(f"{k}={v}" for k, v in
                                                                    meta["inherited_env"].items()))
    src = meta.get("source") or {}
    if src.get("commit"):
        changed = f", with uncommitted changes to {len(src['modified'])} files" if src.get("modified") else ""
        lines.append(f"code: commit {src['commit'][:12]}{changed}")
    return "\n".join(lines)
