"""Feature engineering shared by training and inference: one definition, computed in one place.

Every feature of row ``t`` is a pure function of the candles ``t - warmup_bars + 1 .. t`` and is
bit-identical however much history precedes that window. Training computes features over years of
history, Predict over one request and StreamPredict over a rolling buffer, and all three must agree
exactly (they are compared with ``==``). That rules out anything whose floating-point result depends
on where the series starts or on how many rows are processed together:

* no cumulative sums over the series, no ``pandas.rolling`` (its add/remove updates carry rounding
  from the rows before the window), no ``ewm`` and no recursion such as Wilder smoothing;
* no ``np.sum``/``np.mean``/``np.std`` over a window axis: numpy's pairwise/unrolled reduction
  chooses its summation order from the array's shape, so one row alone and the same row inside a
  batch could be summed in a different order.

Instead every window is laid out as a 2-D strided view ``V[k, i] = x[t_i - k]`` (``k = 0`` is the
newest value) and summed strictly sequentially, ``((x[t] + x[t-1]) + x[t-2]) + ...``, either by an
accumulate along the window axis or by the same additions as whole-row vector adds; the prefixes
give the sums of all nested windows (SMA 10, 20, 50, 100) in one pass. Apart from that only
correctly rounded operations are used (``+ - * / sqrt abs maximum minimum``), so SIMD and scalar
code paths cannot differ.

All features are scale-free (ratios, returns, oscillators), so a model trained at one price level
applies at another.

Each indicator's formula is written once, as a kernel over window views. ``feature_matrix`` (and
``compute_features`` on top of it) composes the kernels with windows shared between features; the
public primitives (``rsi``, ``sma_ratio``, ``bollinger``, ...) run the same kernels on a single
series, so research code such as a backtest's RSI filter gets bit for bit the values the models
see. ``_single_row`` repeats the formulas in plain floats for the one-new-candle live path, where
~50 numpy calls would dominate; tests hold it equal to the array path.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any, TypeAlias

import numpy as np
import pandas as pd

FEATURE_SET_NAME = "ohlcv"
FEATURE_SET_VERSION = 1  # the set without context features
CONTEXT_FEATURE_SET_VERSION = 2  # the same set plus the context features of `context_bars`
FEATURE_SET_VERSIONS = (FEATURE_SET_VERSION, CONTEXT_FEATURE_SET_VERSION)

OHLCV_COLUMNS = ("open", "high", "low", "close", "volume")
FUNDING_COLUMN = "funding_rate"
OPEN_INTEREST_COLUMN = "open_interest"

# Upper bound on any window or lag. It keeps a spec read from a stored model from asking for
# absurd allocations, and is far beyond any useful look-back.
MAX_WINDOW = 10_000

# Output rows per block: a block's window matrices stay cache-sized, and memory stays bounded on
# long histories. Rows are independent, so the block size cannot change any value.
_BLOCK_ELEMENTS = 1 << 18
# From this many output rows on, window sums use row-wise vector adds instead of np.cumsum.
_VECTOR_ADD_MIN_COLUMNS = 128
_accumulate = np.add.accumulate  # np.cumsum without the Python wrapper

_WINDOW_FIELDS = ("rsi_period", "bb_window", "volume_window", "volatility_window", "atr_window", "funding_window")
_LAG_FIELDS = ("sma_windows", "return_lags", "oi_lags")
_OPTIONAL_LAG_FIELDS = ("context_bars",)  # may be empty
_BOOL_FIELDS = ("use_funding_rate", "use_open_interest")
# Windows that need at least two values to mean anything (a standard deviation).
_MIN_WINDOW = {"bb_window": 2, "volatility_window": 2}


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not minimum <= value <= MAX_WINDOW:
        raise ValueError(f"{name} must be between {minimum} and {MAX_WINDOW}, got {value}")
    return value


@dataclass(frozen=True)
class FeatureSpec:
    """The feature set's name, version and parameters: stored with every model, so inference
    computes exactly the features the model was trained on. Hashable and JSON round-trippable."""

    name: str = field(default=FEATURE_SET_NAME, init=False)
    version: int = field(default=FEATURE_SET_VERSION, init=False)
    sma_windows: tuple[int, ...] = (10, 20, 50, 100)
    rsi_period: int = 14
    bb_window: int = 20
    bb_k: float = 2.0
    return_lags: tuple[int, ...] = (1, 2, 4, 8, 24, 48)
    volume_window: int = 20
    volatility_window: int = 24
    atr_window: int = 14
    use_funding_rate: bool = False
    funding_window: int = 24
    use_open_interest: bool = False
    oi_lags: tuple[int, ...] = (1, 24)
    # Longer-horizon context of the same series, one group of features per window (in candles): the return over
    # the window, its high-low range and the close's position in it, and the volatility of its 1-bar returns.
    # Empty: the version-1 feature set; non-empty: version 2.
    context_bars: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in _LAG_FIELDS + _OPTIONAL_LAG_FIELDS:
            raw = getattr(self, name)
            if isinstance(raw, (str, bytes)) or not hasattr(raw, "__iter__"):
                raise ValueError(f"{name} must be a sequence of integers, got {raw!r}")
            values = tuple(_check_int(name, v, 2 if name in _OPTIONAL_LAG_FIELDS else 1) for v in raw)
            if not values and name not in _OPTIONAL_LAG_FIELDS:
                raise ValueError(f"{name} must not be empty")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must not repeat a value, got {values}")
            object.__setattr__(self, name, values)
        for name in _WINDOW_FIELDS:
            object.__setattr__(self, name, _check_int(name, getattr(self, name), _MIN_WINDOW.get(name, 1)))
        k = self.bb_k
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(k) or k <= 0:
            raise ValueError(f"bb_k must be a finite number > 0, got {k!r}")
        object.__setattr__(self, "bb_k", float(k))
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "version", CONTEXT_FEATURE_SET_VERSION if self.context_bars else FEATURE_SET_VERSION)

    @property
    def key(self) -> str:
        """Short identifier of the feature-set definition, e.g. ``ohlcv-v1``."""
        return f"{self.name}-v{self.version}"

    @cached_property
    def warmup_bars(self) -> int:
        """Candles a feature row needs, counting its own candle: a return over lag L needs L + 1,
        anything built on 1-bar changes (RSI, volatility, true range) needs its window + 1."""
        needs = [
            max(self.sma_windows),
            self.rsi_period + 1,
            self.bb_window,
            max(self.return_lags) + 1,
            self.volume_window,
            self.volatility_window + 1,
            self.atr_window + 1,
        ]
        if self.context_bars:
            needs.append(max(self.context_bars) + 1)
        if self.use_funding_rate:
            needs.append(self.funding_window)
        if self.use_open_interest:
            needs.append(max(self.oi_lags) + 1)
        return max(needs)

    @cached_property
    def feature_names(self) -> tuple[str, ...]:
        """Column names in the fixed order of ``feature_matrix``'s columns."""
        names = [f"sma_ratio_{w}" for w in self.sma_windows]
        names += [f"rsi_{self.rsi_period}", f"bb_pctb_{self.bb_window}", f"bb_width_{self.bb_window}"]
        names += [f"ret_{lag}" for lag in self.return_lags]
        names += [
            f"volume_ratio_{self.volume_window}",
            f"volatility_{self.volatility_window}",
            f"natr_{self.atr_window}",
            "candle_body",
            "candle_range",
        ]
        for w in self.context_bars:
            names += [f"ctx_ret_{w}", f"ctx_range_{w}", f"ctx_pos_{w}", f"ctx_vol_{w}"]
        if self.use_funding_rate:
            names += ["funding_rate", f"funding_mean_{self.funding_window}"]
        if self.use_open_interest:
            names += [f"oi_change_{lag}" for lag in self.oi_lags]
        return tuple(names)

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Input columns this spec reads."""
        cols: tuple[str, ...] = OHLCV_COLUMNS
        if self.use_funding_rate:
            cols += (FUNDING_COLUMN,)
        if self.use_open_interest:
            cols += (OPEN_INTEREST_COLUMN,)
        return cols

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (tuples become lists). A version-1 spec has no ``context_bars`` key, exactly as stored before
        context features existed."""
        out = {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}
        if not self.context_bars:
            del out["context_bars"]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        """Inverse of ``to_dict``. Rejects another feature set's name or version and unknown keys,
        because computing a different feature set than the model was trained on would give
        plausible-looking garbage."""
        data = dict(d)
        name = data.pop("name", None)
        version = data.pop("version", None)
        if name != FEATURE_SET_NAME:
            raise ValueError(f"feature spec name must be {FEATURE_SET_NAME!r}, got {name!r}")
        if isinstance(version, bool) or version not in FEATURE_SET_VERSIONS:
            raise ValueError(f"feature spec version {version!r} of {name!r} is not supported; "
                             f"expected one of {', '.join(map(str, FEATURE_SET_VERSIONS))}")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"feature spec has unknown parameters: {', '.join(map(str, unknown))}")
        spec = cls(**data)
        if spec.version != version:
            raise ValueError(f"feature spec version {version} does not match its parameters: version "
                             f"{CONTEXT_FEATURE_SET_VERSION} has context_bars, version {FEATURE_SET_VERSION} has none "
                             f"(got context_bars={list(spec.context_bars)})")
        return spec


# Context windows measured by bench/param_sweep.py (README "Probability quality"): over 168 and 720 candles (a week
# and a month of 1h candles) they lower the out-of-sample log-loss ratio against the class prior on three series and
# two periods. They are not the training default: their warm-up is 721 candles instead of 100, which every client's
# history, the shipped sample files and policy windows would have to grow to.
DEFAULT_CONTEXT_BARS = (168, 720)
CONTEXT_SPEC = FeatureSpec(context_bars=DEFAULT_CONTEXT_BARS)


def training_spec() -> FeatureSpec:
    """The default feature spec of a new model (before funding-rate / open-interest columns are added): version 1."""
    return FeatureSpec()


TRAINING_SPEC = training_spec()
# The feature sets a training request may name (StartTrainingRequest.feature_set; empty means the default).
TRAINING_SPECS = {TRAINING_SPEC.key: TRAINING_SPEC, CONTEXT_SPEC.key: CONTEXT_SPEC}


def _windows(x: np.ndarray, start: int, stop: int, width: int) -> np.ndarray:
    """Read-only view ``V`` of shape (width, stop - start) with ``V[k, i] = x[start + i - k]``.

    ``x`` must be C-contiguous float64 and ``start - width + 1 >= 0``. Built directly on the
    buffer because it is called many times per request and stride_tricks helpers cost microseconds.
    """
    view = np.ndarray((width, stop - start), np.float64, x, start * 8, (-8, 8))
    view.flags.writeable = False
    return view


def _prefix_sums(v: np.ndarray, ends: tuple[int, ...]) -> np.ndarray:
    """Sums of ``v[:e]`` over axis 0 for each e in ``ends``, always accumulated in the same
    sequential order ``((v[0] + v[1]) + v[2]) + ...`` (see the module docstring).

    Few columns: one ``np.cumsum`` call (low call overhead). Many columns: the same additions as
    whole-row vector adds, which numpy runs several times faster than an accumulate along axis 0.
    Each element sees the identical sequence of correctly rounded additions either way.
    """
    m = v.shape[1]
    if m < _VECTOR_ADD_MIN_COLUMNS:
        return _accumulate(v, 0)[[e - 1 for e in ends]]
    res = np.empty((len(ends), m))
    acc = v[0].copy()
    for k in range(max(ends)):
        if k:
            acc += v[k]
        for j, e in enumerate(ends):
            if e == k + 1:
                res[j] = acc
    return res


def _total(v: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in the fixed sequential order of ``_prefix_sums``."""
    if v.shape[1] < _VECTOR_ADD_MIN_COLUMNS:
        return _accumulate(v, 0)[-1]
    return _prefix_sums(v, (v.shape[0],))[0]


def _column(columns: Mapping[str, np.ndarray], name: str, n: int | None) -> np.ndarray:
    if name not in columns:
        raise ValueError(f"column {name!r} is required by the feature spec but missing")
    arr = np.ascontiguousarray(columns[name], dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"column {name!r} must be one-dimensional, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"column {name!r} has {arr.shape[0]} rows, expected {n} like 'close'")
    return arr


# --------------------------------------------------------------------------- indicator kernels
#
# Each kernel is the one formula of an indicator, applied to window views (``V[k, i]``, k = 0 the
# newest value) of the rows being computed. ``_fill_block`` feeds them windows it shares between
# features; the public primitives below feed them windows of a single series. Same windows, same
# operations, so a primitive is bit-identical to the matching feature column.


def _sma_ratio_rows(c: np.ndarray, dev_sums: np.ndarray, windows: tuple[int, ...]) -> np.ndarray:
    """close / SMA - 1 per window (rows of the result), from the sums of close[t-k] - close[t].

    Written as -d / (close + d), d = mean deviation, which is exact for a constant window.
    """
    d = dev_sums / np.array(windows, dtype=np.float64)[:, None]
    return -d / (c + d)


def _rsi_rows(changes: np.ndarray) -> np.ndarray:
    """Cutler's RSI from windows of 1-bar changes: the ratio of simple means of gains and losses
    (sums, as the 1/period cancels). A window without any change is 50."""
    gains = np.maximum(changes, 0.0)
    losses = gains - changes  # exactly max(-change, 0)
    g = _total(gains)
    total = g + _total(losses)
    return np.where(total == 0, 50.0, (g / total) * 100.0)


def _bollinger_rows(c: np.ndarray, dev: np.ndarray, dev_sum: np.ndarray, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Bollinger %b and bandwidth (population std) from the window's deviations close[t-k] - close[t].

    With mean = close + d and s the std: %b = (close - lower) / (upper - lower) = 0.5 - d / (2 k s)
    and bandwidth = (upper - lower) / middle = 2 k s / mean; a flat window has %b 0.5.
    """
    w = dev.shape[0]
    d = dev_sum / w
    sq = dev - d
    np.multiply(sq, sq, out=sq)
    spread = np.sqrt(_total(sq) / w) * (2.0 * k)
    return np.where(spread == 0, 0.5, 0.5 - d / spread), spread / (c + d)


def _return_rows(c: np.ndarray, past: np.ndarray) -> np.ndarray:
    """Simple returns close[t] / close[t-lag] - 1, written as a difference for accuracy."""
    return (c - past) / past


def _volume_ratio_rows(v: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Volume relative to its mean, shifted like the close means so a constant volume gives 0."""
    dvol = _total(windows - v) / windows.shape[0]
    mean_v = v + dvol
    return np.where(mean_v == 0, 0.0, -dvol / mean_v)


def _volatility_rows(returns: np.ndarray) -> np.ndarray:
    """Population standard deviation of windows of 1-bar simple returns."""
    w = returns.shape[0]
    r_dev = returns - _total(returns) / w
    np.multiply(r_dev, r_dev, out=r_dev)
    return np.sqrt(_total(r_dev) / w)


def _natr_rows(true_ranges: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Mean true range over the window, relative to close."""
    return (_total(true_ranges) / true_ranges.shape[0]) / c


def _range_rows(highs: np.ndarray, lows: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """High-low range of the window relative to close, and the close's position in it (0 at the low, 1 at the
    high, 0.5 for a window without range). max and min are exact, so no summation order is involved."""
    hi = highs.max(axis=0)
    lo = lows.min(axis=0)
    span = hi - lo
    return span / c, np.where(span == 0, 0.5, (c - lo) / span)


def _mean_rows(windows: np.ndarray) -> np.ndarray:
    """Window mean with the fixed sequential summation order."""
    return _total(windows) / windows.shape[0]


def _change_rows(now: np.ndarray, past: np.ndarray) -> np.ndarray:
    """Relative change now / past - 1; NaN where it is undefined (a zero earlier value), like a gap."""
    change = (now - past) / past
    change[~np.isfinite(change)] = np.nan
    return change


# --------------------------------------------------------------------------- indicator primitives
#
# Whole-series versions of the feature columns, for research code that wants one indicator (e.g.
# a backtest's RSI filter) without a FeatureSpec. Each returns float64 arrays as long as its input,
# NaN where the window does not have enough history yet.

Values: TypeAlias = np.ndarray | pd.Series | Sequence[float]


def _series(x: Values, name: str, n: int | None = None) -> np.ndarray:
    if isinstance(x, pd.Series):
        arr = np.ascontiguousarray(x.to_numpy(dtype=np.float64, na_value=np.nan))
    else:
        arr = np.ascontiguousarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} values, expected {n}")
    return arr


def _by_blocks(n: int, first: int, history: int, fill: Callable[[int, int], Any], outputs: int = 1) -> np.ndarray:
    """Rows first..n-1 of `outputs` series from fill(a, b), in blocks that keep window matrices
    cache-sized (rows are independent, so blocking cannot change a value); earlier rows are NaN."""
    out = np.full((outputs, n), np.nan)
    block = max(256, _BLOCK_ELEMENTS // max(history, 1))
    with np.errstate(all="ignore"):
        for a in range(first, n, block):
            b = min(a + block, n)
            out[:, a:b] = fill(a, b)
    return out


def _changes(close: np.ndarray, a: int, b: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """close[t] - close[t-1] and close[t-1] for t = a - window + 1 .. b - 1: the 1-bar changes the
    windows of rows a..b-1 cover."""
    lo = a - window + 1
    prev = close[lo - 1 : b - 1]
    return close[lo:b] - prev, prev


def sma_ratio(close: Values, window: int) -> np.ndarray:
    """close / SMA(window) - 1 (feature ``sma_ratio_<window>``); NaN for the first window - 1 rows."""
    c = _series(close, "close")
    w = _check_int("window", window, 1)

    def fill(a: int, b: int) -> np.ndarray:
        cc = c[a:b]
        return _sma_ratio_rows(cc, _total(_windows(c, a, b, w) - cc)[None, :], (w,))

    return _by_blocks(c.size, w - 1, w, fill)[0]


def rsi(close: Values, window: int) -> np.ndarray:
    """Cutler's RSI in 0..100 over `window` 1-bar changes (feature ``rsi_<window>``); NaN for the first
    `window` rows. A finite-window RSI, unlike Wilder's, does not depend on where the series starts."""
    c = _series(close, "close")
    w = _check_int("window", window, 1)

    def fill(a: int, b: int) -> np.ndarray:
        diff, _ = _changes(c, a, b, w)
        return _rsi_rows(_windows(diff, w - 1, w - 1 + b - a, w))

    return _by_blocks(c.size, w, w + 1, fill)[0]


def bollinger(close: Values, window: int, k: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Bollinger %b and bandwidth over `window` closes with bands at `k` population standard
    deviations (features ``bb_pctb_<window>`` and ``bb_width_<window>``); NaN for the first window - 1 rows."""
    c = _series(close, "close")
    w = _check_int("window", window, 2)
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(k) or k <= 0:
        raise ValueError(f"k must be a finite number > 0, got {k!r}")
    kf = float(k)

    def fill(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        cc = c[a:b]
        dev = _windows(c, a, b, w) - cc
        return _bollinger_rows(cc, dev, _total(dev), kf)

    pctb, width = _by_blocks(c.size, w - 1, w, fill, outputs=2)
    return pctb, width


def simple_return(close: Values, lag: int) -> np.ndarray:
    """close[t] / close[t - lag] - 1 (feature ``ret_<lag>``); NaN for the first `lag` rows."""
    c = _series(close, "close")
    lag = _check_int("lag", lag, 1)
    return _by_blocks(c.size, lag, lag + 1, lambda a, b: _return_rows(c[a:b], c[a - lag : b - lag]))[0]


def volume_ratio(volume: Values, window: int) -> np.ndarray:
    """volume / mean volume over `window` candles - 1 (feature ``volume_ratio_<window>``); 0 when the mean
    is 0, NaN for the first window - 1 rows."""
    v = _series(volume, "volume")
    w = _check_int("window", window, 1)
    return _by_blocks(v.size, w - 1, w, lambda a, b: _volume_ratio_rows(v[a:b], _windows(v, a, b, w)))[0]


def volatility(close: Values, window: int) -> np.ndarray:
    """Population standard deviation of the last `window` 1-bar returns (feature ``volatility_<window>``);
    NaN for the first `window` rows."""
    c = _series(close, "close")
    w = _check_int("window", window, 2)

    def fill(a: int, b: int) -> np.ndarray:
        diff, prev = _changes(c, a, b, w)
        return _volatility_rows(_windows(diff / prev, w - 1, w - 1 + b - a, w))

    return _by_blocks(c.size, w, w + 1, fill)[0]


def natr(high: Values, low: Values, close: Values, window: int) -> np.ndarray:
    """Mean true range over `window` candles divided by close (feature ``natr_<window>``); NaN for the
    first `window` rows."""
    c = _series(close, "close")
    h = _series(high, "high", c.size)
    lw = _series(low, "low", c.size)
    w = _check_int("window", window, 1)

    def fill(a: int, b: int) -> np.ndarray:
        lo = a - w + 1
        prev = c[lo - 1 : b - 1]
        tr = np.maximum(h[lo:b], prev) - np.minimum(lw[lo:b], prev)
        return _natr_rows(_windows(tr, w - 1, w - 1 + b - a, w), c[a:b])

    return _by_blocks(c.size, w, w + 1, fill)[0]


def candle_body(open_: Values, close: Values) -> np.ndarray:
    """(close - open) / open (feature ``candle_body``)."""
    c = _series(close, "close")
    o = _series(open_, "open", c.size)
    with np.errstate(all="ignore"):
        return (c - o) / o


def candle_range(high: Values, low: Values, close: Values) -> np.ndarray:
    """(high - low) / close (feature ``candle_range``)."""
    c = _series(close, "close")
    h = _series(high, "high", c.size)
    lw = _series(low, "low", c.size)
    with np.errstate(all="ignore"):
        return (h - lw) / c


def window_mean(x: Values, window: int) -> np.ndarray:
    """Mean of the last `window` values (feature ``funding_mean_<window>`` of the funding rate); NaN for
    the first window - 1 rows."""
    arr = _series(x, "values")
    w = _check_int("window", window, 1)
    return _by_blocks(arr.size, w - 1, w, lambda a, b: _mean_rows(_windows(arr, a, b, w)))[0]


def relative_change(x: Values, lag: int) -> np.ndarray:
    """x[t] / x[t - lag] - 1 with NaN where undefined (feature ``oi_change_<lag>`` of open interest); NaN
    for the first `lag` rows."""
    arr = _series(x, "values")
    lag = _check_int("lag", lag, 1)
    return _by_blocks(arr.size, lag, lag + 1, lambda a, b: _change_rows(arr[a:b], arr[a - lag : b - lag]))[0]


def feature_matrix(columns: Mapping[str, np.ndarray], spec: FeatureSpec, first_row: int = 0) -> np.ndarray:
    """Features for rows ``first_row .. n-1`` as a float64 array (rows, len(spec.feature_names)).

    ``columns`` maps "open", "high", "low", "close", "volume" (and "funding_rate" /
    "open_interest" when the spec uses them) to 1-D arrays of equal length, oldest first. Rows with
    fewer than ``spec.warmup_bars`` candles of history are all-NaN. A row's values are identical
    whatever ``first_row`` is and however many older rows are passed, so a caller that only needs
    the newest rows passes their window and a ``first_row``.
    """
    close = _column(columns, "close", None)
    n = close.shape[0]
    opn = _column(columns, "open", n)
    high = _column(columns, "high", n)
    low = _column(columns, "low", n)
    volume = _column(columns, "volume", n)
    funding = _column(columns, FUNDING_COLUMN, n) if spec.use_funding_rate else None
    oi = _column(columns, OPEN_INTEREST_COLUMN, n) if spec.use_open_interest else None
    if isinstance(first_row, bool) or not isinstance(first_row, numbers.Integral) or not 0 <= first_row <= n:
        raise ValueError(f"first_row must be an integer between 0 and {n}, got {first_row!r}")
    first_row = int(first_row)

    out = np.full((n - first_row, len(spec.feature_names)), np.nan)
    start = max(first_row, spec.warmup_bars - 1)
    if start >= n:
        return out
    if start == n - 1 and first_row == n - 1:
        # One new row (the live-stream case): the same operations in plain floats, without ~50 numpy calls.
        try:
            out[0] = _single_row(spec, n - 1, opn, high, low, close, volume, funding, oi)
            return out
        except (ZeroDivisionError, OverflowError):
            pass  # numpy's inf/NaN semantics decide: fall through to the array path
    block = max(256, _BLOCK_ELEMENTS // spec.warmup_bars)
    with np.errstate(all="ignore"):
        for a in range(start, n, block):
            b = min(a + block, n)
            _fill_block(out[a - first_row : b - first_row], spec, a, b, opn, high, low, close, volume, funding, oi)
    return out


def _fill_block(
    out: np.ndarray,
    spec: FeatureSpec,
    a: int,
    b: int,
    opn: np.ndarray,
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    volume: np.ndarray,
    funding: np.ndarray | None,
    oi: np.ndarray | None,
) -> None:
    """Fill ``out`` with the features of rows a..b-1 (all have a full warm-up window)."""
    c = close[a:b]
    col = 0

    # Means of close, shifted by the row's own close: D[k] = close[t-k] - close[t]. A constant
    # window then has a mean of exactly close[t] and a standard deviation of exactly 0 (a plain
    # sum of w equal prices divided by w need not give the price back), and small SMA ratios
    # carry no cancellation error. The prefix sums give every nested window (SMAs and the
    # Bollinger mean) in one pass.
    sma = spec.sma_windows
    wb = spec.bb_window
    width = max(max(sma), wb)
    dev = _windows(close, a, b, width) - c
    csum = _prefix_sums(dev, (*sma, wb))
    ns = len(sma)
    out[:, col : col + ns] = _sma_ratio_rows(c, csum[:ns], sma).T
    col += ns

    # 1-bar changes of close over the rows that RSI, volatility and true range look at.
    look = max(spec.rsi_period, spec.volatility_window, spec.atr_window)
    lo = a - look + 1
    prev = close[lo - 1 : b - 1]
    diff = close[lo:b] - prev
    ra, rb = a - lo, b - lo

    out[:, col] = _rsi_rows(_windows(diff, ra, rb, spec.rsi_period))
    col += 1

    out[:, col], out[:, col + 1] = _bollinger_rows(c, dev[:wb], csum[ns], spec.bb_k)
    col += 2

    lags = spec.return_lags
    past = _windows(close, a, b, max(lags) + 1)[list(lags)]
    out[:, col : col + len(lags)] = _return_rows(c, past).T
    col += len(lags)

    out[:, col] = _volume_ratio_rows(volume[a:b], _windows(volume, a, b, spec.volume_window))
    col += 1

    out[:, col] = _volatility_rows(_windows(diff / prev, ra, rb, spec.volatility_window))
    col += 1

    tr = np.maximum(high[lo:b], prev) - np.minimum(low[lo:b], prev)
    out[:, col] = _natr_rows(_windows(tr, ra, rb, spec.atr_window), c)
    col += 1

    out[:, col] = candle_body(opn[a:b], c)
    out[:, col + 1] = candle_range(high[a:b], low[a:b], c)
    col += 2

    for w in spec.context_bars:
        out[:, col] = _return_rows(c, close[a - w : b - w])
        out[:, col + 1], out[:, col + 2] = _range_rows(_windows(high, a, b, w), _windows(low, a, b, w), c)
        lo_w = a - w + 1
        prev_w = close[lo_w - 1 : b - 1]
        rets = (close[lo_w:b] - prev_w) / prev_w
        out[:, col + 3] = _volatility_rows(_windows(rets, w - 1, w - 1 + b - a, w))
        col += 4

    if funding is not None:
        out[:, col] = funding[a:b]
        out[:, col + 1] = _mean_rows(_windows(funding, a, b, spec.funding_window))
        col += 2

    if oi is not None:
        olags = spec.oi_lags
        past_oi = _windows(oi, a, b, max(olags) + 1)[list(olags)]
        out[:, col : col + len(olags)] = _change_rows(oi[a:b], past_oi).T
        col += len(olags)


def _seq_sum(values) -> float:
    """((v[0] + v[1]) + v[2]) + ...: the summation order of _prefix_sums/_total, in plain floats."""
    acc = values[0]
    for x in values[1:]:
        acc += x
    return acc


def _single_row(spec, t, opn, high, low, close, volume, funding, oi) -> list[float]:
    """The features of row t, operation for operation as _fill_block computes them (bit-identical).

    Python floats are IEEE doubles with the same correctly rounded + - * / and sqrt as numpy, and every sum
    below runs in _fill_block's order (k = 0 is the newest value). Division by zero raises here where numpy
    would give inf/NaN; the caller then uses the array path, so both always agree.
    """
    feats: list[float] = []
    width = max(max(spec.sma_windows), spec.bb_window)
    look = max(spec.rsi_period, spec.volatility_window, spec.atr_window)
    span = max(width, look + 1, max(spec.return_lags) + 1)
    cl = close[t - span + 1: t + 1].tolist()[::-1]  # cl[k] = close[t - k]
    c = cl[0]

    # close / SMA - 1 == -d / (close + d), d = mean of (close[t-k] - close[t]); prefix sums give every window.
    dev = [x - c for x in cl[:width]]
    csum = {}
    acc = dev[0]
    ends = set(spec.sma_windows) | {spec.bb_window}
    for k in range(width):
        if k:
            acc += dev[k]
        if k + 1 in ends:
            csum[k + 1] = acc
    for w in spec.sma_windows:
        d = csum[w] / float(w)
        feats.append(-d / (c + d))

    # Cutler's RSI over 1-bar changes.
    diff = [cl[k] - cl[k + 1] for k in range(look)]  # diff[k] = close[t-k] - close[t-k-1]
    gains = [x if x > 0.0 else 0.0 for x in diff[: spec.rsi_period]]
    losses = [g - x for g, x in zip(gains, diff[: spec.rsi_period], strict=True)]
    g = _seq_sum(gains)
    total = g + _seq_sum(losses)
    feats.append(50.0 if total == 0 else (g / total) * 100.0)

    # Bollinger %b and bandwidth.
    wb = spec.bb_window
    db = csum[wb] / wb
    sq = [(x - db) * (x - db) for x in dev[:wb]]
    spread = math.sqrt(_seq_sum(sq) / wb) * (2.0 * spec.bb_k)
    feats.append(0.5 if spread == 0 else 0.5 - db / spread)
    feats.append(spread / (c + db))

    # Returns.
    for lag in spec.return_lags:
        past = cl[lag]
        feats.append((c - past) / past)

    # Volume relative to its mean.
    wv = spec.volume_window
    vol = volume[t - wv + 1: t + 1].tolist()[::-1]
    v = vol[0]
    dvol = _seq_sum([x - v for x in vol]) / wv
    mean_v = v + dvol
    feats.append(0.0 if mean_v == 0 else -dvol / mean_v)

    # Volatility of 1-bar returns.
    ww = spec.volatility_window
    rv = [diff[k] / cl[k + 1] for k in range(ww)]
    mean_r = _seq_sum(rv) / ww
    feats.append(math.sqrt(_seq_sum([(x - mean_r) * (x - mean_r) for x in rv]) / ww))

    # Normalised ATR.
    wa = spec.atr_window
    hi = high[t - wa + 1: t + 1].tolist()[::-1]
    lw = low[t - wa + 1: t + 1].tolist()[::-1]
    tr = [max(hi[k], cl[k + 1]) - min(lw[k], cl[k + 1]) for k in range(wa)]
    feats.append((_seq_sum(tr) / wa) / c)

    # Candle shape.
    o = float(opn[t])
    feats.append((c - o) / o)
    feats.append((float(high[t]) - float(low[t])) / c)

    # Context windows are long (hundreds of candles): numpy over the window, in the same order of operations as the
    # array path (a 1-D accumulate adds strictly in sequence, newest value first as there; max and min are exact).
    for w in spec.context_bars:
        past = float(close[t - w])
        feats.append((c - past) / past)
        hi_w = float(high[t - w + 1: t + 1].max())
        lo_w = float(low[t - w + 1: t + 1].min())
        span_w = hi_w - lo_w
        feats.append(span_w / c)
        feats.append(0.5 if span_w == 0 else (c - lo_w) / span_w)
        prev_w = close[t - w: t]
        rw = ((close[t - w + 1: t + 1] - prev_w) / prev_w)[::-1]  # rw[k]: the return of candle t - k
        r_dev = rw - float(_accumulate(rw)[-1]) / w
        feats.append(math.sqrt(float(_accumulate(r_dev * r_dev)[-1]) / w))

    if funding is not None:
        wf = spec.funding_window
        fw = funding[t - wf + 1: t + 1].tolist()[::-1]
        feats.append(fw[0])
        feats.append(_seq_sum(fw) / wf)
    if oi is not None:
        now = float(oi[t])
        for lag in spec.oi_lags:
            past = float(oi[t - lag])
            change = (now - past) / past
            feats.append(change if math.isfinite(change) else math.nan)
    return feats


def compute_features(frame: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """``feature_matrix`` for a DataFrame of candles (oldest first); same index, one column per feature."""
    columns = {
        name: frame[name].to_numpy(dtype=np.float64, na_value=np.nan)
        for name in spec.required_columns
        if name in frame.columns
    }
    return pd.DataFrame(feature_matrix(columns, spec), index=frame.index, columns=list(spec.feature_names))


# Funding-rate / open-interest features are used when the column has a value for at least this share of the
# window's candles. Below it the features are left out and the model trains on the whole window from OHLCV, so a
# short history of open interest neither shrinks the window silently nor fails the training.
MIN_COLUMN_COVERAGE = 0.9


def column_coverage(frame: pd.DataFrame, name: str) -> float:
    """Share of the frame's rows that have a value in column `name` (0 when the column is absent)."""
    if name not in frame.columns or len(frame) == 0:
        return 0.0
    return float(frame[name].notna().mean())


def spec_for_frame(frame: pd.DataFrame, base: FeatureSpec = FeatureSpec(),
                   min_coverage: float = MIN_COLUMN_COVERAGE) -> FeatureSpec:
    """``base`` with funding-rate / open-interest features turned on when the frame has values for at least
    ``min_coverage`` of its rows. A base that already asks for a column keeps asking, so a missing column is
    reported by ``feature_matrix`` instead of silently dropping features."""
    use = {name: column_coverage(frame, name) >= min_coverage for name in (FUNDING_COLUMN, OPEN_INTEREST_COLUMN)}
    return replace(
        base,
        use_funding_rate=base.use_funding_rate or use[FUNDING_COLUMN],
        use_open_interest=base.use_open_interest or use[OPEN_INTEREST_COLUMN],
    )
