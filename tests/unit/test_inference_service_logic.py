"""The inference logic called directly with domain types: InferenceService, StreamSession and the candle converter.

The models are tiny forests (a few shallow trees on synthetic candles) exported to ONNX and registered in a SQLite
registry, so the whole path from the registry to the served probabilities runs in well under a second per test.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sklearn.ensemble import RandomForestClassifier

from inference_service.converters import candle_batch
from inference_service.domain import CandleBatch
from inference_service.model_store import ModelStore
from inference_service.service import InferenceService, validate_key
from inference_service.stream_session import StreamSession
from mlsignal.v1 import common_pb2
from shared.artifacts import write_atomic
from shared.calibration import shrink_to_prior
from shared.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from shared.features import FeatureSpec, feature_matrix
from shared.labels import CLASSES, LabelSpec
from shared.params import ForestParams
from shared.store.db import make_engine
from shared.store.migrate import upgrade
from shared.store.registry import SERVING, ModelRecord, insert_model
from training_service.pipeline import export_onnx

H = 3_600_000
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
N = 400
SYMBOL, TF = "BTC/USDT", "1h"
MAX_BATCH = 500
DEFAULT_SPEC = FeatureSpec()


def make_candles(n: int = N, seed: int = 0, funding: bool = False, open_interest: bool = False) -> CandleBatch:
    """A random walk of valid hourly candles from T0 (with funding rate / open interest when asked)."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    opn = np.concatenate([[100.0], close[:-1]])
    high = np.maximum(opn, close) * (1 + rng.uniform(0, 0.005, n))
    low = np.minimum(opn, close) * (1 - rng.uniform(0, 0.005, n))
    funding_rate = rng.normal(1e-4, 3e-4, n) if funding else np.full(n, np.nan)
    oi = 1e4 * np.exp(np.cumsum(rng.normal(0, 0.01, n))) if open_interest else np.full(n, np.nan)
    return CandleBatch(T0 + H * np.arange(n, dtype=np.int64), opn, high, low, close, rng.uniform(1, 10, n),
                       funding_rate, oi)


def with_value(c: CandleBatch, field: str, i: int, value: float) -> CandleBatch:
    column = getattr(c, field).copy()
    column[i] = value
    return replace(c, **{field: column})


@dataclass
class Registry:
    engine: sa.Engine
    model_dir: Path
    created_ms: int = 1_000

    def register(self, symbol: str = SYMBOL, spec: FeatureSpec = DEFAULT_SPEC, seed: int = 0,
                 artifact_ok: bool = True) -> ModelRecord:
        """Fit a five-tree forest on synthetic candles, export it to ONNX and register it as the newest model."""
        candles = make_candles(N, seed, funding=spec.use_funding_rate, open_interest=spec.use_open_interest)
        X = feature_matrix(candles.columns(), spec)
        rows = np.isfinite(X).all(axis=1)
        y = np.random.default_rng(seed).integers(0, 3, int(rows.sum()))
        forest = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=seed).fit(X[rows], y)
        self.created_ms += 1
        model_id = f"{symbol.replace('/', '-')}_{TF}_{self.created_ms}"
        onnx = export_onnx(forest, X.shape[1])
        sha = write_atomic(self.model_dir / f"{model_id}.onnx", onnx if artifact_ok else onnx[:100])
        if not artifact_ok:
            sha = "0" * 64
        record = ModelRecord(
            model_id=model_id, symbol=symbol, timeframe=TF, created_at_ms=self.created_ms,
            train_start_ms=T0, train_end_ms=T0 + H * (N // 2 - 1), label=LabelSpec(),
            feature_spec=spec, params=ForestParams(n_estimators=5, max_depth=3), classes=CLASSES,
            prior=(0.3, 0.4, 0.3), shrink_weight=0.6, metrics={}, artifact=f"{model_id}.onnx", sha256=sha,
            stage=SERVING,  # registered as the serving model, as a model that passed the gate is
        )
        with self.engine.begin() as conn:
            insert_model(conn, record)
        return record


@pytest.fixture
def registry(tmp_path):
    url = f"sqlite:///{tmp_path}/registry.db"
    upgrade(url)
    engine = make_engine(url)
    yield Registry(engine, tmp_path / "models")
    engine.dispose()


@pytest.fixture
def store(registry):
    return ModelStore(registry.engine, registry.model_dir)


@pytest.fixture
def model(registry):
    return registry.register()


@pytest.fixture
def service(store, model):
    return InferenceService(store, MAX_BATCH)


class Spy:
    """A CandleSource that records which optional columns it was asked for."""

    def __init__(self, batch: CandleBatch):
        self.batch = batch
        self.asked: list[tuple[bool, bool]] = []

    def __len__(self) -> int:
        return len(self.batch)

    def read(self, funding_rate: bool, open_interest: bool) -> CandleBatch:
        self.asked.append((funding_rate, open_interest))
        return self.batch.read(funding_rate, open_interest)


# --------------------------------------------------------------------------------------------------------------------
# stateless predictions


def test_predict_warmup_sum_in_sample_and_the_model_probabilities(service, store, model):
    candles = make_candles()
    served, p = service.predict(SYMBOL, TF, "", candles)
    assert served.model_id == model.model_id
    assert np.array_equal(p.open_time_ms, candles.open_time_ms)
    w = model.feature_spec.warmup_bars
    assert not p.ready[: w - 1].any() and p.ready[w - 1:].all()
    assert np.isnan(p.proba[~p.ready]).all()
    assert np.allclose(p.proba[p.ready].sum(axis=1), 1.0, atol=1e-12)
    assert np.array_equal(p.in_sample, candles.open_time_ms <= model.train_end_ms)
    # the served probabilities are the forest's, shrunk toward the prior
    X = feature_matrix(candles.columns(), model.feature_spec, w - 1)
    raw = served.forest.predict_proba(X)
    assert np.array_equal(p.proba[w - 1:], shrink_to_prior(raw, np.array(model.prior), model.shrink_weight))


def test_no_look_ahead(service):
    candles = make_candles()
    base = service.predict(SYMBOL, TF, "", candles)[1].proba
    t = 250
    changed = replace(candles, close=np.concatenate([candles.close[: t + 1], candles.close[t + 1:] * 1.5]),
                      high=np.concatenate([candles.high[: t + 1], candles.high[t + 1:] * 1.5]))
    after = service.predict(SYMBOL, TF, "", changed)[1].proba
    assert np.array_equal(after[: t + 1], base[: t + 1], equal_nan=True)
    assert not np.array_equal(after[t + 1:], base[t + 1:], equal_nan=True)


def test_every_column_sent_is_read_and_checked_whichever_model_answers(registry, store):
    """Predict checks funding rate and open interest exactly as a stream does, so a value a stream refuses is
    refused by Predict too, even when the answering model does not use that column."""
    plain = registry.register()
    funded = registry.register(symbol="ETH/USDT", spec=FeatureSpec(use_funding_rate=True), seed=1)
    service = InferenceService(store, MAX_BATCH)
    spy = Spy(make_candles(funding=True))
    assert service.predict(SYMBOL, TF, "", spy)[0].model_id == plain.model_id
    spy_funded = Spy(make_candles(funding=True))
    assert service.predict("ETH/USDT", TF, "", spy_funded)[0].model_id == funded.model_id
    assert spy.asked == [(True, True)] and spy_funded.asked == [(True, True)]
    with pytest.raises(InvalidArgument, match=r"candles\[5\]\.funding_rate"):
        service.predict(SYMBOL, TF, "", with_value(make_candles(funding=True), "funding_rate", 5, np.inf))


def test_a_funding_model_needs_funding_on_every_candle(registry, store):
    registry.register(spec=FeatureSpec(use_funding_rate=True))
    service = InferenceService(store, MAX_BATCH)
    candles = make_candles(funding=True)
    _, p = service.predict(SYMBOL, TF, "", candles)
    assert p.ready.any()
    with pytest.raises(FailedPrecondition, match=r"candles\[17\]\.funding_rate"):
        service.predict(SYMBOL, TF, "", with_value(candles, "funding_rate", 17, np.nan))


def test_on_predicted_reports_each_answer(store, model):
    seen: list[tuple[str, int]] = []
    service = InferenceService(store, MAX_BATCH, lambda m, n: seen.append((m.model_id, n)))
    service.predict(SYMBOL, TF, "", make_candles(120))
    session = StreamSession(service)
    session.step(SYMBOL, TF, "", make_candles(3))
    with pytest.raises(InvalidArgument):
        service.predict(SYMBOL, TF, "", make_candles(0))
    assert seen == [(model.model_id, 120), (model.model_id, 3)]


@pytest.mark.parametrize(
    ("change", "error", "text"),
    [
        ({"symbol": "btc-usdt"}, InvalidArgument, "symbol: "),
        ({"timeframe": "7m"}, InvalidArgument, "timeframe: "),
        ({"symbol": "ETH/USDT"}, NotFound, "ETH/USDT"),
        ({"model_id": "no-such-model"}, NotFound, "model_id"),
        ({"candles": make_candles(0)}, InvalidArgument, "candles: the request holds no candles"),
        ({"candles": make_candles(MAX_BATCH + 1)}, InvalidArgument, f"the limit is {MAX_BATCH} (MLSIGNAL_MAX_BATCH)"),
        ({"candles": with_value(make_candles(), "close", 40, np.nan)}, InvalidArgument, r"candles[40].close"),
        ({"candles": with_value(make_candles(), "open", 3, np.inf)}, InvalidArgument, r"candles[3].open"),
        ({"candles": with_value(make_candles(), "low", 7, -1.0)}, InvalidArgument, r"candles[7].low"),
        ({"candles": with_value(make_candles(), "high", 9, 1.0)}, InvalidArgument, r"candles[9].high"),
        ({"candles": with_value(make_candles(), "volume", 11, -5.0)}, InvalidArgument, r"candles[11].volume"),
        ({"candles": with_value(make_candles(5), "volume", 2, -5.0)}, InvalidArgument, r"candles[2].volume"),
        ({"candles": with_value(make_candles(), "open_time_ms", 20, T0 + 19 * H)}, InvalidArgument,
         "candles[20].open_time_ms: "),
        ({"candles": with_value(make_candles(), "open_time_ms", 20, T0 + 20 * H + 1)}, InvalidArgument,
         "is not aligned to the timeframe"),
    ],
)
def test_errors_name_the_field(service, change, error, text):
    args = {"symbol": SYMBOL, "timeframe": TF, "model_id": "", "candles": make_candles()}
    args.update(change)
    with pytest.raises(error) as err:
        service.predict(args["symbol"], args["timeframe"], args["model_id"], args["candles"])
    assert text in str(err.value)


def test_the_size_is_checked_before_the_candles_are_read(service):
    spy = Spy(make_candles(MAX_BATCH + 1))
    with pytest.raises(InvalidArgument):
        service.predict(SYMBOL, TF, "", spy)
    assert spy.asked == []


def test_pinned_model_must_belong_to_the_key(registry, store):
    registry.register()
    other = registry.register(symbol="ETH/USDT", seed=2)
    service = InferenceService(store, MAX_BATCH)
    with pytest.raises(InvalidArgument, match=f"model_id: model {other.model_id} is for ETH/USDT 1h"):
        service.predict(SYMBOL, TF, other.model_id, make_candles())


def test_pinning_an_older_model(registry, store):
    old = registry.register(seed=3)
    new = registry.register(seed=4)
    service = InferenceService(store, MAX_BATCH)
    candles = make_candles()
    assert service.predict(SYMBOL, TF, "", candles)[0].model_id == new.model_id
    pinned, p_old = service.predict(SYMBOL, TF, old.model_id, candles)
    assert pinned.model_id == old.model_id
    assert not np.array_equal(p_old.proba, service.predict(SYMBOL, TF, "", candles)[1].proba, equal_nan=True)


def test_serving_model_and_key_validation(service, model, registry):
    assert service.serving_model(SYMBOL, TF).model_id == model.model_id
    assert validate_key(SYMBOL, "4h") == 4 * H
    with pytest.raises(InvalidArgument, match="symbol: "):
        service.serving_model("BTCUSDT", TF)
    with pytest.raises(NotFound, match="train one first"):
        service.serving_model("SOL/USDT", TF)


def test_a_model_whose_file_fails_verification_is_refused(registry, store):
    registry.register(artifact_ok=False)
    with pytest.raises(DataLoss, match="refused"):
        InferenceService(store, MAX_BATCH).predict(SYMBOL, TF, "", make_candles())


# --------------------------------------------------------------------------------------------------------------------
# streams


def test_stream_one_by_one_and_in_chunks_equals_predict_exactly(service):
    candles = make_candles()
    batch = service.predict(SYMBOL, TF, "", candles)[1]
    one = StreamSession(service)
    singles = [one.step(SYMBOL if i == 0 else "", TF if i == 0 else "", "", candles.slice(i, i + 1))[1]
               for i in range(len(candles))]
    chunked = StreamSession(service)
    bounds = np.cumsum([0, 1, 7, 93, 3, 150, 146])
    chunks = [chunked.step(SYMBOL, TF, "", candles.slice(int(a), int(b)))[1] for a, b in itertools.pairwise(bounds)]
    for parts in (singles, chunks):
        assert np.array_equal(np.concatenate([p.open_time_ms for p in parts]), batch.open_time_ms)
        assert np.array_equal(np.concatenate([p.ready for p in parts]), batch.ready)
        assert np.array_equal(np.concatenate([p.in_sample for p in parts]), batch.in_sample)
        assert np.array_equal(np.vstack([p.proba for p in parts]), batch.proba, equal_nan=True)  # exact


def test_a_forming_candle_is_replaced(service):
    candles = make_candles(200)
    forming = candles.slice(199)
    forming = replace(forming, close=forming.close * 1.03, high=forming.high * 1.03, low=forming.low * 0.99)
    session = StreamSession(service)
    session.step(SYMBOL, TF, "", candles.slice(0, 199))
    first = session.step("", "", "", forming)[1]
    final = session.step("", "", "", candles.slice(199))[1]
    assert first.open_time_ms[0] == final.open_time_ms[0]
    assert np.array_equal(final.proba[0], service.predict(SYMBOL, TF, "", candles)[1].proba[199])
    assert np.array_equal(first.proba[0],
                          service.predict(SYMBOL, TF, "", candles.slice(0, 199).concat(forming))[1].proba[199])


def test_stream_errors(service):
    candles = make_candles(60)
    with pytest.raises(InvalidArgument, match="first message of a stream must name the symbol and timeframe"):
        StreamSession(service).step("", TF, "", candles)
    session = StreamSession(service)
    session.step(SYMBOL, TF, "", candles.slice(0, 50))
    with pytest.raises(InvalidArgument, match="symbol: this stream is for BTC/USDT"):
        session.step("ETH/USDT", "", "", candles.slice(50, 51))
    with pytest.raises(InvalidArgument, match="timeframe: this stream is for 1h"):
        session.step("", "4h", "", candles.slice(50, 51))
    with pytest.raises(InvalidArgument, match=r"candles\[0\]\.open_time_ms: .* is before the stream's last candle"):
        session.step("", "", "", candles.slice(40, 41))
    with pytest.raises(InvalidArgument, match="the request holds no candles"):
        session.step("", "", "", candles.slice(0, 0))
    # the stream still answers, continuing where it was
    assert session.step("", "", "", candles.slice(50, 51))[1].open_time_ms[0] == candles.open_time_ms[50]


def test_a_stream_switches_to_a_new_serving_model_at_a_message_boundary(registry, store, model, service):
    candles = make_candles()
    free, pinned = StreamSession(service), StreamSession(service)
    assert free.step(SYMBOL, TF, "", candles.slice(0, 200))[0].model_id == model.model_id
    assert pinned.step(SYMBOL, TF, model.model_id, candles.slice(0, 200))[0].model_id == model.model_id
    new = registry.register(seed=5)
    assert store.refresh() == [new.model_id]
    answered, p = free.step("", "", "", candles.slice(200, 201))
    assert answered.model_id == new.model_id
    assert np.array_equal(p.proba[0], service.predict(SYMBOL, TF, new.model_id, candles.slice(0, 201))[1].proba[200])
    assert pinned.step("", "", "", candles.slice(200, 201))[0].model_id == model.model_id


# --------------------------------------------------------------------------------------------------------------------
# domain types and the request converter


def test_candle_batch_reads_only_the_optional_columns_asked_for():
    msgs = [common_pb2.Candle(open_time_ms=T0 + i * H, open=1.0 + i, high=2.0 + i, low=0.5, close=1.5, volume=3.0)
            for i in range(3)]
    msgs[1].funding_rate = 0.0
    msgs[2].open_interest = 7.0
    full = candle_batch(msgs)
    assert full.open_time_ms.dtype == np.int64 and full.open_time_ms.tolist() == [T0, T0 + H, T0 + 2 * H]
    assert full.open.tolist() == [1.0, 2.0, 3.0] and full.high.tolist() == [2.0, 3.0, 4.0]
    assert np.array_equal(full.funding_rate, [np.nan, 0.0, np.nan], equal_nan=True)
    assert np.array_equal(full.open_interest, [np.nan, np.nan, 7.0], equal_nan=True)
    bare = candle_batch(msgs, funding_rate=False, open_interest=False)
    assert np.isnan(bare.funding_rate).all() and np.isnan(bare.open_interest).all()
    assert len(candle_batch([])) == 0


def test_a_batch_read_as_a_source_hides_unused_columns():
    batch = make_candles(5, funding=True)
    assert batch.read(True, True) is batch
    assert np.isnan(batch.read(False, True).funding_rate).all()
    assert np.array_equal(batch.read(True, False).funding_rate, batch.funding_rate)
    assert np.array_equal(batch.slice(1, 3).concat(batch.slice(3)).close, batch.close[1:])


# --------------------------------------------------------------------------------------------------------------------
# streams: a refused message changes nothing; what a stream keeps does not depend on the model answering now


def full_candles(n: int = N, seed: int = 0) -> CandleBatch:
    """Valid candles with funding rate and open interest on every candle."""
    return make_candles(n, seed, funding=True, open_interest=True)


def tail(p, start: int):
    """Predictions from row `start` on."""
    return replace(p, open_time_ms=p.open_time_ms[start:], proba=p.proba[start:], ready=p.ready[start:],
                   in_sample=p.in_sample[start:])


def stream_steps(session: StreamSession, candles: CandleBatch, start: int, stop: int) -> list:
    return [session.step("", "", "", candles.slice(i, i + 1))[1] for i in range(start, stop)]


def assert_same(parts: list, expected) -> None:
    assert np.array_equal(np.concatenate([p.open_time_ms for p in parts]), expected.open_time_ms)
    assert np.array_equal(np.concatenate([p.ready for p in parts]), expected.ready)
    assert np.array_equal(np.vstack([p.proba for p in parts]), expected.proba, equal_nan=True)  # bit for bit


# (change to candle k, or to the message) -> a message the stream must refuse
BAD_MESSAGES = {
    "close NaN": lambda c, k: with_value(c.slice(k, k + 1), "close", 0, np.nan),
    "open inf": lambda c, k: with_value(c.slice(k, k + 1), "open", 0, np.inf),
    "low <= 0": lambda c, k: with_value(c.slice(k, k + 1), "low", 0, -1.0),
    "high < low": lambda c, k: with_value(c.slice(k, k + 1), "high", 0, 1.0),
    "open > high": lambda c, k: with_value(c.slice(k, k + 1), "open", 0, 1e6),
    "close < low": lambda c, k: with_value(c.slice(k, k + 1), "close", 0, 1e-3),
    "volume < 0": lambda c, k: with_value(c.slice(k, k + 1), "volume", 0, -1.0),
    "funding inf": lambda c, k: with_value(c.slice(k, k + 1), "funding_rate", 0, np.inf),
    "open interest <= 0": lambda c, k: with_value(c.slice(k, k + 1), "open_interest", 0, 0.0),
    "time 0": lambda c, k: with_value(c.slice(k, k + 1), "open_time_ms", 0, 0),
    "year 2200": lambda c, k: with_value(c.slice(k, k + 1), "open_time_ms", 0, 7_258_118_400_000),
    "misaligned": lambda c, k: with_value(c.slice(k, k + 1), "open_time_ms", 0, T0 + k * H + 1),
    "before the last": lambda c, k: c.slice(k - 5, k - 4),
    "not increasing inside": lambda c, k: c.slice(k, k + 1).concat(c.slice(k, k + 1)),
    "good then bad": lambda c, k: c.slice(k, k + 2).concat(with_value(c.slice(k + 2, k + 3), "close", 0, -1.0)),
    "empty": lambda c, k: c.slice(0, 0),
    "oversized": lambda c, k: make_candles(MAX_BATCH + 1),
    "bad replacement": lambda c, k: with_value(c.slice(k - 1, k), "high", 0, 1.0),  # the forming candle, bad
}


@pytest.mark.parametrize("rule", list(BAD_MESSAGES))
def test_a_refused_message_leaves_the_stream_as_if_it_was_not_sent(service, rule):
    candles = full_candles(260)
    k = 200
    session = StreamSession(service)
    parts = [session.step(SYMBOL, TF, "", candles.slice(0, k))[1]]
    before = session.window
    with pytest.raises(InvalidArgument):
        session.step("", "", "", BAD_MESSAGES[rule](candles, k))
    assert np.array_equal(session.window.open_time_ms, before.open_time_ms)
    assert np.array_equal(session.window.close, before.close)
    parts += stream_steps(session, candles, k, 260)
    assert_same(parts, service.predict(SYMBOL, TF, "", candles)[1])


def test_refused_messages_are_not_recorded_and_valid_candles_always_are(registry, store, model, service):
    other = registry.register(symbol="ETH/USDT", seed=6)
    candles = full_candles(260)
    # a refused first message leaves the stream unnamed: the next first message may name any key
    session = StreamSession(service)
    with pytest.raises(InvalidArgument):
        session.step(SYMBOL, TF, "", with_value(candles.slice(0, 5), "close", 2, -1.0))
    assert session.symbol == "" and session.model_id == "" and len(session.window) == 0
    # an unknown pin is not the candles' fault: they join the history, the pin is not kept
    with pytest.raises(NotFound):
        session.step(SYMBOL, TF, "no-such-model", candles.slice(0, 5))
    assert session.symbol == SYMBOL and session.model_id == "" and len(session.window) == 5
    parts = [session.step("", "", "", candles.slice(5, 200))[1]]
    with pytest.raises(NotFound):
        session.step("", "", "no-such-model", candles.slice(200, 201))
    assert session.window.open_time_ms[-1] == candles.open_time_ms[200]
    # another market's model, or a valid pin with a bad candle: refused, nothing kept
    with pytest.raises(InvalidArgument, match="model_id"):
        session.step("", "", other.model_id, candles.slice(201, 202))
    newer = registry.register(seed=7)
    with pytest.raises(InvalidArgument):
        session.step("", "", newer.model_id, with_value(candles.slice(201, 202), "close", 0, np.nan))
    assert session.model_id == "" and session.window.open_time_ms[-1] == candles.open_time_ms[200]
    parts += stream_steps(session, candles, 200, 260)  # candle 200 again: replaces itself
    assert all(session.step("", "", "", candles.slice(259, 260))[0].model_id == model.model_id for _ in range(2))
    assert_same(parts, tail(service.predict(SYMBOL, TF, model.model_id, candles)[1], 5))


def test_a_failure_after_the_checks_keeps_the_replacing_candle(registry, store, model, service):
    """A funding model pinned on a stream whose history lacks funding fails (FAILED_PRECONDITION) while predicting,
    after the message replaced the still-forming last candle: the new version of the candle is kept (it is valid),
    and so is the pin (the model exists for this market; the stream answers with it once its history allows). The
    final version of the candle, pinned back to the plain model, answers as Predict does."""
    funded = registry.register(spec=FeatureSpec(use_funding_rate=True), seed=8)
    plain = make_candles(260)
    session = StreamSession(service)
    parts = [session.step(SYMBOL, TF, model.model_id, plain.slice(0, 199))[1]]
    forming = with_value(with_value(plain.slice(199, 200), "funding_rate", 0, 1e-4), "close",
                         0, float(plain.high[199]))
    session.step("", "", "", plain.slice(199, 200))  # the first version of candle 199
    with pytest.raises(FailedPrecondition):
        session.step("", "", funded.model_id, forming)
    assert session.model_id == funded.model_id
    assert session.window.close[-1] == plain.high[199] and session.window.funding_rate[-1] == 1e-4
    parts.append(session.step("", "", model.model_id, plain.slice(199, 200))[1])  # the closed candle 199
    parts += stream_steps(session, plain, 200, 260)
    assert_same(parts, service.predict(SYMBOL, TF, model.model_id, plain)[1])


def test_a_stream_on_a_market_without_a_model_recovers_when_one_serves(registry, store, model, service):
    """No model yet is NOT_FOUND for each message, but the candles join the history: once a model serves, the very
    next message answers ready, exactly as Predict over the same candles."""
    candles = make_candles(300)
    session = StreamSession(service)
    for i in range(0, 150, 10):
        with pytest.raises(NotFound, match="no model registered for SOL/USDT"):
            session.step("SOL/USDT", TF, "", candles.slice(i, i + 10))
    sol = registry.register(symbol="SOL/USDT", seed=14)
    answered, p = session.step("", "", "", candles.slice(150, 151))
    assert answered.model_id == sol.model_id and p.ready.all()
    parts = [p, *stream_steps(session, candles, 151, 300)]
    assert_same(parts, tail(service.predict("SOL/USDT", TF, "", candles)[1], 150))


def test_a_stream_recovers_by_itself_after_a_swap_to_a_funding_model(registry, store, model, service):
    """The client sends funding rate only from candle 300 on; a funding model starts serving then. Its first
    answers fail (the history lacks funding for its window), and once the candles with funding cover the window the
    same stream answers, without reconnecting; from the first candle whose whole warm-up carries funding on, exactly
    what Predict answers over those candles."""
    candles = make_candles(N + 100, funding=True)
    candles = replace(candles, funding_rate=np.where(np.arange(len(candles)) < 300, np.nan, candles.funding_rate))
    session = StreamSession(service)
    session.step(SYMBOL, TF, "", candles.slice(0, 200))
    stream_steps(session, candles, 200, 300)
    funded = registry.register(spec=FeatureSpec(use_funding_rate=True), seed=15)
    assert store.refresh() == [funded.model_id]
    failed, answered = [], []
    for i in range(300, len(candles)):
        try:
            model_used, p = session.step("", "", "", candles.slice(i, i + 1))
        except FailedPrecondition:
            assert not answered, "once recovered, the stream keeps answering"
            failed.append(i)
            continue
        assert model_used.model_id == funded.model_id
        answered.append((i, p))
    assert failed and answered and failed[-1] + 1 == answered[0][0]
    assert all(p.ready.all() and np.isfinite(p.proba).all() for _, p in answered)
    full = 300 + funded.warmup_bars - 1  # the first candle whose warm-up lies in the candles with funding
    expected = tail(service.predict(SYMBOL, TF, funded.model_id, candles.slice(300, len(candles)))[1], full - 300)
    assert_same([p for i, p in answered if i >= full], expected)


def test_after_a_swap_to_a_funding_model_the_stream_answers_like_predict(registry, store, model, service):
    """The stream kept funding rate and open interest while a model that ignores them served; the newer model that
    uses them answers at once what Predict with it answers over the same candles."""
    candles = full_candles()
    free = StreamSession(service)
    assert free.step(SYMBOL, TF, "", candles.slice(0, 150))[0].model_id == model.model_id
    stream_steps(free, candles, 150, 300)
    funded = registry.register(spec=FeatureSpec(use_funding_rate=True, use_open_interest=True), seed=9)
    assert store.refresh() == [funded.model_id]
    answered, p = free.step("", "", "", candles.slice(300, 301))
    assert answered.model_id == funded.model_id
    parts = [p, *stream_steps(free, candles, 301, N)]
    assert_same(parts, tail(service.predict(SYMBOL, TF, funded.model_id, candles)[1], 300))


def test_a_pinned_funding_model_gets_the_history_a_plain_model_did_not_use(registry, store, model, service):
    funded = registry.register(spec=FeatureSpec(use_funding_rate=True), seed=10)
    registry.register(seed=11)  # the newest, plain, serves
    store.refresh()
    candles = full_candles()
    session = StreamSession(service)
    assert session.step(SYMBOL, TF, "", candles.slice(0, 250))[0].model_id != funded.model_id
    stream_steps(session, candles, 250, 350)
    answered, p = session.step("", "", funded.model_id, candles.slice(350, 351))
    assert answered.model_id == funded.model_id
    expected = service.predict(SYMBOL, TF, funded.model_id, candles)[1]
    assert np.array_equal(p.proba[0], expected.proba[350])
    assert_same([p, *stream_steps(session, candles, 351, N)], tail(expected, 350))


def test_the_history_covers_the_longest_warm_up_of_the_market(registry, store, model, service):
    long_spec = FeatureSpec(sma_windows=(10, 20, 50, 200))
    long = registry.register(spec=long_spec, seed=12)  # registered, not serving
    registry.register(seed=13)  # the newest serves, with the default (shorter) warm-up
    assert long_spec.warmup_bars > DEFAULT_SPEC.warmup_bars
    assert store.max_warmup_bars(SYMBOL, TF) == long_spec.warmup_bars
    candles = make_candles(700)
    session = StreamSession(service)
    session.step(SYMBOL, TF, "", candles.slice(0, 10))
    stream_steps(session, candles, 10, 650)
    assert len(session.window) >= long_spec.warmup_bars
    answered, p = session.step("", "", long.model_id, candles.slice(650, 651))
    assert answered.model_id == long.model_id and p.ready[0]
    assert np.array_equal(p.proba[0], service.predict(SYMBOL, TF, long.model_id, candles.slice(200, 651))[1].proba[-1])


def test_the_memory_a_stream_holds_is_bounded(service):
    candles = make_candles(N)
    session = StreamSession(service)
    session.step(SYMBOL, TF, "", candles.slice(0, 1))
    stream_steps(session, candles, 1, N)
    warmup = DEFAULT_SPEC.warmup_bars
    capacity = session.history.capacity
    assert warmup <= len(session.window) <= capacity <= warmup + 1 + max(32, warmup // 4)
    assert session.nbytes == 8 * 8 * capacity
    # a large message grows the arrays once; later messages shrink them back
    big = StreamSession(service)
    big.step(SYMBOL, TF, "", candles.slice(0, MAX_BATCH - 100))
    assert big.history.capacity >= MAX_BATCH - 100
    more = make_candles(N + 200)
    later = replace(more, open_time_ms=more.open_time_ms + H * N)
    for i in range(200):
        big.step("", "", "", later.slice(i, i + 1))
    assert big.history.capacity <= warmup + 1 + max(32, warmup // 4)
