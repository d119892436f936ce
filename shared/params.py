"""RandomForest parameters and their defaults.

The defaults are regularised (shallow trees, large leaves) because on hourly crypto data an unregularised forest
is over-confident and loses to the class prior out of sample; README "Probability quality" has the measurements.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_N_ESTIMATORS = 200
DEFAULT_MAX_DEPTH = 6
DEFAULT_MIN_SAMPLES_LEAF = 200
DEFAULT_RANDOM_STATE = 42
MAX_N_ESTIMATORS = 5000
MAX_DEPTH_LIMIT = 64
CLASS_WEIGHTS = ("none", "balanced")


@dataclass(frozen=True)
class ForestParams:
    n_estimators: int = DEFAULT_N_ESTIMATORS
    max_depth: int | None = DEFAULT_MAX_DEPTH  # None: unlimited
    min_samples_leaf: int = DEFAULT_MIN_SAMPLES_LEAF
    class_weight: str = "none"
    random_state: int = DEFAULT_RANDOM_STATE

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ForestParams:
        return cls(**d)

    def sklearn_kwargs(self) -> dict:
        return {
            "n_estimators": self.n_estimators,
            "max_depth": self.max_depth,
            "min_samples_leaf": self.min_samples_leaf,
            "class_weight": None if self.class_weight == "none" else self.class_weight,
            "random_state": self.random_state,
        }
