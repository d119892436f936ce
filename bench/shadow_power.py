"""How often the live shadow test promotes a shadow that is no better, and how soon it finds one that is better.

    .venv/bin/python -m bench.shadow_power [--cases 1000] [--sd 0.2] [--horizon 24] [--seed 7]

Simulated per-candle log-loss differences d (serving loss - shadow loss) with the dependence overlapping labels give:
an equal-weight moving average of `horizon` independent shocks (MA(horizon - 1)), so neighbouring candles share up to
horizon - 1 of their horizon future returns, scaled to a per-candle standard deviation `sd`. With `overlap` 1 every
overlap counts fully, the strongest dependence an h-candle label makes: the long-run standard deviation is
sd * sqrt(horizon), 0.98 nats for sd 0.2 and h 24, and that is the unit that decides how many candles a gain takes to
show. `overlap` 0.5 gives half the per-candle variance to independent noise; 0, all of it.

Each case is looked at the way inference looks: once min_scored pairs are in, after every flush, each flush bringing
1 to 50 new pairs (uniform), up to max_scored, where an undecided shadow is rejected. The first table gives, per effect
size, the fraction promoted (the false-promotion rate at effect 0, the power above it) and the median pairs to a
decision (a rejection at max_scored counts as max_scored). The second gives, at effect 0 and for three dependence
shapes, the false promotions of the test and of two designs it replaces, read at the same looks: the mixture boundary
with a Newey-West standard error (lag h - 1), and a fixed-sample one-sided z-test at 5 %.

The statistic is computed for every prefix at once (cumulative sums): the same numbers `shared.sequential_test.decide`
computes for one prefix (the unit test checks that they agree).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from shared.sequential_test import VARIANCE_FLOOR, boundary, mixture_boundary

HORIZON = 24
SD = 0.2  # per-candle standard deviation of the log-loss difference, nats
MIN_SCORED = 500
MAX_SCORED = 5000
ALPHA = 0.05
MAX_GAP = 50  # most new pairs between two looks
CHUNK = 250  # cases simulated at once (memory: a few (CHUNK, MAX_SCORED) float arrays)
EFFECTS_LR_SD = (0.0, 0.025, 0.05, 0.075, 0.1)  # mean gain per candle, in long-run standard deviations
OVERLAPS = (1.0, 0.5, 0.0)

SEQUENTIAL = "sequential test"
NEWEY_WEST = "mixture boundary, Newey-West only"
NAIVE = "fixed-sample z-test, every look"
DESIGNS = (SEQUENTIAL, NEWEY_WEST, NAIVE)


def long_run_sd(sd: float = SD, horizon: int = HORIZON, overlap: float = 1.0) -> float:
    """Long-run standard deviation of the simulated differences: an equal-weight MA(h - 1) of unit variance has
    long-run variance h; independent noise, 1."""
    return sd * float(np.sqrt(overlap * horizon + (1.0 - overlap)))


def overlapping_differences(rng: np.random.Generator, cases: int, n: int, mean: float, sd: float = SD,
                            horizon: int = HORIZON, overlap: float = 1.0) -> np.ndarray:
    """(cases, n) per-candle differences: mean + sd * (sqrt(overlap) * (e_t + ... + e_{t+h-1}) / sqrt(h) +
    sqrt(1 - overlap) * u_t), e and u independent N(0, 1)."""
    e = rng.standard_normal((cases, n + horizon - 1))
    c = np.concatenate([np.zeros((cases, 1)), np.cumsum(e, axis=1)], axis=1)
    x = np.sqrt(overlap / horizon) * (c[:, horizon:] - c[:, :-horizon])
    if overlap < 1.0:
        x += np.sqrt(1.0 - overlap) * rng.standard_normal((cases, n))
    return mean + sd * x


def prefix_statistics(d: np.ndarray, lag: int, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard error from long_run_variance and standard error from newey_west_variance of every prefix
    d[:, :n], n = start .. d.shape[1]: (cases, n - start + 1) each. With C the cumulative sum and m = C_n / n, the
    autocovariance at lag j is (sum_{t>j} d_t d_{t-j} - m (C_n - C_j + C_{n-j}) + (n - j) m^2) / n."""
    cases, total = d.shape
    if not lag < start <= total:
        raise ValueError(f"expected lag < start <= {total}, got lag {lag}, start {start}")
    n = np.arange(start, total + 1, dtype=np.float64)
    c = np.concatenate([np.zeros((cases, 1)), np.cumsum(d, axis=1)], axis=1)  # c[:, k] = sum of the first k
    cn = c[:, start:]
    m = cn / n
    nw = np.zeros_like(m)
    hh = np.zeros_like(m)
    for j in range(lag + 1):
        prod = d[:, j:] * d[:, :total - j]  # d_t d_{t-j}, t = j .. total - 1 (0-based)
        p = np.cumsum(prod, axis=1)[:, start - 1 - j:]  # sum over t < n, for n = start .. total
        cross = c[:, start - j:total - j + 1]  # C_{n-j}
        gamma = (p - m * (cn - c[:, j:j + 1] + cross) + (n - j) * m * m) / n
        if j == 0:
            nw += gamma
            hh += gamma
        else:
            nw += 2.0 * (1.0 - j / (lag + 1.0)) * gamma
            hh += 2.0 * gamma
    long_run = np.maximum(np.maximum(nw, hh), VARIANCE_FLOOR)
    return m, np.sqrt(long_run / n), np.sqrt(np.maximum(nw, VARIANCE_FLOOR) / n)


def look_schedule(rng: np.random.Generator, cases: int, min_scored: int = MIN_SCORED, max_scored: int = MAX_SCORED,
                  max_gap: int = MAX_GAP) -> np.ndarray:
    """(cases, max_scored - min_scored + 1) booleans, column k for n = min_scored + k: True where a look happens.
    Each flush adds 1 .. max_gap pairs; the first look is at the first flush with min_scored pairs in, and the last at
    max_scored (every later look sees the same first max_scored pairs)."""
    width = max_scored - min_scored + 1
    gaps = rng.integers(1, max_gap + 1, size=(cases, width))
    at = np.cumsum(gaps, axis=1) - 1  # column of each look; the first is in 0 .. max_gap - 1
    looks = np.zeros((cases, width), dtype=bool)
    rows = np.broadcast_to(np.arange(cases)[:, None], at.shape)
    keep = at < width
    looks[rows[keep], at[keep]] = True
    looks[:, -1] = True
    return looks


@dataclass(frozen=True)
class Outcome:
    """Per case: +1 promoted, -1 rejected; and the pairs seen at the decision."""

    decision: np.ndarray
    pairs: np.ndarray

    @property
    def promoted(self) -> float:
        return float(np.mean(self.decision == 1))

    @property
    def median_pairs(self) -> float:
        return float(np.median(self.pairs))

    @property
    def median_pairs_promoted(self) -> float:
        hit = self.decision == 1
        return float(np.median(self.pairs[hit])) if hit.any() else float("nan")


def first_decisions(z: np.ndarray, upper: np.ndarray, looks: np.ndarray, min_scored: int = MIN_SCORED) -> Outcome:
    """The first look where z >= upper (promote) or z <= -upper (reject); none by the last column: reject there."""
    up = looks & (z >= upper)
    down = looks & (z <= -upper)
    width = z.shape[1]
    first_up = np.where(up.any(axis=1), up.argmax(axis=1), width)
    first_down = np.where(down.any(axis=1), down.argmax(axis=1), width)
    promoted = first_up < first_down
    at = np.minimum(np.minimum(first_up, first_down), width - 1)
    return Outcome(np.where(promoted, 1, -1), at + min_scored)


def simulate(cases: int, mean: float, seed: int, sd: float = SD, horizon: int = HORIZON, overlap: float = 1.0,
             alpha: float = ALPHA, min_scored: int = MIN_SCORED, max_scored: int = MAX_SCORED) -> dict[str, Outcome]:
    """`cases` series with mean gain `mean` per candle, looked at after every flush; the outcome of each design in
    DESIGNS on the same series and looks."""
    rng = np.random.default_rng(seed)
    looks = look_schedule(rng, cases, min_scored, max_scored)
    lag = horizon - 1
    z_long_run, z_newey_west = [], []
    for i in range(0, cases, CHUNK):
        d = overlapping_differences(rng, min(CHUNK, cases - i), max_scored, mean, sd, horizon, overlap)
        m, se, se_nw = prefix_statistics(d, lag, min_scored)
        z_long_run.append(m / se)
        z_newey_west.append(m / se_nw)
    z, z_nw = np.concatenate(z_long_run), np.concatenate(z_newey_west)
    n = np.arange(min_scored, max_scored + 1)
    naive = np.full(len(n), NormalDist().inv_cdf(1.0 - alpha))
    return {
        SEQUENTIAL: first_decisions(z, boundary(n, lag, alpha, min_scored, max_scored), looks, min_scored),
        NEWEY_WEST: first_decisions(z_nw, mixture_boundary(n, alpha, min_scored, max_scored), looks, min_scored),
        NAIVE: first_decisions(z, naive, looks, min_scored),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--sd", type=float, default=SD, help="per-candle standard deviation of the difference (nats)")
    ap.add_argument("--horizon", type=int, default=HORIZON, help="label horizon, candles (lag = horizon - 1)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    lag = args.horizon - 1
    lr = long_run_sd(args.sd, args.horizon)
    n = np.arange(MIN_SCORED, MAX_SCORED + 1)
    b = boundary(n, lag)
    started = time.perf_counter()
    print(f"{args.cases:,} cases per row; d = MA({lag}) with every overlap counting, per-candle sd {args.sd}, "
          f"long-run sd {lr:.3f}; a look every 1-{MAX_GAP} pairs from {MIN_SCORED:,} to {MAX_SCORED:,}; "
          f"alpha {ALPHA}")
    print(f"boundary (lag {lag}): {b[0]:.2f} at {MIN_SCORED:,} pairs, {b[1081]:.2f} at 1,581, {b[-1]:.2f} at "
          f"{MAX_SCORED:,}; fixed-sample one-sided: {NormalDist().inv_cdf(1.0 - ALPHA):.3f}\n")
    print(f"{'gain/candle':>11}  {'long-run sd':>11}  {'promoted':>8}  {'median pairs':>12}  "
          f"{'median pairs, promoted':>22}")
    for i, effect in enumerate(EFFECTS_LR_SD):
        seq = simulate(args.cases, effect * lr, args.seed + i, args.sd, args.horizon)[SEQUENTIAL]
        print(f"{effect * lr:>11.4f}  {effect:>11.3f}  {seq.promoted:>8.3f}  {seq.median_pairs:>12,.0f}  "
              f"{seq.median_pairs_promoted:>22,.0f}")
    print(f"\nfalse promotions at gain 0 (same series and looks per row)\n{'overlap':>7}  "
          + "  ".join(f"{name:>{len(name)}}" for name in DESIGNS))
    for j, overlap in enumerate(OVERLAPS):
        out = simulate(args.cases, 0.0, args.seed + 100 + j, args.sd, args.horizon, overlap)
        print(f"{overlap:>7.1f}  " + "  ".join(f"{out[name].promoted:>{len(name)}.3f}" for name in DESIGNS))
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
