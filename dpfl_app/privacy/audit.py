"""One-run empirical privacy estimate with canary clients (no Flower imports).

Andrew, Kairouz, Oh, Oprea, McMahan & Suriyakumar, "One-shot Empirical Privacy
Estimation for Federated Learning", ICLR 2024 (arXiv 2302.03098):

* k canary clients each own a fixed random direction u_j, uniform on the unit
  sphere of the model's update space. A sampled canary contributes C_t * u_j
  (norm exactly C_t, on the clip boundary) to the clipped sum before the noise,
  and a norm bit to the count (`canary_bits`).
  k more directions are drawn and never inserted: the unseen canaries.
* Threat model "all iterates" (every released per-round model delta is seen,
  as it is here: every client receives w_t): the statistic of a canary is the
  maximum over rounds t of cos(w_{t+1} - w_t, u_j). This is the paper's FL
  method (Section 4, Algorithm 2) in its all-iterates variant, and what the
  authors' released code computes (github.com/google-research/federated,
  one_shot_epe/fed_avg_with_canaries.py keeps `max_canary_model_delta_cosines`
  and `max_unseen_canary_model_delta_cosines`).
* Fit one Gaussian to the statistics of the inserted canaries and one to the
  unseen ones (sample mean and standard deviation), and report the epsilon, at
  the run's delta, of the test between N(mu_0, s_0^2) and N(mu_1, s_1^2)
  (the paper's Section 3 for the Gaussian mechanism, reused in Section 4). The
  privacy profile of two Gaussians with different variances is computed
  exactly; see `delta_for_epsilon`.

The result is an *estimate* of how much a strong attacker learns about one
client from this very run: a lower estimate, never a guarantee. A correct
mechanism keeps it below the accounted epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, special

from dpfl_app.privacy.sampling import draw

STATISTIC = "max over rounds of cos(released model delta w_{t+1} - w_t, canary direction)"
COUNT_STATISTIC = ("sum over rounds of (2 b_jt - 1) * released centred clipped count, "
                   "b_jt the canary's coin for round t")
# Canaries generated together: one generator call per block keeps regeneration cheap.
BLOCK = 256
# Bootstrap resamples for the estimate's 95% interval (its sampling error).
BOOTSTRAP_SAMPLES = 200
# "k not small compared with the population": more canaries than this fraction of N.
SMALL_FRACTION = 0.1
_NEG_LOG = -1e4  # stands for log(0) inside the root finder


class CanaryDirections:
    """`count` unit vectors in R^dim, regenerated on demand from `seed`.

    Row j is block j // BLOCK of `default_rng([seed, block])`, normalised: the
    same seed always gives the same directions, so results.json can name them
    by their seed instead of storing them.
    """

    def __init__(self, seed: int, count: int, dim: int) -> None:
        if count < 1 or dim < 2:
            raise ValueError(f"need count >= 1 and dim >= 2, got {count}, {dim}")
        self.seed, self.count, self.dim = int(seed), int(count), int(dim)
        self._cache: dict[int, np.ndarray] = {}
        # Keep every block in memory when that is small (under 256 MB).
        self._keep = count * dim * 8 <= 256 * 2**20

    def block(self, index: int) -> np.ndarray:
        if index in self._cache:
            return self._cache[index]
        rows = min(BLOCK, self.count - index * BLOCK)
        gauss = np.random.default_rng([self.seed, index]).standard_normal((rows, self.dim))
        unit = gauss / np.linalg.norm(gauss, axis=1, keepdims=True)
        if self._keep:
            self._cache[index] = unit
        return unit

    def rows(self, indices: Sequence[int]) -> np.ndarray:
        """The directions with these indices, shape (len(indices), dim)."""
        out = np.empty((len(indices), self.dim))
        for pos, j in enumerate(indices):
            out[pos] = self.block(j // BLOCK)[j % BLOCK]
        return out

    def cosines(self, vector: np.ndarray) -> np.ndarray:
        """cos(vector, u_j) for every j; zeros for a zero vector."""
        norm = float(np.linalg.norm(vector))
        if norm == 0:
            return np.zeros(self.count)
        blocks = range(math.ceil(self.count / BLOCK))
        return np.concatenate([self.block(b) @ vector for b in blocks]) / norm


def sample_canaries(rng: np.random.Generator, count: int, rate: float, sampling: str) -> np.ndarray:
    """Indices of the canaries that join this round, each with probability `rate`.

    poisson: an independent coin per canary, as for every real client.
    fixed: a fixed-size draw without replacement over the canary slots, of
    floor(count * rate) or one more (randomly rounded), so that each canary's
    chance is exactly `rate`, as a real client's is m/N in its own draw. The
    same function (`privacy.sampling.draw`) draws the real clients' slots.
    """
    return draw(rng, count, count * rate, sampling)  # the real clients' draw


def canary_bits(seed: int, round_index: int, count: int) -> np.ndarray:
    """Every canary's norm bit in one round: a fair coin per canary and round, from `seed`.

    A canary's update has norm exactly C_t, on the clip boundary, so either bit
    is honest. Fresh coins keep the centred count sum(b - 1/2) of the sampled
    canaries at 0 on average, so C_t still tracks the real clients' quantile
    (all b = 1 would drive it towards 0). They also give each canary its own
    sign sequence over rounds, which the count statistic reads
    (`COUNT_STATISTIC`): the released count is one number per round, shared
    by everyone, and only a per-round sign tells one canary's part from another's.
    """
    return np.random.default_rng([seed, 2, round_index]).integers(0, 2, size=count)


# --- the two-Gaussian test -------------------------------------------------------
def _log_mass(lo: float, hi: float, mu: float, std: float) -> float:
    """log P(lo < X < hi) for X ~ N(mu, std^2), accurate far in the tails."""
    a, b = (lo - mu) / std, (hi - mu) / std
    if a > 0:  # both in the upper tail: work with survival functions
        top, bottom = special.log_ndtr(-a), special.log_ndtr(-b)
    else:
        top, bottom = special.log_ndtr(b), special.log_ndtr(a)
    if bottom >= top:
        return -math.inf
    return float(top + math.log1p(-math.exp(bottom - top)))


def _log_hockey_stick(mu_p, std_p, mu_q, std_q, epsilon: float) -> float:
    """log of sup_S P(S) - e^eps Q(S) for P = N(mu_p, std_p^2), Q = N(mu_q, std_q^2).

    The supremum is attained on S = {x : log p(x) - log q(x) > eps}, and the
    log-ratio is the quadratic a x^2 + b x + c, so S is a half-line, an interval
    or the complement of one.
    """
    a = 0.5 / std_q**2 - 0.5 / std_p**2
    b = mu_p / std_p**2 - mu_q / std_q**2
    c = math.log(std_q / std_p) + 0.5 * (mu_q / std_q) ** 2 - 0.5 * (mu_p / std_p) ** 2 - epsilon
    inf = math.inf
    if abs(a) * max(std_p, std_q) ** 2 < 1e-12:  # equal variances: linear
        if b == 0:
            pieces = [(-inf, inf)] if c > 0 else []
        else:
            pieces = [(-c / b, inf)] if b > 0 else [(-inf, -c / b)]
    else:
        disc = b * b - 4 * a * c
        if disc <= 0:
            pieces = [(-inf, inf)] if a > 0 else []
        else:
            r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
            pieces = [(-inf, r1), (r2, inf)] if a > 0 else [(r1, r2)]
    if not pieces:
        return -inf
    log_p = np.logaddexp.reduce([_log_mass(lo, hi, mu_p, std_p) for lo, hi in pieces])
    log_q = np.logaddexp.reduce([_log_mass(lo, hi, mu_q, std_q) for lo, hi in pieces])
    if log_p == -inf:
        return -inf
    gap = epsilon + log_q - log_p
    # log(1 - e^gap) as log(-expm1(gap)): for gap within 1e-16 of 0, exp(gap) rounds to 1
    # and log1p(-1) raises (seen in an audit of a noise-at=clients run).
    return -inf if gap >= 0 else float(log_p + math.log(-math.expm1(gap)))


def delta_for_epsilon(mu0: float, std0: float, mu1: float, std1: float, epsilon: float) -> float:
    """Smallest delta for which N(mu0, std0^2) and N(mu1, std1^2) are (eps, delta)-close.

    The larger of the two hockey-stick divergences, as DP requires both
    directions (Steinke 2022, "Composition of Differential Privacy & Privacy
    Amplification by Subsampling", arXiv 2210.00597, Sec. on the privacy profile).
    """
    return math.exp(max(_log_hockey_stick(mu0, std0, mu1, std1, epsilon),
                        _log_hockey_stick(mu1, std1, mu0, std0, epsilon)))


def epsilon_two_gaussians(mu0: float, std0: float, mu1: float, std1: float,
                          delta: float) -> float:
    """The epsilon at `delta` of distinguishing N(mu0, std0^2) from N(mu1, std1^2)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if min(std0, std1) <= 0:
        return 0.0 if (mu0 == mu1 and std0 == std1) else math.inf
    log_delta = math.log(delta)

    def excess(eps: float) -> float:
        both = max(_log_hockey_stick(mu0, std0, mu1, std1, eps),
                   _log_hockey_stick(mu1, std1, mu0, std0, eps))
        return max(both, _NEG_LOG) - log_delta

    if excess(0.0) <= 0:
        return 0.0
    low, high = 0.0, 1.0
    while excess(high) > 0:
        low, high = high, high * 2
        if high > 1e5:
            return math.inf
    return float(optimize.brentq(excess, low, high, xtol=1e-6))


# --- the estimate ----------------------------------------------------------------
def fit_gaussian(samples: Sequence[float]) -> tuple[float, float]:
    """Sample mean and standard deviation (n - 1), as the paper fits them."""
    values = np.asarray(samples, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1))


def empirical_epsilon(inserted: Sequence[float], unseen: Sequence[float], delta: float) -> float:
    """Epsilon at `delta` of the Gaussians fitted to inserted and unseen statistics."""
    mu1, std1 = fit_gaussian(inserted)
    mu0, std0 = fit_gaussian(unseen)
    return epsilon_two_gaussians(mu0, std0, mu1, std1, delta)


def bootstrap_interval(inserted: Sequence[float], unseen: Sequence[float], delta: float,
                       samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `empirical_epsilon` (its sampling error).

    Both sets are resampled with replacement; the fixed seed makes the interval
    a deterministic function of the statistics (it is post-processing).
    """
    rng = np.random.default_rng(seed)
    ins, uns = np.asarray(inserted), np.asarray(unseen)
    values = [empirical_epsilon(rng.choice(ins, ins.size), rng.choice(uns, uns.size), delta)
              for _ in range(samples)]
    low, high = np.percentile(values, [2.5, 97.5], method="nearest")  # no inf - inf
    return float(low), float(high)


def verdict(empirical: float, interval: tuple[float, float], accounted: float) -> str:
    """'below' (as it must be), 'above-within-error', or 'above' (something is wrong)."""
    if empirical <= accounted:
        return "below"
    return "above-within-error" if interval[0] <= accounted else "above"


def population_warning(canaries: int, population: int, rate: float) -> str | None:
    """A warning when k is not small compared with the population N, else None."""
    if canaries <= SMALL_FRACTION * population:
        return None
    return (f"audit-canaries={canaries} is not small compared with the population N="
            f"{population}: about {canaries * rate:.3g} canaries join each round, against "
            f"{population * rate:.3g} real clients. They add that many random unit "
            f"directions times C_t to the sum and move the model with them; use such a run "
            f"to check the mechanism, not as the model you keep.")


def estimate(inserted: Sequence[float], unseen: Sequence[float], delta: float,
             accounted: float, statistic: str = STATISTIC) -> dict:
    """The audit block: both fits, the empirical epsilon, its interval and the verdict."""
    mu1, std1 = fit_gaussian(inserted)
    mu0, std0 = fit_gaussian(unseen)
    eps = epsilon_two_gaussians(mu0, std0, mu1, std1, delta)
    interval = bootstrap_interval(inserted, unseen, delta)
    return {
        "threat_model": "all iterates (every per-round model is released)",
        "statistic": statistic,
        "inserted_fit": {"mean": mu1, "std": std1, "count": len(inserted)},
        "unseen_fit": {"mean": mu0, "std": std0, "count": len(unseen)},
        "delta": delta,
        "epsilon": eps,
        "epsilon_ci95": list(interval),
        "accounted_epsilon": accounted,
        "verdict": verdict(eps, interval, accounted),
    }
