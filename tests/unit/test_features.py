"""Features: finite window and bit-exactness, scale invariance, reference values, the spec."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shared.features as features
from shared.features import FeatureSpec, compute_features, feature_matrix, spec_for_frame

DATA = Path(__file__).resolve().parents[2] / "data" / "btcusd_1h_coinbase_2017-2019.csv.gz"
PRICE_COLUMNS = ("open", "high", "low", "close")
DEFAULT = FeatureSpec()

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def real() -> dict[str, np.ndarray]:
    frame = pd.read_csv(DATA)
    assert list(frame.columns) == ["timestamp", "open", "high", "low", "close", "volume"]
    return {c: frame[c].to_numpy(np.float64) for c in ("open", "high", "low", "close", "volume")}


@pytest.fixture(scope="module")
def real_features(real) -> np.ndarray:
    return feature_matrix(real, DEFAULT)


def _slice(cols: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: v[start:stop] for k, v in cols.items()}


@st.composite
def candles(draw, min_rows: int = 1, max_rows: int = 260, extras: bool = False) -> dict[str, np.ndarray]:
    """Valid OHLCV candles on a tick grid, with gaps, flat stretches, zero and constant volumes."""
    n = draw(st.integers(min_rows, max_rows))
    if n == 0:
        empty = np.empty(0)
        names = ("open", "high", "low", "close", "volume") + (("funding_rate", "open_interest") if extras else ())
        return {k: empty for k in names}
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    tick = draw(st.sampled_from([0.01, 0.5, 1.0, 1e-4, 0.25]))
    start = draw(st.integers(200, 100_000))  # in ticks: a tick is at least 1e-5 of the price
    big = draw(st.sampled_from([1, 5, 50, 400]))
    steps = rng.integers(-big, big + 1, n)
    steps[rng.random(n) < 0.2] = 0
    close_t = np.maximum(start + np.cumsum(steps), 1)
    gaps = np.where(rng.random(n) < 0.3, rng.integers(-big, big + 1, n), 0)
    open_t = np.maximum(np.concatenate(([close_t[0]], close_t[:-1])) + gaps, 1)
    high_t = np.maximum(open_t, close_t) + rng.integers(0, big + 1, n) * (rng.random(n) < 0.7)
    low_t = np.maximum(np.minimum(open_t, close_t) - rng.integers(0, big + 1, n) * (rng.random(n) < 0.7), 1)
    volume = np.round(rng.lognormal(3, 2, n), 4)
    volume[rng.random(n) < 0.15] = 0.0
    # Flat stretches: one price, no range, and a constant or zero volume.
    for _ in range(draw(st.integers(0, 3))):
        a = draw(st.integers(0, n - 1))
        b = min(n, a + draw(st.integers(1, 130)))
        level = close_t[a]
        open_t[a:b] = high_t[a:b] = low_t[a:b] = close_t[a:b] = level
        volume[a:b] = draw(st.sampled_from([0.0, 1.5, 12345.678]))
    cols = {
        "open": open_t * tick,
        "high": high_t * tick,
        "low": low_t * tick,
        "close": close_t * tick,
        "volume": volume,
    }
    if extras:
        funding = np.round(rng.normal(0.0001, 0.0003, n), 6)
        # Funding is set every few candles and carried forward, as joined to candles.
        every = draw(st.sampled_from([1, 8]))
        cols["funding_rate"] = np.repeat(funding[::every], every)[:n]
        cols["open_interest"] = np.round(rng.lognormal(10, 1, n), 2)
    return cols


def _distinct(lo: int, hi: int, max_size: int):
    return st.lists(st.integers(lo, hi), min_size=1, max_size=max_size, unique=True).map(tuple)


specs = st.builds(
    FeatureSpec,
    sma_windows=_distinct(1, 40, 4),
    rsi_period=st.integers(1, 20),
    bb_window=st.integers(2, 30),
    bb_k=st.sampled_from([0.5, 1.0, 2.0, 2.5, 3.3]),
    return_lags=_distinct(1, 40, 4),
    volume_window=st.integers(1, 30),
    volatility_window=st.integers(2, 30),
    atr_window=st.integers(1, 20),
    use_funding_rate=st.booleans(),
    funding_window=st.integers(1, 30),
    use_open_interest=st.booleans(),
    oi_lags=_distinct(1, 30, 3),
    context_bars=st.one_of(st.just(()), _distinct(2, 60, 2)),
)
spec_choices = st.one_of(st.just(DEFAULT), st.just(FeatureSpec(context_bars=(24, 96))), specs)


def _ohlcv_valid(cols: dict[str, np.ndarray]) -> bool:
    c = cols
    return bool(
        (c["low"] > 0).all()
        and (c["high"] >= np.maximum(c["open"], c["close"])).all()
        and (c["low"] <= np.minimum(c["open"], c["close"])).all()
        and (c["volume"] >= 0).all()
    )


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


# --------------------------------------------------------------------------- the spec


def test_default_spec():
    assert DEFAULT.name == "ohlcv" and DEFAULT.version == 1 and DEFAULT.key == "ohlcv-v1"
    assert DEFAULT.warmup_bars == 100
    assert DEFAULT.feature_names == (
        "sma_ratio_10", "sma_ratio_20", "sma_ratio_50", "sma_ratio_100",
        "rsi_14", "bb_pctb_20", "bb_width_20",
        "ret_1", "ret_2", "ret_4", "ret_8", "ret_24", "ret_48",
        "volume_ratio_20", "volatility_24", "natr_14", "candle_body", "candle_range",
    )  # fmt: skip
    assert hash(DEFAULT) == hash(FeatureSpec())
    assert DEFAULT.required_columns == ("open", "high", "low", "close", "volume")


def test_context_features_are_version_2_and_lengthen_the_warmup():
    spec = FeatureSpec(context_bars=(24, 168))
    assert spec.version == 2 and spec.key == "ohlcv-v2" and spec.warmup_bars == 169
    assert spec.feature_names[: len(DEFAULT.feature_names)] == DEFAULT.feature_names
    assert spec.feature_names[len(DEFAULT.feature_names):] == (
        "ctx_ret_24", "ctx_range_24", "ctx_pos_24", "ctx_vol_24",
        "ctx_ret_168", "ctx_range_168", "ctx_pos_168", "ctx_vol_168",
    )  # fmt: skip
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["version"] == 2 and d["context_bars"] == [24, 168]
    assert FeatureSpec.from_dict(d) == spec
    # a version-1 record is exactly what was stored before context features existed (no new key)
    assert "context_bars" not in DEFAULT.to_dict()
    assert set(DEFAULT.to_dict()) == {
        "name", "version", "sma_windows", "rsi_period", "bb_window", "bb_k", "return_lags", "volume_window",
        "volatility_window", "atr_window", "use_funding_rate", "funding_window", "use_open_interest", "oi_lags"}
    with pytest.raises(ValueError, match="does not match"):
        FeatureSpec.from_dict({**DEFAULT.to_dict(), "context_bars": [24]})  # context features claimed as version 1
    with pytest.raises(ValueError, match="does not match"):
        FeatureSpec.from_dict({**d, "context_bars": []})
    with pytest.raises(ValueError, match="version 3"):
        FeatureSpec.from_dict({**d, "version": 3})
    for bad in ((1,), (24, 24), (0,), (10_001,)):
        with pytest.raises(ValueError, match="context_bars"):
            FeatureSpec(context_bars=bad)


def test_new_models_train_on_the_version_1_set_and_the_measured_context_is_version_2():
    assert features.TRAINING_SPEC == DEFAULT == features.training_spec() and DEFAULT.key == "ohlcv-v1"
    assert FeatureSpec(context_bars=(168, 720)) == features.CONTEXT_SPEC
    assert features.CONTEXT_SPEC.key == "ohlcv-v2" and features.CONTEXT_SPEC.warmup_bars == 721


def test_context_features_leave_the_version_1_columns_bit_identical(real, real_features):
    wide = feature_matrix(real, FeatureSpec(context_bars=(96, 336)))
    k = len(DEFAULT.feature_names)
    assert _same(wide[336:, :k], real_features[336:])
    assert np.isnan(wide[:336]).all() and np.isfinite(wide[336:]).all()  # warm-up: 337 candles


def test_optional_features_add_names_and_columns():
    spec = FeatureSpec(use_funding_rate=True, use_open_interest=True)
    assert spec.feature_names[-4:] == ("funding_rate", "funding_mean_24", "oi_change_1", "oi_change_24")
    assert spec.required_columns[-2:] == ("funding_rate", "open_interest")
    assert spec.warmup_bars == 100
    assert FeatureSpec(sma_windows=(5,), use_open_interest=True, oi_lags=(200,)).warmup_bars == 201
    assert FeatureSpec(sma_windows=(5,), use_funding_rate=True, funding_window=300).warmup_bars == 300


@pytest.mark.parametrize(
    ("params", "warmup"),
    [
        ({}, 100),
        ({"sma_windows": (5,), "return_lags": (60,)}, 61),  # a return over lag L needs L + 1 candles
        ({"sma_windows": (5,), "return_lags": (1,), "volatility_window": 80}, 81),
        ({"sma_windows": (5,), "return_lags": (1,), "rsi_period": 70}, 71),
        ({"sma_windows": (5,), "return_lags": (1,), "atr_window": 90}, 91),
        ({"sma_windows": (5,), "return_lags": (1,), "bb_window": 77}, 77),
        ({"sma_windows": (5,), "return_lags": (1,), "volume_window": 66}, 66),
        ({"sma_windows": (130, 7), "return_lags": (1,)}, 130),
        ({"sma_windows": (5,), "return_lags": (1,), "context_bars": (3, 140)}, 141),
    ],
)
def test_warmup_is_derived_and_tight(real, params, warmup):
    """warmup_bars is exactly what the features need: the oldest candle of the window matters,
    the one before it does not."""
    spec = FeatureSpec(**params)
    assert spec.warmup_bars == warmup
    t = 5000
    base = feature_matrix(_slice(real, t - warmup - 5, t + 1), spec)[-1]
    assert np.isfinite(base).all()
    for age, should_change in ((warmup - 1, True), (warmup, False)):
        cols = {k: v[t - warmup - 5 : t + 1].copy() for k, v in real.items()}
        i = len(cols["close"]) - 1 - age
        for k in PRICE_COLUMNS:
            cols[k][i] *= 1.5
        cols["volume"][i] += 1000.0
        changed = not _same(feature_matrix(cols, spec)[-1], base)
        assert changed == should_change, (age, should_change)


def test_spec_round_trips_through_json():
    for spec in (DEFAULT, FeatureSpec(sma_windows=(3, 7), bb_k=1.5, use_funding_rate=True, oi_lags=(2,))):
        d = json.loads(json.dumps(spec.to_dict()))
        assert d["name"] == "ohlcv" and d["version"] == 1
        back = FeatureSpec.from_dict(d)
        assert back == spec and hash(back) == hash(spec)
        assert back.feature_names == spec.feature_names and back.warmup_bars == spec.warmup_bars


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"name": "candles"}, "name"),
        ({"name": None}, "name"),
        ({"version": 2}, "version"),
        ({"version": "1"}, "version"),
        ({"version": True}, "version"),
        ({"rsi_window": 14}, "rsi_window"),
        ({"rsi_period": 0}, "rsi_period"),
    ],
)
def test_from_dict_rejects_other_feature_sets(change, match):
    d = DEFAULT.to_dict()
    d.update(change)
    with pytest.raises(ValueError, match=match):
        FeatureSpec.from_dict(d)


def test_from_dict_requires_name_and_version():
    d = DEFAULT.to_dict()
    del d["version"]
    with pytest.raises(ValueError, match="version"):
        FeatureSpec.from_dict(d)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"sma_windows": ()}, "sma_windows"),
        ({"sma_windows": (10, 0)}, "sma_windows"),
        ({"sma_windows": (10, 10)}, "sma_windows"),
        ({"sma_windows": (10.0,)}, "sma_windows"),
        ({"sma_windows": 10}, "sma_windows"),
        ({"sma_windows": "10"}, "sma_windows"),
        ({"return_lags": (-1,)}, "return_lags"),
        ({"return_lags": (1, 20_000)}, "return_lags"),
        ({"oi_lags": ()}, "oi_lags"),
        ({"rsi_period": 0}, "rsi_period"),
        ({"rsi_period": True}, "rsi_period"),
        ({"bb_window": 1}, "bb_window"),
        ({"volatility_window": 1}, "volatility_window"),
        ({"volume_window": 0}, "volume_window"),
        ({"atr_window": -3}, "atr_window"),
        ({"funding_window": 0}, "funding_window"),
        ({"bb_k": 0.0}, "bb_k"),
        ({"bb_k": -2.0}, "bb_k"),
        ({"bb_k": math.nan}, "bb_k"),
        ({"bb_k": math.inf}, "bb_k"),
        ({"use_funding_rate": 1}, "use_funding_rate"),
        ({"use_open_interest": "yes"}, "use_open_interest"),
    ],
)
def test_spec_validation(params, match):
    with pytest.raises(ValueError, match=match):
        FeatureSpec(**params)


def test_spec_normalises_sequences():
    spec = FeatureSpec(sma_windows=[5, np.int64(9)], return_lags=[1], oi_lags=[3])
    assert spec.sma_windows == (5, 9) and type(spec.sma_windows[1]) is int
    assert spec == FeatureSpec(sma_windows=(5, 9), return_lags=(1,), oi_lags=(3,))
    assert FeatureSpec(bb_k=2).bb_k == 2.0


# --------------------------------------------------------------------------- API behaviour


def test_missing_columns_are_named(real):
    cols = _slice(real, 0, 150)
    for name in ("open", "high", "low", "close", "volume"):
        partial = {k: v for k, v in cols.items() if k != name}
        with pytest.raises(ValueError, match=name):
            feature_matrix(partial, DEFAULT)
    with pytest.raises(ValueError, match="funding_rate"):
        feature_matrix(cols, FeatureSpec(use_funding_rate=True))
    with pytest.raises(ValueError, match="open_interest"):
        feature_matrix(cols, FeatureSpec(use_open_interest=True))


def test_bad_shapes_and_first_row(real):
    cols = _slice(real, 0, 150)
    with pytest.raises(ValueError, match="volume"):
        feature_matrix({**cols, "volume": cols["volume"][:-1]}, DEFAULT)
    with pytest.raises(ValueError, match="high"):
        feature_matrix({**cols, "high": np.ones((150, 2))}, DEFAULT)
    for bad in (-1, 151, 1.0):
        with pytest.raises(ValueError, match="first_row"):
            feature_matrix(cols, DEFAULT, bad)
    assert feature_matrix(cols, DEFAULT, 150).shape == (0, 18)
    assert feature_matrix(_slice(real, 0, 0), DEFAULT).shape == (0, 18)
    short = feature_matrix(_slice(real, 0, 50), DEFAULT)
    assert short.shape == (50, 18) and np.isnan(short).all()


def test_inputs_of_other_types_give_the_same_result(real):
    cols = _slice(real, 100, 400)
    expected = feature_matrix(cols, DEFAULT)
    as_lists = {k: v.tolist() for k, v in cols.items()}
    strided = {k: np.repeat(v, 2)[::2] for k, v in cols.items()}
    assert _same(feature_matrix(as_lists, DEFAULT), expected)
    assert _same(feature_matrix(strided, DEFAULT), expected)


def test_compute_features_frame(real):
    idx = pd.date_range("2020-01-01", periods=300, freq="h", tz="UTC")
    frame = pd.DataFrame(_slice(real, 1000, 1300), index=idx)
    frame["other"] = 1.0
    out = compute_features(frame, DEFAULT)
    assert list(out.columns) == list(DEFAULT.feature_names)
    assert out.index.equals(idx)
    assert _same(out.to_numpy(), feature_matrix(_slice(real, 1000, 1300), DEFAULT))
    with pytest.raises(ValueError, match="funding_rate"):
        compute_features(frame, FeatureSpec(use_funding_rate=True))


def test_spec_for_frame_uses_a_column_only_when_it_covers_the_window():
    frame = pd.DataFrame({c: np.ones(20) for c in ("open", "high", "low", "close", "volume")})
    assert spec_for_frame(frame) == DEFAULT
    frame["funding_rate"] = np.nan
    frame["open_interest"] = np.nan
    assert spec_for_frame(frame) == DEFAULT
    frame.loc[2:, "funding_rate"] = 0.0001  # 90 %: enough
    frame.loc[18:, "open_interest"] = 5.0  # 10 %: too little, left out rather than shrinking the window
    spec = spec_for_frame(frame)
    assert spec.use_funding_rate and not spec.use_open_interest
    frame.loc[1:, "open_interest"] = 5.0
    assert spec_for_frame(frame) == FeatureSpec(use_funding_rate=True, use_open_interest=True)
    assert spec_for_frame(frame, min_coverage=1.0) == DEFAULT
    base = FeatureSpec(sma_windows=(3,), use_open_interest=True)
    kept = spec_for_frame(frame[["close"]], base)
    assert kept.use_open_interest and kept.sma_windows == (3,)


# --------------------------------------------------------------------------- reference values


def test_hand_computed_window_3():
    """Five candles, every window 3, values worked out by hand."""
    close = np.array([10.0, 11.0, 12.0, 11.0, 13.0])
    cols = {
        "open": np.array([10.0, 10.0, 11.0, 12.0, 12.0]),
        "high": np.array([10.5, 11.5, 12.5, 12.0, 13.5]),
        "low": np.array([9.5, 10.0, 11.0, 10.5, 11.5]),
        "close": close,
        "volume": np.array([1.0, 2.0, 3.0, 0.0, 6.0]),
    }
    spec = FeatureSpec(
        sma_windows=(3,), rsi_period=3, bb_window=3, bb_k=2.0, return_lags=(1, 3),
        volume_window=3, volatility_window=3, atr_window=3,
    )  # fmt: skip
    assert spec.warmup_bars == 4
    x = dict(zip(spec.feature_names, feature_matrix(cols, spec)[-1], strict=True))
    s = math.sqrt(2 / 3)  # closes 12, 11, 13: mean 12, deviations 0, -1, 1
    expected = {
        "sma_ratio_3": 13 / 12 - 1,
        "rsi_3": 75.0,  # changes +1, -1, +2: gains 3, losses 1
        "bb_pctb_3": (13 - (12 - 2 * s)) / (4 * s),
        "bb_width_3": 4 * s / 12,
        "ret_1": 13 / 11 - 1,
        "ret_3": 13 / 11 - 1,  # close[1] = 11
        "volume_ratio_3": 6 / 3 - 1,  # volumes 3, 0, 6
        "candle_body": 1 / 12,
        "candle_range": 2 / 13,
    }
    r = [12 / 11 - 1, 11 / 12 - 1, 13 / 11 - 1]
    m = sum(r) / 3
    expected["volatility_3"] = math.sqrt(sum((v - m) ** 2 for v in r) / 3)
    # True ranges: max(12.5, 11) - min(11, 11) = 1.5; max(12, 12) - min(10.5, 12) = 1.5;
    # max(13.5, 11) - min(11.5, 11) = 2.5.
    expected["natr_3"] = (5.5 / 3) / 13
    for name, value in expected.items():
        assert x[name] == pytest.approx(value, rel=1e-13, abs=1e-15), name
    assert set(expected) == set(spec.feature_names)
    # Row 2 has three candles, one short of the warm-up: all NaN.
    assert np.isnan(feature_matrix(cols, spec)[2]).all()


def test_degenerate_windows_have_defined_values():
    n = 30
    flat = {k: np.full(n, 123.45) for k in PRICE_COLUMNS}
    flat["volume"] = np.zeros(n)
    spec = FeatureSpec(sma_windows=(5, 10), return_lags=(1, 3), bb_window=10, volume_window=5)
    x = dict(zip(spec.feature_names, feature_matrix(flat, spec)[-1], strict=True))
    assert x["rsi_14"] == 50.0  # no gains and no losses
    assert x["bb_pctb_10"] == 0.5 and x["bb_width_10"] == 0.0  # std == 0
    assert x["volume_ratio_5"] == 0.0  # mean volume == 0
    zero = ("sma_ratio_5", "sma_ratio_10", "ret_1", "ret_3", "volatility_24", "natr_14", "candle_body", "candle_range")
    for name in zero:
        assert x[name] == 0.0, name
    flat["volume"][:] = 7.77  # a constant volume is exactly at its mean
    assert dict(zip(spec.feature_names, feature_matrix(flat, spec)[-1], strict=True))["volume_ratio_5"] == 0.0


def _reference(cols: dict[str, np.ndarray], spec: FeatureSpec, t: int) -> dict[str, float]:
    """Textbook formulas for row t in plain Python, in exact rational arithmetic (only the square
    root is rounded), so the reference itself carries no cancellation error. It sees only the
    row's warm-up window."""
    first = t - spec.warmup_bars + 1
    cols = {name: values[first : t + 1] for name, values in cols.items()}
    t -= first
    c, o, h, lo, v = ([Fraction(x) for x in cols[k].tolist()] for k in ("close", "open", "high", "low", "volume"))

    def mean(xs):
        return sum(xs, Fraction(0)) / len(xs)

    def pstd(xs):
        m = mean(xs)
        return Fraction(math.sqrt(mean([(x - m) ** 2 for x in xs])))

    out: dict[str, Fraction] = {}
    for w in spec.sma_windows:
        out[f"sma_ratio_{w}"] = c[t] / mean(c[t - w + 1 : t + 1]) - 1
    p = spec.rsi_period
    changes = [c[j] - c[j - 1] for j in range(t - p + 1, t + 1)]
    gain = mean([max(d, 0) for d in changes])
    loss = mean([max(-d, 0) for d in changes])
    out[f"rsi_{p}"] = Fraction(50) if gain + loss == 0 else 100 * gain / (gain + loss)
    wb, k = spec.bb_window, Fraction(spec.bb_k)
    win = c[t - wb + 1 : t + 1]
    mid, sd = mean(win), pstd(win)
    upper, lower = mid + k * sd, mid - k * sd
    out[f"bb_pctb_{wb}"] = Fraction(1, 2) if sd == 0 else (c[t] - lower) / (upper - lower)
    out[f"bb_width_{wb}"] = (upper - lower) / mid
    for lag in spec.return_lags:
        out[f"ret_{lag}"] = c[t] / c[t - lag] - 1
    wv = spec.volume_window
    mv = mean(v[t - wv + 1 : t + 1])
    out[f"volume_ratio_{wv}"] = Fraction(0) if mv == 0 else v[t] / mv - 1
    ww = spec.volatility_window
    out[f"volatility_{ww}"] = pstd([c[j] / c[j - 1] - 1 for j in range(t - ww + 1, t + 1)])
    wa = spec.atr_window
    tr = [max(h[j] - lo[j], abs(h[j] - c[j - 1]), abs(lo[j] - c[j - 1])) for j in range(t - wa + 1, t + 1)]
    out[f"natr_{wa}"] = mean(tr) / c[t]
    out["candle_body"] = (c[t] - o[t]) / o[t]
    out["candle_range"] = (h[t] - lo[t]) / c[t]
    for w in spec.context_bars:
        out[f"ctx_ret_{w}"] = c[t] / c[t - w] - 1
        top, bottom = max(h[t - w + 1 : t + 1]), min(lo[t - w + 1 : t + 1])
        out[f"ctx_range_{w}"] = (top - bottom) / c[t]
        out[f"ctx_pos_{w}"] = Fraction(1, 2) if top == bottom else (c[t] - bottom) / (top - bottom)
        out[f"ctx_vol_{w}"] = pstd([c[j] / c[j - 1] - 1 for j in range(t - w + 1, t + 1)])
    if spec.use_funding_rate:
        f = [Fraction(x) for x in cols["funding_rate"].tolist()]
        out["funding_rate"] = f[t]
        out[f"funding_mean_{spec.funding_window}"] = mean(f[t - spec.funding_window + 1 : t + 1])
    if spec.use_open_interest:
        oi = [Fraction(x) for x in cols["open_interest"].tolist()]
        for lag in spec.oi_lags:
            out[f"oi_change_{lag}"] = oi[t] / oi[t - lag] - 1
    return {name: float(value) for name, value in out.items()}


def _check_reference(cols, spec, rows, matrix):
    for t in rows:
        ref = _reference(cols, spec, t)
        assert list(ref) == list(spec.feature_names)
        np.testing.assert_allclose(matrix[t], list(ref.values()), rtol=1e-9, atol=1e-12, err_msg=f"row {t}")


@SETTINGS
@given(data=st.data(), spec=spec_choices)
def test_matches_plain_python_reference_on_generated_candles(data, spec):
    cols = data.draw(candles(min_rows=spec.warmup_bars, max_rows=spec.warmup_bars + 60, extras=True))
    matrix = feature_matrix(cols, spec)
    n, w = len(cols["close"]), spec.warmup_bars
    picks = data.draw(st.lists(st.integers(w - 1, n - 1), min_size=1, max_size=6))
    _check_reference(cols, spec, sorted({w - 1, n - 1, *picks}), matrix)


def test_matches_plain_python_reference_on_real_candles(real, real_features):
    _check_reference(real, DEFAULT, range(99, len(real["close"]), 173), real_features)


def test_matches_ta_library(real, real_features):
    """SMA and Bollinger Bands (population std) from the `ta` package, where installed."""
    ta = pytest.importorskip("ta")
    close = pd.Series(real["close"])
    got = pd.DataFrame(real_features, columns=DEFAULT.feature_names)
    for w in DEFAULT.sma_windows:
        sma = ta.trend.SMAIndicator(close, window=w).sma_indicator()
        np.testing.assert_allclose(got[f"sma_ratio_{w}"][99:], (close / sma - 1)[99:], rtol=1e-7, atol=1e-10)
    bb = ta.volatility.BollingerBands(close, window=20, window_dev=2)
    np.testing.assert_allclose(got["bb_pctb_20"][99:], bb.bollinger_pband()[99:], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(got["bb_width_20"][99:], bb.bollinger_wband()[99:] / 100, rtol=1e-7, atol=1e-10)


def test_rsi_is_cutlers_simple_mean_rsi(real, real_features):
    """Independent vectorised reference: pandas rolling means of gains and losses."""
    diff = pd.Series(real["close"]).diff()
    gain = diff.clip(lower=0).rolling(14).mean()
    loss = (-diff).clip(lower=0).rolling(14).mean()
    rsi = np.where(gain + loss == 0, 50.0, 100 * gain / (gain + loss))
    np.testing.assert_allclose(real_features[99:, 4], rsi[99:], rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------- finite window, exactness


def _assert_window_exact(cols, spec, full, rows, starts=None):
    """Row t from the full history == row t from only its last warmup_bars candles, and from
    any older starting point."""
    w = spec.warmup_bars
    for i, t in enumerate(rows):
        short = feature_matrix(_slice(cols, t - w + 1, t + 1), spec)
        assert _same(short[-1], full[t]), f"row {t} from its own window"
        assert np.isnan(short[:-1]).all()
        if starts is not None:
            s = starts[i]
            assert _same(feature_matrix(_slice(cols, s, t + 1), spec)[-1], full[t]), f"row {t} from start {s}"


@SETTINGS
@given(data=st.data(), spec=spec_choices)
def test_window_exact_on_generated_candles(data, spec):
    cols = data.draw(candles(min_rows=1, extras=True))
    assert _ohlcv_valid(cols)
    n, w = len(cols["close"]), spec.warmup_bars
    full = feature_matrix(cols, spec)
    assert np.isnan(full[: w - 1]).all()
    if n < w:
        return
    # The first and last full rows plus a few drawn ones, each also from a drawn older start.
    picks = data.draw(st.lists(st.integers(0, 10**6), min_size=2, max_size=12))
    rows = [w - 1, n - 1] + [w - 1 + p % (n - w + 1) for p in picks[2:]]
    starts = [p % (t - w + 2) for p, t in zip(picks, rows, strict=True)]
    _assert_window_exact(cols, spec, full, rows, starts)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_window_exact_on_real_candles(real, real_features, data):
    n = len(real["close"])
    rows = data.draw(st.lists(st.integers(99, n - 1), min_size=1, max_size=15))
    starts = [data.draw(st.integers(max(0, t - 3000), t - 99)) for t in rows]
    _assert_window_exact(real, DEFAULT, real_features, rows, starts)


def test_window_exact_on_every_real_row(real, real_features):
    """Streaming shape: every row computed alone from a 100-candle window equals the batch."""
    n = len(real["close"])
    for t in range(99, n, 7):
        row = feature_matrix(_slice(real, t - 99, t + 1), DEFAULT, 99)
        assert _same(row[0], real_features[t]), t


@SETTINGS
@given(data=st.data(), spec=spec_choices)
def test_future_candles_do_not_change_the_past(data, spec):
    cols = data.draw(candles(min_rows=2, extras=True))
    n = len(cols["close"])
    t = data.draw(st.integers(0, n - 2))
    other = data.draw(candles(min_rows=n, max_rows=n, extras=True))
    changed = {k: np.concatenate((v[: t + 1], other[k][t + 1 :])) for k, v in cols.items()}
    assert _same(feature_matrix(changed, spec)[: t + 1], feature_matrix(cols, spec)[: t + 1])
    truncated = feature_matrix(_slice(cols, 0, t + 1), spec)
    assert _same(truncated, feature_matrix(cols, spec)[: t + 1])


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_future_candles_do_not_change_the_past_real(real, real_features, data):
    n = len(real["close"])
    t = data.draw(st.integers(99, n - 2))
    start = max(0, t - data.draw(st.integers(99, 600)))
    stop = min(n, t + data.draw(st.integers(1, 300)))
    cols = {k: v[start:stop].copy() for k, v in real.items()}
    i = t - start
    scale = data.draw(st.floats(0.5, 2.0))
    for k in PRICE_COLUMNS:
        cols[k][i + 1 :] *= scale
    cols["volume"][i + 1 :] = cols["volume"][i + 1 :][::-1]
    got = feature_matrix(cols, DEFAULT)[: i + 1]
    assert np.isnan(got[:99]).all()
    assert _same(got[99:], real_features[start + 99 : t + 1])


@SETTINGS
@given(data=st.data(), spec=spec_choices)
def test_first_row_equals_full_computation(data, spec):
    cols = data.draw(candles(min_rows=0 if spec is DEFAULT else 1, extras=True))
    n = len(cols["close"])
    full = feature_matrix(cols, spec)
    for first in {0, n, data.draw(st.integers(0, n)), min(n, spec.warmup_bars - 1), max(0, n - 1)}:
        part = feature_matrix(cols, spec, first)
        assert part.shape == (n - first, len(spec.feature_names))
        assert _same(part, full[first:]), first


def test_first_row_equals_full_computation_real(real, real_features):
    n = len(real["close"])
    for first in (0, 1, 98, 99, 100, 127, 128, 2620, 2621, 5000, 12345, n - 1024, n - 130, n - 127, n - 1, n):
        assert _same(feature_matrix(real, DEFAULT, first), real_features[first:]), first


@pytest.mark.parametrize(("block", "vector_from"), [(1, 0), (1, 10**9), (300, 1), (10**9, 10**9), (10**9, 0)])
def test_block_size_and_summation_path_do_not_matter(real, real_features, monkeypatch, block, vector_from):
    """Row-wise vector adds and np.add.accumulate give identical sums, in any block size."""
    monkeypatch.setattr(features, "_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(features, "_VECTOR_ADD_MIN_COLUMNS", vector_from)
    cols = _slice(real, 7000, 8500)
    got = feature_matrix(cols, DEFAULT)
    assert np.isnan(got[:99]).all()
    assert _same(got[99:], real_features[7099:8500])
    spec = FeatureSpec(use_funding_rate=True, use_open_interest=True, sma_windows=(5, 30), return_lags=(1, 24))
    extra = dict(cols, funding_rate=np.sin(np.arange(1500.0)) / 1000, open_interest=1000 + np.arange(1500.0))
    monkeypatch.setattr(features, "_BLOCK_ELEMENTS", 1 << 18)
    monkeypatch.setattr(features, "_VECTOR_ADD_MIN_COLUMNS", 128)
    expected = feature_matrix(extra, spec)
    monkeypatch.setattr(features, "_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(features, "_VECTOR_ADD_MIN_COLUMNS", vector_from)
    assert _same(feature_matrix(extra, spec), expected)


# --------------------------------------------------------------------------- scale invariance


def _scaled(cols, price=1.0, volume=1.0):
    out = {k: v * price for k, v in cols.items() if k in PRICE_COLUMNS}
    out["volume"] = cols["volume"] * volume
    if "funding_rate" in cols:
        out["funding_rate"] = cols["funding_rate"]  # a rate: not a price
    if "open_interest" in cols:
        out["open_interest"] = cols["open_interest"] * volume
    return out


@SETTINGS
@given(data=st.data(), spec=spec_choices, p=st.integers(-20, 20), q=st.integers(-20, 20))
def test_power_of_two_scaling_is_exact(data, spec, p, q):
    cols = data.draw(candles(extras=True))
    scaled = _scaled(cols, price=2.0**p, volume=2.0**q)
    assert _same(feature_matrix(scaled, spec), feature_matrix(cols, spec))


@SETTINGS
@given(data=st.data(), spec=spec_choices, price=st.sampled_from([3.7, 0.013, 1234.5678]),
       volume=st.sampled_from([3.7, 0.1]))
def test_general_scaling_is_tight(data, spec, price, volume):
    cols = data.draw(candles(extras=True))
    got = feature_matrix(_scaled(cols, price=price, volume=volume), spec)
    expected = feature_matrix(cols, spec)
    assert _same(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_scaling_real_candles(real, real_features):
    exact = feature_matrix(_scaled(real, price=2.0**-7, volume=2.0**5), DEFAULT)
    assert _same(exact, real_features)
    general = feature_matrix(_scaled(real, price=3.7, volume=3.7), DEFAULT)
    np.testing.assert_allclose(general, real_features, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_raw_price_level_does_not_leak(real, real_features):
    """A feature set that leaked the price level would differ by the factor itself."""
    tripled = feature_matrix(_scaled(real, price=3.0), DEFAULT)
    assert np.nanmax(np.abs(tripled - real_features)) < 1e-9


# --------------------------------------------------------------------------- NaN before warm-up


@SETTINGS
@given(data=st.data(), spec=spec_choices)
def test_nan_before_warmup_finite_after(data, spec):
    cols = data.draw(candles(extras=True))
    x = feature_matrix(cols, spec)
    w = spec.warmup_bars
    assert x.shape == (len(cols["close"]), len(spec.feature_names))
    assert np.isnan(x[: w - 1]).all()
    assert np.isfinite(x[w - 1 :]).all()


def test_nan_before_warmup_finite_after_real(real_features):
    assert np.isnan(real_features[:99]).all()
    assert np.isfinite(real_features[99:]).all()
    rsi, pctb = real_features[99:, 4], real_features[99:, 5]
    assert ((rsi >= 0) & (rsi <= 100)).all()
    assert np.abs(pctb).max() < 5


def test_missing_optional_values_stay_missing(real):
    cols = _slice(real, 0, 300)
    spec = FeatureSpec(use_funding_rate=True, use_open_interest=True)
    funding = np.full(300, 0.0001)
    funding[150] = np.nan
    oi = np.linspace(100, 200, 300)
    oi[200] = 0.0
    x = feature_matrix(dict(cols, funding_rate=funding, open_interest=oi), spec)
    names = spec.feature_names
    fr, fm = names.index("funding_rate"), names.index("funding_mean_24")
    assert np.isnan(x[150, fr]) and np.isfinite(x[151, fr])
    assert np.isnan(x[150:174, fm]).all() and np.isfinite(x[174, fm]) and np.isfinite(x[149, fm])
    o1 = names.index("oi_change_1")
    assert np.isnan(x[201, o1]) and np.isfinite(x[200, o1]) and np.isfinite(x[202, o1])
    assert np.isfinite(x[99:, :18]).all()  # OHLCV features do not care


@given(data=st.data(), spec=spec_choices)
def test_single_row_path_equals_the_array_path(data, spec):
    """feature_matrix computes one requested row in plain floats; it must equal the numpy block exactly."""
    cols = data.draw(candles(min_rows=spec.warmup_bars + 1, max_rows=spec.warmup_bars + 40, extras=True))
    n = len(cols["close"])
    batch = feature_matrix(cols, spec)
    for t in range(spec.warmup_bars - 1, n):
        one = feature_matrix(_slice(cols, 0, t + 1), spec, t)
        assert _same(one[0], batch[t]), (t, one[0], batch[t])


def test_single_row_path_on_every_real_row(real, real_features):
    w = DEFAULT.warmup_bars
    for t in range(w - 1, len(real["close"]), 13):
        one = feature_matrix(_slice(real, t - w + 1, t + 1), DEFAULT, w - 1)
        assert _same(one[0], real_features[t]), t


# --------------------------------------------------------------------------- indicator primitives


def _primitive_columns(cols: dict[str, np.ndarray], spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Every feature column of `spec`, computed one indicator at a time by the public primitives."""
    c = cols["close"]
    out = {f"sma_ratio_{w}": features.sma_ratio(c, w) for w in spec.sma_windows}
    out[f"rsi_{spec.rsi_period}"] = features.rsi(c, spec.rsi_period)
    pctb, width = features.bollinger(c, spec.bb_window, spec.bb_k)
    out[f"bb_pctb_{spec.bb_window}"], out[f"bb_width_{spec.bb_window}"] = pctb, width
    out.update({f"ret_{lag}": features.simple_return(c, lag) for lag in spec.return_lags})
    out[f"volume_ratio_{spec.volume_window}"] = features.volume_ratio(cols["volume"], spec.volume_window)
    out[f"volatility_{spec.volatility_window}"] = features.volatility(c, spec.volatility_window)
    out[f"natr_{spec.atr_window}"] = features.natr(cols["high"], cols["low"], c, spec.atr_window)
    out["candle_body"] = features.candle_body(cols["open"], c)
    out["candle_range"] = features.candle_range(cols["high"], cols["low"], c)
    if spec.use_funding_rate:
        out["funding_rate"] = cols["funding_rate"]
        out[f"funding_mean_{spec.funding_window}"] = features.window_mean(cols["funding_rate"], spec.funding_window)
    if spec.use_open_interest:
        out.update({f"oi_change_{lag}": features.relative_change(cols["open_interest"], lag) for lag in spec.oi_lags})
    return out


def _assert_primitives_match(cols: dict[str, np.ndarray], spec: FeatureSpec) -> None:
    matrix = feature_matrix(cols, spec)
    start = spec.warmup_bars - 1
    for name, values in _primitive_columns(cols, spec).items():
        j = spec.feature_names.index(name)
        assert values.shape == (len(cols["close"]),), name
        assert _same(values[start:], matrix[start:, j]), name


def test_primitives_are_the_feature_columns_real(real):
    _assert_primitives_match(real, DEFAULT)


@SETTINGS
@given(data=st.data(), spec=spec_choices)
def test_primitives_are_the_feature_columns(data, spec):
    """One indicator alone gives bit for bit the feature column, so research code and models agree."""
    _assert_primitives_match(data.draw(candles(extras=True)), spec)


@pytest.mark.parametrize(("block", "vector_from"), [(1, 0), (300, 1), (10**9, 10**9)])
def test_primitives_do_not_depend_on_block_size_or_summation_path(real, monkeypatch, block, vector_from):
    cols = _slice(real, 3000, 4200)
    expected = _primitive_columns(cols, DEFAULT)
    monkeypatch.setattr(features, "_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(features, "_VECTOR_ADD_MIN_COLUMNS", vector_from)
    for name, values in _primitive_columns(cols, DEFAULT).items():
        assert _same(values, expected[name]), name


def test_primitives_are_nan_only_before_their_own_window():
    close = 100.0 + np.sin(np.arange(40.0))
    assert np.isnan(features.rsi(close, 14)[:14]).all() and np.isfinite(features.rsi(close, 14)[14:]).all()
    assert np.isnan(features.sma_ratio(close, 5)[:4]).all() and np.isfinite(features.sma_ratio(close, 5)[4:]).all()
    assert np.isnan(features.simple_return(close, 3)[:3]).all()
    # pandas Series and lists work as well as arrays; too short a series is all NaN
    assert _same(features.rsi(pd.Series(close), 14), features.rsi(close.tolist(), 14))
    assert np.isnan(features.rsi(close[:10], 14)).all()
    assert features.rsi(np.empty(0), 14).shape == (0,)


def test_primitives_check_their_arguments():
    close = np.linspace(100.0, 110.0, 30)
    with pytest.raises(ValueError, match="window"):
        features.rsi(close, 0)
    with pytest.raises(ValueError, match="window"):
        features.bollinger(close, 1)
    with pytest.raises(ValueError, match="k must be"):
        features.bollinger(close, 20, 0.0)
    with pytest.raises(ValueError, match="one-dimensional"):
        features.sma_ratio(close.reshape(5, 6), 3)
    with pytest.raises(ValueError, match="high has 29 values"):
        features.natr(close[:-1], close, close, 14)
