"""Load generator for the inference service: closed and open loop, latency percentiles and a histogram.

In the spirit of ghz and Triton's perf_analyzer, with threads and the synchronous gRPC stubs (gRPC Python releases
the GIL while it waits on the network):

* **closed loop** (no `rate`): `concurrency` workers, each sending its next request as soon as the previous one
  is answered. Latency is the round trip of each request.
* **open loop** (`rate` requests/s in total): request k is scheduled at ``start + k / rate`` and the next free worker
  sends it at that time. Latency is measured from the *scheduled* time, so a server (or a generator) that falls
  behind shows up in the tail instead of silently delaying later sends (coordinated omission). A send that leaves
  more than `LATE_SEND_S` after its scheduled time is counted as late; `concurrency` is the most requests in flight,
  so too few workers for the rate show up as late sends.

What one request is:

* ``Health``: a ``grpc.health.v1.Health/Check`` for the whole server, the latency floor of the machine.
* ``Predict``: ``history + batch`` consecutive real candles, cycling through the data. `history` defaults to the
  serving model's ``warmup_bars - 1``, the fewest candles that make every one of the `batch` measured candles ready
  (Predict is stateless, so a request without history returns no probabilities). Throughput in candles counts the
  `batch` candles only.
* ``StreamPredict``: each worker opens one stream and first sends a warm-up message of `history` candles (default
  ``warmup_bars - 1`` as above; not measured). Every following message carries the next `batch` candles, and its
  latency is the time from handing the message to gRPC to receiving its response. When a stream reaches the end of
  the data it is closed and a new one is opened and warmed up, outside the measured time of any message.

Every request message is built before the timed loop. The warm-up period (`warmup` seconds from the start, or the
slots scheduled in it) is excluded from every statistic. Latency statistics are over successful requests; errors are
counted by gRPC status code (``WRONG_COUNT`` when a response does not hold one prediction per candle).
``requests_per_s`` counts every measured request, ``candles_per_s`` the `batch` candles of the successful ones.

Example::

    >>> from mlsignal.loadtest import LoadTestConfig, run_loadtest        # doctest: +SKIP
    >>> cfg = LoadTestConfig("127.0.0.1:50052", "Predict", "BTC/USD", "1h", batch=64, concurrency=2, duration=10)
    >>> result = run_loadtest(cfg, candles)                              # doctest: +SKIP
    >>> result.latency_ms["p99"], result.candles_per_s                   # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import numpy as np
import pandas as pd
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlsignal.client import connect_channel, frame_to_candles
from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc

__all__ = [
    "LATE_SEND_S",
    "PERCENTILES",
    "RPCS",
    "LoadTestConfig",
    "LoadTestError",
    "LoadTestResult",
    "format_result",
    "latency_histogram",
    "parse_seconds",
    "run_loadtest",
]

RPCS = ("Predict", "StreamPredict", "Health")
PERCENTILES = (50, 90, 95, 99)
# A send more than this after its scheduled time counts as late (the generator fell behind).
LATE_SEND_S = 0.001
# Upper bound on the candles held in pre-built Predict requests; the pool is cycled.
POOL_CANDLES = 250_000
# Histogram buckets per decade of latency (log-spaced edges 10 ** (k / BUCKETS_PER_DECADE) ms).
BUCKETS_PER_DECADE = 5
CONNECT_TIMEOUT_S = 10.0


class LoadTestError(Exception):
    """The load test cannot run: a bad configuration, unusable candles, or an unreachable target."""


@dataclass(frozen=True)
class LoadTestConfig:
    target: str
    rpc: str
    symbol: str = ""
    timeframe: str = ""
    batch: int = 1
    concurrency: int = 1
    duration: float | None = None  # seconds measured after the warm-up; or
    requests: int | None = None  # requests measured after the warm-up
    rate: float | None = None  # open loop: requests/s in total; None: closed loop
    warmup: float = 0.0  # seconds excluded from the statistics
    history: int | None = None  # candles of history per Predict / stream warm-up; None: warmup_bars - 1
    timeout: float = 30.0  # deadline of one unary call, seconds
    connections: int = 1  # channels (TCP connections) the workers share, round robin
    columns: bool = False  # Predict: send the candles as packed CandleColumns instead of Candle messages
    security: dict = field(default_factory=dict)  # tls / root_certificates / token for connect_channel

    def check(self) -> None:
        if self.rpc not in RPCS:
            raise LoadTestError(f"rpc {self.rpc!r} is not one of {', '.join(RPCS)}")
        if (self.duration is None) == (self.requests is None):
            raise LoadTestError("give exactly one of duration (seconds) or requests (a count)")
        if self.duration is not None and not (math.isfinite(self.duration) and self.duration > 0):
            raise LoadTestError(f"duration must be a positive number of seconds, got {self.duration}")
        if self.requests is not None and self.requests < 1:
            raise LoadTestError(f"requests must be at least 1, got {self.requests}")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise LoadTestError(f"rate must be a positive number of requests/s, got {self.rate}")
        if not (math.isfinite(self.warmup) and self.warmup >= 0):
            raise LoadTestError(f"warmup must be zero or a positive number of seconds, got {self.warmup}")
        if self.concurrency < 1:
            raise LoadTestError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.connections < 1:
            raise LoadTestError(f"connections must be at least 1, got {self.connections}")
        if self.batch < 1:
            raise LoadTestError(f"batch must be at least 1 candle, got {self.batch}")
        if self.history is not None and self.history < 0:
            raise LoadTestError(f"history must be zero or more candles, got {self.history}")
        if not (self.timeout > 0):
            raise LoadTestError(f"timeout must be a positive number of seconds, got {self.timeout}")
        if self.rpc != "Health" and (not self.symbol or not self.timeframe):
            raise LoadTestError(f"{self.rpc} needs a symbol and a timeframe")


@dataclass
class LoadTestResult:
    rpc: str
    target: str
    symbol: str
    timeframe: str
    mode: str  # "closed" or "open"
    concurrency: int
    batch: int  # measured candles per request (0 for Health)
    history: int  # extra candles per Predict request / in each stream's warm-up message
    rate: float | None
    warmup_s: float
    requests: int  # measured requests, successful or not
    ok: int
    errors: dict[str, int]
    error_examples: dict[str, str]  # first message seen per status code
    elapsed_s: float  # from the end of the warm-up to the last measured response
    requests_per_s: float
    candles_per_s: float
    latency_ms: dict[str, float | None]  # min, mean, p50, p90, p95, p99, max over successful requests
    histogram: list[tuple[float, float, int]]  # (from ms, to ms, count), log-spaced
    warmup_requests: int
    late_sends: int = 0  # open loop: sends more than LATE_SEND_S after their scheduled time
    max_send_lag_ms: float = 0.0  # open loop: the worst of them
    streams_opened: int = 0
    model_ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    latencies_s: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the raw latencies, as JSON-ready values."""
        d = asdict(self)
        d.pop("latencies_s")
        d["histogram"] = [{"from_ms": a, "to_ms": b, "count": n} for a, b, n in self.histogram]
        return d


# ----------------------------------------------------------------------------------------------------------------------
# inputs


def parse_seconds(text: str) -> float:
    """Seconds of a duration like ``30s``, ``500ms``, ``2m``, ``1h`` or a bare number of seconds."""
    s = str(text).strip().lower()
    for unit, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if s.endswith(unit):
            number, mult = s[: -len(unit)].strip(), scale
            break
    else:
        number, mult = s, 1.0
    try:
        value = float(number) * mult
    except ValueError:
        raise ValueError(f"{text!r} is not a duration; expected a number with an optional unit ms, s, m or h, "
                         "like 30s or 500ms") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a duration of zero or more seconds")
    return value


def _candle_messages(frame: pd.DataFrame) -> list[common_pb2.Candle]:
    """The client's frame conversion, so the load test sends exactly what `InferenceClient.predict` would."""
    try:
        return frame_to_candles(frame)
    except ValueError as exc:
        raise LoadTestError(f"candles: {exc}") from None


# ----------------------------------------------------------------------------------------------------------------------
# sessions: one per worker; prepare() does unmeasured set-up, call() is the measured request


def _code_of_status(status) -> tuple[str, str]:
    """(code name, message) of a StreamPredict answer's `error` (a google.rpc.Status)."""
    names = {code.value[0]: code.name for code in grpc.StatusCode}
    return names.get(int(status.code), "UNKNOWN"), status.message


def _code_of(err: grpc.RpcError) -> tuple[str, str]:
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return name, details or str(err)


class _Unary:
    def __init__(self, method, requests: list, expect: int, timeout: float, start: int):
        self.method = method
        self.requests = requests
        self.expect = expect  # predictions per response; -1 for Health
        self.timeout = timeout
        self.i = start % len(requests)
        self.model_id = ""
        self.opened = 0

    def prepare(self):
        return None

    def call(self):
        req = self.requests[self.i]
        self.i += 1
        if self.i == len(self.requests):
            self.i = 0
        try:
            resp = self.method(req, timeout=self.timeout)
        except grpc.RpcError as err:
            return _code_of(err)
        if self.expect >= 0:
            got = len(resp.predictions) or len(resp.columns.open_time_ms)
            if got != self.expect:
                return "WRONG_COUNT", f"{got} predictions for {self.expect} candles"
            if not self.model_id:
                self.model_id = resp.model_id
        return None

    def close(self):
        pass


class _Feed:
    """The request iterator of one stream: messages are handed over one at a time; None ends the stream."""

    def __init__(self):
        self.q: queue.SimpleQueue = queue.SimpleQueue()

    def __iter__(self):
        return self

    def __next__(self):
        item = self.q.get()
        if item is None:
            raise StopIteration
        return item


class _Stream:
    def __init__(self, stub, first_messages: list, chunks: list, first_chunk: int, start_chunk: int,
                 batch: int, registry: set, lock: threading.Lock):
        self.stub = stub
        self.first_messages = first_messages  # warm-up message per starting chunk (None where unused)
        self.chunks = chunks  # chunk k: the batch candles k*batch .. (k+1)*batch, no symbol
        self.first_chunk = first_chunk  # the first chunk with enough history before it
        self.next_start = start_chunk
        self.batch = batch
        self.registry = registry
        self.lock = lock
        self.feed: _Feed | None = None
        self.responses = None
        self.k = 0
        self.model_id = ""
        self.opened = 0

    def prepare(self):
        """Open (or reopen at the end of the data) a stream and warm it up; returns an error or None."""
        if self.responses is not None and self.k < len(self.chunks):
            return None
        self.close()
        start = self.next_start
        self.next_start = self.first_chunk
        warm = self.first_messages[start]
        self.feed = _Feed()
        self.responses = self.stub.StreamPredict(self.feed)
        with self.lock:
            self.registry.add(self.responses)
        self.opened += 1
        self.k = start
        self.feed.q.put(warm)
        try:
            resp = next(self.responses)
        except grpc.RpcError as err:
            self.close()
            return _code_of(err)
        except StopIteration:
            self.close()
            return "UNKNOWN", "the stream ended before answering its first message"
        if resp.HasField("error"):  # a refused message: the server keeps the stream open, the warm-up failed
            self.close()
            return _code_of_status(resp.error)
        if len(resp.predictions) != len(warm.candles):
            self.close()
            return "WRONG_COUNT", f"{len(resp.predictions)} predictions for {len(warm.candles)} candles"
        self.model_id = self.model_id or resp.model_id
        return None

    def call(self):
        msg = self.chunks[self.k]
        self.k += 1
        self.feed.q.put(msg)
        try:
            resp = next(self.responses)
        except grpc.RpcError as err:
            self.close()
            return _code_of(err)
        except StopIteration:
            self.close()
            return "UNKNOWN", "the stream ended before answering"
        if resp.HasField("error"):  # the stream stays open; this message counts as failed with its code
            return _code_of_status(resp.error)
        if len(resp.predictions) != self.batch:
            return "WRONG_COUNT", f"{len(resp.predictions)} predictions for {self.batch} candles"
        return None

    def close(self):
        if self.responses is None:
            return
        responses, self.responses = self.responses, None
        self.feed.q.put(None)  # half-close: the server ends the stream after the last response
        try:
            for _ in responses:
                pass
        except grpc.RpcError:
            pass
        with self.lock:
            self.registry.discard(responses)


# ----------------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class _Tally:
    lat: list = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    measured: int = 0
    warm: int = 0
    last_end: float = 0.0
    late: int = 0
    max_lag: float = 0.0

    def error(self, code: str, details: str) -> None:
        self.errors[code] += 1
        self.examples.setdefault(code, details)

    def record(self, measured: bool, failed, t_end: float, latency: float) -> None:
        """Count one request: warm-up requests only by number; measured ones by latency or error."""
        if not measured:
            self.warm += 1
            return
        self.measured += 1
        self.last_end = max(self.last_end, t_end)
        if failed is None:
            self.lat.append(latency)
        else:
            self.error(*failed)


def _timed_call(session, failed, clock):
    """(failure or None, t0, t1): call the session unless preparing it already failed."""
    if failed is not None:
        t = clock()
        return failed, t, t
    t0 = clock()
    failed = session.call()
    return failed, t0, clock()


class _Run:
    def __init__(self, cfg: LoadTestConfig, t_start: float):
        self.cfg = cfg
        self.t_start = t_start
        self.stop = threading.Event()
        self.tickets = itertools.count()
        self.slots = itertools.count()
        if cfg.rate is None:
            self.measure_from = t_start + cfg.warmup
            self.stop_at = self.measure_from + cfg.duration if cfg.duration is not None else math.inf
            self.total_slots = 0
        else:
            if cfg.duration is not None:
                self.measure_from = t_start + cfg.warmup
                self.total_slots = math.ceil(round((cfg.warmup + cfg.duration) * cfg.rate, 9))
            else:
                assert cfg.requests is not None  # check(): exactly one of duration and requests
                warm_slots = math.ceil(round(cfg.warmup * cfg.rate, 9))
                self.measure_from = t_start + warm_slots / cfg.rate
                self.total_slots = warm_slots + cfg.requests
            self.stop_at = math.inf

    def _wait_start(self) -> bool:
        delay = self.t_start - time.perf_counter()
        return delay > 0 and self.stop.wait(delay)

    def closed_worker(self, session, tally: _Tally) -> None:
        cfg, clock = self.cfg, time.perf_counter
        limit = cfg.requests
        if self._wait_start():
            return
        while not self.stop.is_set():
            now = clock()
            if now >= self.stop_at:
                break
            measured = now >= self.measure_from
            if measured and limit is not None and next(self.tickets) >= limit:
                break
            failed, t0, t1 = _timed_call(session, session.prepare(), clock)
            tally.record(measured, failed, t1, t1 - t0)

    def open_worker(self, session, tally: _Tally) -> None:
        rate, clock = self.cfg.rate, time.perf_counter
        assert rate is not None  # open loop only
        if self._wait_start():
            return
        while not self.stop.is_set():
            failed = session.prepare()  # a stream is (re)opened before it takes a slot
            k = next(self.slots)
            if k >= self.total_slots:
                break
            scheduled = self.t_start + k / rate
            measured = scheduled >= self.measure_from
            delay = scheduled - clock()
            if delay > 0 and self.stop.wait(delay):
                break
            failed, t0, t1 = _timed_call(session, failed, clock)
            tally.record(measured, failed, t1, t1 - scheduled)  # from the scheduled time: no coordinated omission
            lag = t0 - scheduled
            if measured and lag > LATE_SEND_S:
                tally.late += 1
                tally.max_lag = max(tally.max_lag, lag)


def _resolve_history(cfg: LoadTestConfig, channel, notes: list[str]) -> int:
    if cfg.rpc == "Health":
        return 0
    if cfg.history is not None:
        return cfg.history
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    try:
        info = stub.GetModel(inference_pb2.GetModelRequest(symbol=cfg.symbol, timeframe=cfg.timeframe),
                             timeout=cfg.timeout)
    except grpc.RpcError as err:
        code, details = _code_of(err)
        notes.append(f"GetModel failed ({code}: {details}); sending no history candles")
        return 0
    return max(0, int(info.warmup_bars) - 1)


def _channels(cfg: LoadTestConfig) -> list[grpc.Channel]:
    options = [("grpc.use_local_subchannel_pool", 1)] if cfg.connections > 1 else []
    channels = [connect_channel(cfg.target, options=options, **cfg.security) for _ in range(cfg.connections)]
    for ch in channels:
        try:
            grpc.channel_ready_future(ch).result(timeout=CONNECT_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            for c in channels:
                c.close()
            raise LoadTestError(f"cannot connect to {cfg.target} within {CONNECT_TIMEOUT_S:.0f} s") from None
    return channels


def _sessions(cfg: LoadTestConfig, channels: list, candles: list, history: int, registry: set,
              lock: threading.Lock) -> tuple[list, int]:
    """The workers' sessions, with every request message built; and the history candles actually used."""
    n_workers = cfg.concurrency
    if cfg.rpc == "Health":
        req = health_pb2.HealthCheckRequest(service="")
        return [_Unary(health_pb2_grpc.HealthStub(channels[w % len(channels)]).Check, [req], -1, cfg.timeout, 0)
                for w in range(n_workers)], 0

    B, H, n = cfg.batch, history, len(candles)
    if n < H + B:
        raise LoadTestError(f"{n} candles are too few for {H} candles of history plus a batch of {B}; "
                            "give more candles or a smaller --history / --batch")
    first = -(-H // B)  # the first chunk k with k*B >= H
    last = n // B  # chunks k < last are complete
    if cfg.rpc == "Predict":
        count = last - first
        pool = max(1, min(count, POOL_CANDLES // (H + B)))
        step = max(1, count // pool)
        requests = [
            _predict_request(cfg, candles[k * B - H:(k + 1) * B]) for k in range(first, last, step)
        ][:pool]
        return [
            _Unary(inference_pb2_grpc.InferenceServiceStub(channels[w % len(channels)]).Predict, requests, H + B,
                   cfg.timeout, w * len(requests) // n_workers)
            for w in range(n_workers)
        ], H

    # StreamPredict: chunk k holds candles k*B .. (k+1)*B; a stream starting at chunk s is warmed up with the H
    # candles before it (at least one candle, since the first message names the symbol and must carry candles).
    if H == 0:
        first = max(first, 1)
        H_warm = B
    else:
        H_warm = H
    if last - first < 1:
        raise LoadTestError(f"{n} candles are too few for a stream warm-up of {H_warm} candles plus one batch of {B}")
    chunks = [inference_pb2.PredictRequest(candles=candles[k * B:(k + 1) * B]) for k in range(last)]
    starts = [first + (w * (last - first)) // n_workers for w in range(n_workers)]
    warm: list = [None] * last
    for s in {first, *starts}:
        warm[s] = inference_pb2.PredictRequest(symbol=cfg.symbol, timeframe=cfg.timeframe,
                                               candles=candles[s * B - H_warm:s * B])
    return [
        _Stream(inference_pb2_grpc.InferenceServiceStub(channels[w % len(channels)]), warm, chunks, first,
                starts[w], B, registry, lock)
        for w in range(n_workers)
    ], H_warm


def _predict_request(cfg: LoadTestConfig, candles: list) -> inference_pb2.PredictRequest:
    """A Predict request for these Candle messages, as rows or (with cfg.columns) as packed columns."""
    if not cfg.columns:
        return inference_pb2.PredictRequest(symbol=cfg.symbol, timeframe=cfg.timeframe, candles=candles)
    columns = common_pb2.CandleColumns(
        open_time_ms=[c.open_time_ms for c in candles], open=[c.open for c in candles],
        high=[c.high for c in candles], low=[c.low for c in candles], close=[c.close for c in candles],
        volume=[c.volume for c in candles],
    )
    if any(c.HasField("funding_rate") for c in candles):
        columns.funding_rate.extend(c.funding_rate if c.HasField("funding_rate") else math.nan for c in candles)
    if any(c.HasField("open_interest") for c in candles):
        columns.open_interest.extend(c.open_interest if c.HasField("open_interest") else math.nan for c in candles)
    return inference_pb2.PredictRequest(symbol=cfg.symbol, timeframe=cfg.timeframe, columns=columns)


def run_loadtest(cfg: LoadTestConfig, candles: pd.DataFrame | list | None = None) -> LoadTestResult:
    """Run one load test and return its result. `candles` (a frame or Candle messages) are needed unless Health."""
    cfg.check()
    notes: list[str] = []
    if cfg.rpc != "Health":
        if candles is None:
            raise LoadTestError(f"{cfg.rpc} needs candles")
        messages = candles if isinstance(candles, list) else _candle_messages(candles)
    else:
        messages = []
    channels = _channels(cfg)
    registry: set = set()
    lock = threading.Lock()
    sessions: list = []
    try:
        history = _resolve_history(cfg, channels[0], notes)
        sessions, history = _sessions(cfg, channels, messages, history, registry, lock)
        tallies = [_Tally() for _ in sessions]
        run = _Run(cfg, time.perf_counter() + 0.01)  # a moment for the threads to start
        target = run.closed_worker if cfg.rate is None else run.open_worker
        threads = [threading.Thread(target=target, args=(s, t), name=f"loadtest-{i}", daemon=True)
                   for i, (s, t) in enumerate(zip(sessions, tallies, strict=True))]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            run.stop.set()
            raise
        finally:
            run.stop.set()
            _finish(threads, registry, lock, cfg.timeout)
    finally:
        for s in sessions:
            try:
                s.close()
            except Exception:  # closing is best effort
                pass
        for ch in channels:
            ch.close()
    return _summarise(cfg, run, tallies, sessions, history, notes)


def _finish(threads, registry: set, lock: threading.Lock, timeout: float) -> None:
    """Wait for the workers; cancel streams that are still open after `timeout` so no thread is left blocked."""
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        stuck = list(registry)
    for call in stuck:
        call.cancel()
    for t in threads:
        t.join(1.0)


def _summarise(cfg, run: _Run, tallies: list[_Tally], sessions: list, history: int, notes: list[str]):
    lat = np.array([x for t in tallies for x in t.lat], dtype=np.float64)
    errors: Counter = Counter()
    examples: dict[str, str] = {}
    for t in tallies:
        errors.update(t.errors)
        for code, msg in t.examples.items():
            examples.setdefault(code, msg)
    measured = sum(t.measured for t in tallies)
    ok = len(lat)
    last_end = max((t.last_end for t in tallies), default=0.0)
    elapsed = max(0.0, last_end - run.measure_from) if measured else 0.0
    batch = 0 if cfg.rpc == "Health" else cfg.batch
    rps = measured / elapsed if elapsed > 0 else 0.0
    cps = ok * batch / elapsed if elapsed > 0 else 0.0
    lat_ms = lat * 1000.0
    if ok:
        pct = np.percentile(lat_ms, PERCENTILES)
        latency: dict[str, float | None] = {"min": float(lat_ms.min()), "mean": float(lat_ms.mean())}
        latency.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)})
        latency["max"] = float(lat_ms.max())
    else:
        latency = {k: None for k in ("min", "mean", *(f"p{p}" for p in PERCENTILES), "max")}
    if cfg.rate is not None and measured:
        late = sum(t.late for t in tallies)
        if late:
            notes.append(f"the generator fell behind: {late} of {measured} requests were sent more than "
                         f"{LATE_SEND_S * 1000:.0f} ms after their scheduled time (more --concurrency may help)")
    return LoadTestResult(
        rpc=cfg.rpc, target=cfg.target, symbol=cfg.symbol, timeframe=cfg.timeframe,
        mode="closed" if cfg.rate is None else "open", concurrency=cfg.concurrency, batch=batch,
        history=history, rate=cfg.rate, warmup_s=cfg.warmup,
        requests=measured, ok=ok, errors=dict(sorted(errors.items())), error_examples=examples,
        elapsed_s=elapsed, requests_per_s=rps, candles_per_s=cps, latency_ms=latency,
        histogram=latency_histogram(lat_ms), warmup_requests=sum(t.warm for t in tallies),
        late_sends=sum(t.late for t in tallies), max_send_lag_ms=max((t.max_lag for t in tallies), default=0.0) * 1e3,
        streams_opened=sum(s.opened for s in sessions) if cfg.rpc == "StreamPredict" else 0,
        model_ids=sorted({s.model_id for s in sessions if getattr(s, "model_id", "")}),
        notes=notes, latencies_s=lat,
    )


# ----------------------------------------------------------------------------------------------------------------------
# reporting


def latency_histogram(lat_ms: np.ndarray, per_decade: int = BUCKETS_PER_DECADE) -> list[tuple[float, float, int]]:
    """Counts in log-spaced buckets [10**(k/per_decade), 10**((k+1)/per_decade)) ms covering min..max."""
    lat_ms = np.asarray(lat_ms, dtype=np.float64)
    lat_ms = lat_ms[lat_ms > 0]
    if not len(lat_ms):
        return []
    lo = math.floor(math.log10(lat_ms.min()) * per_decade)
    hi = math.floor(math.log10(lat_ms.max()) * per_decade) + 1
    edges = 10.0 ** (np.arange(lo, hi + 1) / per_decade)
    counts, _ = np.histogram(lat_ms, bins=edges)
    return [(float(a), float(b), int(c)) for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)]


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def format_result(r: LoadTestResult, width: int = 40) -> str:
    """A human-readable report: counts, throughput, percentiles and a text histogram."""
    if r.mode == "open":
        mode = f"open loop at {r.rate:g} requests/s, at most {r.concurrency} in flight"
    else:
        mode = f"closed loop, {r.concurrency} worker{'s' if r.concurrency != 1 else ''}"
    what = r.rpc if r.rpc == "Health" else f"{r.rpc} {r.symbol} {r.timeframe}"
    lines = [f"{what} on {r.target}: {mode}"]
    if r.rpc == "Predict":
        lines.append(f"  batch       {r.batch} candles per request, after {r.history} candles of history")
    elif r.rpc == "StreamPredict":
        lines.append(f"  batch       {r.batch} new candles per message, streams warmed up with {r.history} candles "
                     f"({r.streams_opened} opened)")
    err_total = sum(r.errors.values())
    lines.append(f"  requests    {r.requests:,} in {r.elapsed_s:.2f} s (ok {r.ok:,}, errors {err_total:,}), "
                 f"after {r.warmup_requests:,} in a {r.warmup_s:g} s warm-up")
    through = f"{r.requests_per_s:,.1f} requests/s"
    if r.rpc != "Health":
        through += f", {r.candles_per_s:,.0f} candles/s"
    lines.append(f"  throughput  {through}")
    L = r.latency_ms
    lines.append("  latency ms  " + "  ".join(f"{k} {_ms(L[k])}" for k in ("p50", "p90", "p95", "p99", "max"))
                 + f"  (min {_ms(L['min'])}, mean {_ms(L['mean'])})")
    if r.mode == "open":
        lines.append(f"  late sends  {r.late_sends:,} (worst {r.max_send_lag_ms:.2f} ms behind schedule); "
                     "latency counts from the scheduled send time")
    for code, count in r.errors.items():
        lines.append(f"  error       {code} x{count:,}: {r.error_examples.get(code, '')}")
    if r.model_ids:
        lines.append(f"  model       {', '.join(r.model_ids)}")
    for note in r.notes:
        lines.append(f"  note        {note}")
    if r.histogram:
        lines.append("  histogram (ms)")
        top = max(c for _, _, c in r.histogram) or 1
        for a, b, c in r.histogram:
            bar = "#" * (round(width * c / top) if c else 0)
            if c and not bar:
                bar = "."
            lines.append(f"    {a:9.3f} - {b:9.3f}  {c:9,}  {bar}")
    return "\n".join(lines)
