"""RandomForest parameters and their defaults.

The defaults are regularised because on crypto candles an unregularised forest is over-confident and loses to the
class prior out of sample: shallow trees (depth 6), and each tree grown on a bootstrap sized by the average uniqueness
of the labels (about 1 / horizon_bars of the rows, since neighbouring labels share all but one candle of their
horizon), which keeps trees from learning the same overlapping move many times; leaves of 25 rows suit those smaller
samples. README "Probability quality" has the measurements (bench/param_sweep.py) they were chosen from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_N_ESTIMATORS = 200
DEFAULT_MAX_DEPTH = 6
DEFAULT_MIN_SAMPLES_LEAF = 25
DEFAULT_RANDOM_STATE = 42
MAX_N_ESTIMATORS = 5000
MAX_DEPTH_LIMIT = 64
CLASS_WEIGHTS = ("none", "balanced")
MAX_FEATURES_NAMES = ("sqrt", "log2")
UNIQUENESS = "uniqueness"  # max_samples: the average uniqueness of the fitting rows' labels
DEFAULT_MAX_FEATURES = "sqrt"
DEFAULT_MAX_SAMPLES = UNIQUENESS


@dataclass(frozen=True)
class ForestParams:
    n_estimators: int = DEFAULT_N_ESTIMATORS
    max_depth: int | None = DEFAULT_MAX_DEPTH  # None: unlimited
    min_samples_leaf: int = DEFAULT_MIN_SAMPLES_LEAF
    class_weight: str = "none"
    random_state: int = DEFAULT_RANDOM_STATE
    max_features: str | float = DEFAULT_MAX_FEATURES  # features tried per split: "sqrt", "log2" or a fraction
    max_samples: str | float | None = DEFAULT_MAX_SAMPLES  # rows per tree: "uniqueness", a fraction, None (all)

    def __post_init__(self) -> None:
        if not 1 <= self.n_estimators <= MAX_N_ESTIMATORS:
            raise ValueError(f"n_estimators must be between 1 and {MAX_N_ESTIMATORS}, got {self.n_estimators}")
        if self.max_depth is not None and not 1 <= self.max_depth <= MAX_DEPTH_LIMIT:
            raise ValueError(f"max_depth must be between 1 and {MAX_DEPTH_LIMIT} (or unlimited), got {self.max_depth}")
        if not 1 <= self.min_samples_leaf <= 1_000_000:
            raise ValueError(f"min_samples_leaf must be between 1 and 1000000, got {self.min_samples_leaf}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"class_weight must be one of {CLASS_WEIGHTS}, got {self.class_weight!r}")
        if not 0 <= self.random_state < 2**32:
            raise ValueError(f"random_state must be between 0 and 2**32-1, got {self.random_state}")
        mf = self.max_features
        if not (mf in MAX_FEATURES_NAMES or (isinstance(mf, float) and 0.0 < mf <= 1.0)):
            raise ValueError(f"max_features must be one of {MAX_FEATURES_NAMES} or a fraction in (0, 1], got {mf!r}")
        ms = self.max_samples
        if not (ms is None or ms == UNIQUENESS or (isinstance(ms, float) and 0.0 < ms <= 1.0)):
            raise ValueError(f"max_samples must be None, {UNIQUENESS!r} or a fraction in (0, 1], got {ms!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ForestParams:
        """Parameters as stored. A record written before `max_samples` existed grew every tree on a full bootstrap,
        so a missing key reads as None, not as today's default."""
        return cls(**{"max_samples": None, **d})

    def sklearn_kwargs(self, uniqueness: float | None = None) -> dict:
        """RandomForestClassifier keyword arguments; `uniqueness` (the average uniqueness of the fitting rows'
        labels) resolves max_samples="uniqueness"."""
        max_samples = self.max_samples
        if max_samples == UNIQUENESS:
            if uniqueness is None:
                raise ValueError('max_samples="uniqueness" needs the average uniqueness of the fitting rows')
            max_samples = min(1.0, max(float(uniqueness), 1e-6))
        return {
            "n_estimators": self.n_estimators,
            "max_depth": self.max_depth,
            "min_samples_leaf": self.min_samples_leaf,
            "class_weight": None if self.class_weight == "none" else self.class_weight,
            "random_state": self.random_state,
            "max_features": self.max_features,
            "max_samples": max_samples,
        }
