"""What "beats the prior" means in the tests.

A model's served probabilities are shrunk toward the class prior with a weight w fitted on purged out-of-sample
rows. At w = 0 the model serves the prior itself: its log loss equals the prior's (a ratio of exactly 1), so any
check of the form "served <= bound x prior" with a bound of 1 or more passes for a model that adds nothing. A model
only beats the prior when its weight is above 0 and its served log loss is below the bound.
"""

from __future__ import annotations


def require_beats_prior(served: float, prior: float, weight: float, bound: float = 1.0, what: str = "model") -> None:
    """AssertionError unless `weight` > 0 and `served` < `bound` x `prior` (log losses; `bound` 1 means strictly
    better than the prior)."""
    assert weight > 0, (f"{what}: shrink weight {weight}: the model serves the class prior itself "
                        f"(log loss {served:.4f} against {prior:.4f}) and beats nothing")
    assert served < bound * prior, (f"{what}: served log loss {served:.4f} is {served / prior:.4f}x the prior's "
                                    f"{prior:.4f}, not below {bound}x")
