"""Labels: exact threshold semantics, unlabelled tail, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.labels import CLASSES, LabelSpec, class_balance, future_return, make_labels

DOWN, RANGE, UP, NONE = 0, 1, 2, -1


def test_class_order_matches_probability_columns():
    assert CLASSES == ("down", "range", "up")


def test_label_spec_defaults():
    spec = LabelSpec()
    assert (spec.horizon_bars, spec.threshold) == (24, 0.02)
    assert hash(spec) == hash(LabelSpec(24, 0.02))


@pytest.mark.parametrize("horizon", [0, -1, 10_001, 1.5, True, None, "24"])
def test_label_spec_rejects_bad_horizon(horizon):
    with pytest.raises(ValueError, match="horizon_bars"):
        LabelSpec(horizon_bars=horizon)


@pytest.mark.parametrize("threshold", [0, 0.0, -0.01, 1, 1.5, math.nan, math.inf, -math.inf, True, None, "0.02"])
def test_label_spec_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        LabelSpec(threshold=threshold)


def test_label_spec_accepts_limits():
    assert LabelSpec(horizon_bars=1).horizon_bars == 1
    assert LabelSpec(horizon_bars=10_000).horizon_bars == 10_000
    assert LabelSpec(threshold=1e-6).threshold == 1e-6
    assert isinstance(LabelSpec(threshold=np.float32(0.5)).threshold, float)
    assert LabelSpec(horizon_bars=np.int64(3)).horizon_bars == 3


def test_future_return():
    close = np.array([100.0, 102.0, 101.0, 98.0])
    r = future_return(close, 1)
    np.testing.assert_allclose(r[:3], [0.02, 101 / 102 - 1, 98 / 101 - 1], rtol=1e-15)
    assert np.isnan(r[3])
    r2 = future_return(close, 2)
    np.testing.assert_allclose(r2[:2], [0.01, 98 / 102 - 1], rtol=1e-15)
    assert np.isnan(r2[2:]).all()
    assert np.isnan(future_return(close, 4)).all()
    assert np.isnan(future_return(close, 50)).all()
    assert future_return(np.array([]), 1).shape == (0,)


@pytest.mark.parametrize("h", [0, -3, 1.0, True])
def test_future_return_rejects_bad_horizon(h):
    with pytest.raises(ValueError, match="horizon_bars"):
        future_return(np.array([1.0, 2.0]), h)


@pytest.mark.parametrize(
    ("end", "expected"),
    [
        (102.0, RANGE),  # exactly +2 %: 102/100-1 is 0.020000000000000018 in binary, still at-threshold
        (102.01, UP),
        (98.0, RANGE),  # exactly -2 %
        (97.99, DOWN),
        (100.0, RANGE),
        (101.99, RANGE),
        (98.01, RANGE),
    ],
)
def test_threshold_edges(end, expected):
    labels = make_labels(np.array([100.0, end]), LabelSpec(horizon_bars=1, threshold=0.02))
    assert labels.dtype == np.int8
    assert labels.tolist() == [expected, NONE]


def test_hand_made_series():
    close = np.array([100.0, 102.0, 104.04, 101.0, 98.98, 99.0])
    spec = LabelSpec(horizon_bars=1, threshold=0.02)
    # 100->102 +2 % range; 102->104.04 exactly +2 % range; 104.04->101 -2.9 % down;
    # 101->98.98 exactly -2 % range; 98.98->99 range; last unlabelled.
    assert make_labels(close, spec).tolist() == [RANGE, RANGE, DOWN, RANGE, RANGE, NONE]
    spec2 = LabelSpec(horizon_bars=2, threshold=0.02)
    # 100->104.04 up; 102->101 range; 104.04->98.98 down; 101->99 range (-1.98 %); last two unlabelled.
    assert make_labels(close, spec2).tolist() == [UP, RANGE, DOWN, RANGE, NONE, NONE]


def test_last_h_rows_unlabelled():
    close = np.linspace(100, 200, 50)
    for h in (1, 7, 49, 50, 60):
        labels = make_labels(close, LabelSpec(horizon_bars=h, threshold=0.01))
        assert len(labels) == 50
        assert (labels[max(0, 50 - h) :] == NONE).all()
        assert (labels[: max(0, 50 - h)] >= 0).all()


def test_missing_close_is_unlabelled():
    close = np.array([100.0, np.nan, 103.0, 104.0])
    assert make_labels(close, LabelSpec(horizon_bars=1, threshold=0.02)).tolist() == [NONE, NONE, RANGE, NONE]


@settings(max_examples=150, deadline=None)
@given(
    cents=st.lists(st.integers(1, 10**6), min_size=2, max_size=40),
    bp=st.integers(1, 9_999),
    h=st.integers(1, 5),
)
def test_labels_match_exact_decimal_arithmetic(cents, bp, h):
    """Prices with two decimals and a threshold in basis points, judged in exact integers."""
    close = np.array(cents, dtype=np.float64) / 100.0
    labels = make_labels(close, LabelSpec(horizon_bars=h, threshold=bp / 10_000))
    for t, code in enumerate(labels.tolist()):
        if t + h >= len(cents):
            assert code == NONE
            continue
        p0, p1 = cents[t], cents[t + h]
        move = (p1 - p0) * 10_000  # compared with bp * p0: the return in basis points times p0
        expected = UP if move > bp * p0 else DOWN if move < -bp * p0 else RANGE
        assert code == expected, (t, p0, p1, bp)


def test_class_balance():
    balance = class_balance(np.array([0, 1, 1, 2, -1, -1], dtype=np.int8))
    assert balance == {"down": 0.25, "range": 0.5, "up": 0.25}
    assert list(balance) == list(CLASSES)
    assert class_balance(np.array([1, 1, -1])) == {"down": 0.0, "range": 1.0, "up": 0.0}
    assert class_balance([2]) == {"down": 0.0, "range": 0.0, "up": 1.0}


def test_class_balance_rejects_empty_and_bad_codes():
    with pytest.raises(ValueError, match="no labelled rows"):
        class_balance(np.array([-1, -1], dtype=np.int8))
    with pytest.raises(ValueError, match="no labelled rows"):
        class_balance(np.array([], dtype=np.int8))
    with pytest.raises(ValueError, match="class codes"):
        class_balance(np.array([0, 3]))
    with pytest.raises(ValueError, match="class codes"):
        class_balance(np.array([0, -2]))
    with pytest.raises(ValueError, match="integer"):
        class_balance(np.array([0.0, 1.5]))


def test_class_balance_of_make_labels_sums_to_one():
    rng = np.random.default_rng(7)
    close = 100 * np.cumprod(1 + rng.normal(0, 0.01, 500))
    balance = class_balance(make_labels(close, LabelSpec(horizon_bars=10, threshold=0.02)))
    assert math.isclose(sum(balance.values()), 1.0)
    assert all(v > 0 for v in balance.values())


# --------------------------------------------------------------------------- triple barrier and gaps


def test_triple_barrier_against_a_hand_made_path():
    from shared.labels import TRIPLE_BARRIER, triple_barrier_labels

    close = np.array([100.0, 101.0, 103.0, 99.0, 97.0, 100.0, 102.0, 100.0, 100.0, 100.0])
    got = triple_barrier_labels(close, 3, 0.02)
    # t=0: 103 at k=2 is +3 % before any fall: up (the fixed horizon sees 99 at k=3: range)
    # t=1: 103 (+1.98 %) and 99 (-1.98 %) stay inside; 97 at k=3 is -3.96 %: down
    # t=2: 99 at k=1 is -3.9 %: down first, although nothing comes back up
    # t=4: 100 at k=1 is +3.1 %: up
    # t=5: 102 at k=1 is exactly +2 %: at the threshold is not beyond it; then 100, 100: range
    # t=6: 100 at k=1 is -1.96 %: inside; range
    assert got.tolist() == [UP, DOWN, DOWN, DOWN, UP, RANGE, RANGE, -1, -1, -1]
    assert make_labels(close, LabelSpec(3, 0.02, kind=TRIPLE_BARRIER)).tolist() == got.tolist()
    assert make_labels(close, LabelSpec(3, 0.02)).tolist()[:2] == [RANGE, DOWN]


def test_triple_barrier_touch_up_then_down_is_up_and_the_reverse_is_down():
    from shared.labels import triple_barrier_labels

    assert triple_barrier_labels(np.array([100.0, 103.0, 95.0, 100.0]), 3, 0.02)[0] == UP
    assert triple_barrier_labels(np.array([100.0, 97.0, 105.0, 100.0]), 3, 0.02)[0] == DOWN
    assert triple_barrier_labels(np.array([100.0, 101.0, 99.0, 100.0]), 3, 0.02)[0] == RANGE


def test_triple_barrier_blocks_give_the_same_labels_as_one_pass(monkeypatch):
    import shared.labels as labels_module

    rng = np.random.default_rng(4)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 5000)))
    whole = labels_module.triple_barrier_labels(close, 24, 0.02)
    monkeypatch.setattr(labels_module, "_BLOCK_ROWS", 97)
    assert labels_module.triple_barrier_labels(close, 24, 0.02).tolist() == whole.tolist()
    # the reference: a plain loop over the path
    ref = np.full(len(close), -1)
    for t in range(len(close) - 24):
        ref[t] = RANGE
        for k in range(1, 25):
            r = close[t + k] / close[t] - 1
            if r > 0.02 + 1e-12:
                ref[t] = UP
                break
            if r < -0.02 - 1e-12:
                ref[t] = DOWN
                break
    assert whole.tolist() == ref.tolist()


@pytest.mark.parametrize("kind", ["fixed_horizon", "triple_barrier"])
def test_a_gap_drops_exactly_the_labels_whose_horizon_spans_it(kind):
    tf = 3_600_000
    n, h, gap_at = 60, 5, 30  # candles 30 .. 32 are missing: open times jump by 4 candles after row 29
    times = np.arange(n, dtype=np.int64) * tf
    times[gap_at:] += 3 * tf
    close = 100 * np.exp(np.cumsum(np.random.default_rng(1).normal(0, 0.02, n)))
    spec = LabelSpec(h, 0.02, kind=kind)
    without = make_labels(close, spec)
    with_times = make_labels(close, spec, open_time_ms=times, timeframe_ms=tf)
    dropped = np.flatnonzero((without >= 0) & (with_times < 0)).tolist()
    assert dropped == list(range(gap_at - h, gap_at))  # rows 25 .. 29 look across the gap
    kept = with_times >= 0
    assert (with_times[kept] == without[kept]).all()


def test_label_kind_is_checked():
    with pytest.raises(ValueError, match="kind"):
        LabelSpec(kind="path")


# --------------------------------------------------------------------------- volatility-scaled barriers


def test_volatility_fields_default_to_a_fixed_threshold_and_are_set_together():
    assert (LabelSpec().volatility_bars, LabelSpec().volatility_multiple) == (0, 0.0)
    assert not LabelSpec().volatility_scaled
    spec = LabelSpec(volatility_bars=np.int64(168), volatility_multiple=np.float32(0.5))
    assert spec.volatility_scaled and (spec.volatility_bars, spec.volatility_multiple) == (168, 0.5)
    assert isinstance(spec.volatility_bars, int) and isinstance(spec.volatility_multiple, float)
    for bad in ({"volatility_bars": 168}, {"volatility_multiple": 0.5}):
        with pytest.raises(ValueError, match="set together"):
            LabelSpec(**bad)
    for bars in (1, -1, 10_001, 2.5, True):
        with pytest.raises(ValueError, match="volatility_bars"):
            LabelSpec(volatility_bars=bars, volatility_multiple=0.5)
    for k in (-0.5, float("nan"), float("inf"), 101.0, True):
        with pytest.raises(ValueError, match="volatility_multiple"):
            LabelSpec(volatility_bars=24, volatility_multiple=k)


def _reference_barrier(close: np.ndarray, t: int, bars: int, k: float, h: int) -> float:
    """k * (population std of the `bars` 1-bar returns ending at t) * sqrt(h), in plain Python from closes <= t."""
    r = [close[j] / close[j - 1] - 1 for j in range(t - bars + 1, t + 1)]
    m = sum(r) / bars
    return k * math.sqrt(sum((x - m) ** 2 for x in r) / bars) * math.sqrt(h)


@pytest.mark.parametrize("kind", ["fixed_horizon", "triple_barrier"])
def test_volatility_barrier_reads_only_past_closes_and_matches_a_reference(kind):
    from shared.labels import barriers, triple_barrier_labels

    rng = np.random.default_rng(11)
    vol = np.where(np.arange(600) < 300, 0.002, 0.02)  # a quiet half, then a wild half
    close = 100 * np.exp(np.cumsum(rng.normal(0, vol)))
    spec = LabelSpec(horizon_bars=6, threshold=0.02, kind=kind, volatility_bars=48, volatility_multiple=0.8)
    b = barriers(close, spec)
    assert np.isnan(b[:48]).all() and np.isfinite(b[48:]).all()
    for t in (48, 200, 299, 300, 350, 599):
        assert b[t] == pytest.approx(_reference_barrier(close, t, 48, 0.8, 6), rel=1e-9)
    # a later close cannot change the barrier of t
    changed = close.copy()
    changed[301:] *= 3.0
    assert np.array_equal(barriers(changed, spec)[:301], b[:301], equal_nan=True)
    labels = make_labels(close, spec)
    assert (labels[:48] == NONE).all() and (labels[-6:] == NONE).all()
    for t in range(48, len(close) - 6):
        expected = int(triple_barrier_labels(close[t: t + 7], 6, float(b[t]))[0]) if kind == "triple_barrier" else (
            UP if close[t + 6] / close[t] - 1 > b[t] + 1e-12 else
            DOWN if close[t + 6] / close[t] - 1 < -b[t] - 1e-12 else RANGE)
        assert labels[t] == expected, t
    # the barrier follows the regime: both halves have moves beyond it, unlike a fixed 2 % barrier in the quiet half
    quiet, wild = labels[60:290], labels[360:590]
    for part in (quiet, wild):
        assert {DOWN, RANGE, UP} <= set(part.tolist())
    fixed = make_labels(close, LabelSpec(horizon_bars=6, threshold=0.02, kind=kind))
    assert set(fixed[60:290].tolist()) == {RANGE}


def test_volatility_barrier_history_and_gaps():
    rng = np.random.default_rng(2)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 300)))
    spec = LabelSpec(horizon_bars=4, volatility_bars=24, volatility_multiple=0.5)
    assert spec.history_bars == 24 and LabelSpec().history_bars == 0
    whole = make_labels(close, spec)
    # labelling a later window gives the same label wherever the window holds volatility_bars earlier closes
    part = make_labels(close[100:], spec)
    assert np.array_equal(part[24:], whole[124:])
    assert (part[:24] == NONE).all()
    assert (make_labels(close[:20], spec) == NONE).all()
    times = np.arange(300, dtype=np.int64) * 60_000
    times[150:] += 60_000  # one missing candle before row 150
    gapped = make_labels(close, spec, times, 60_000)
    assert (gapped[146:150] == NONE).all() and np.array_equal(gapped[:146], whole[:146])
