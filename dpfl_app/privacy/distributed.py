"""Accounting for distributed DP: Skellam noise added by the clients under secure aggregation.

What is released. Each round every surviving client i sends, under secure
aggregation modulo 2**b, the integer vector q_i + N_i, where q_i is its
clipped, rotated, scaled (by gamma) and conditionally rounded update, with
||q_i||_2 <= B always (see `rounded_l2_bound`), and N_i ~ Skellam of variance
v per coordinate; plus one count coordinate c_i = 2 b_i - 1 (the centred norm
bit of adaptive clipping, times 2) with its own Skellam share of variance v_c.
The server learns only the modular sum: sum_i q_i + Skellam(n v) and
sum_i c_i + Skellam(n v_c), n = the survivors. Reduction modulo 2**b, the
centred lift, unscaling and the inverse rotation are post-processing of that
integer sum, so a wrap-around costs accuracy, never privacy;
`log_wrap_probability` bounds how often it happens.

Adjacency: zero-out. Neighbouring federations differ in one client's data: its
update and count are replaced by zero, and the client still takes part and
adds its noise share. This is the honest unit here: the server sees *who*
sends a masked input, so under distributed DP participation is not hidden
from it, only what a client contributed. (Add-or-remove would also change the
number of noise shares, and a d-dimensional sum reveals its noise variance,
hence that number, very precisely.) Sensitivities on the integer grid:
update D2 = B, D1 = min(sqrt(d') B, B^2) (integers: |x| <= x^2); count 1.

Per round, with n shares: RDP(alpha) = Skellam(D1, D2, n v) + Skellam(1, 1, n v_c)
(`skellam.rdp`, composed over the two releases), at integer orders.

Sampling. Under zero-out the set of sampled clients has the same distribution
in both worlds (Poisson rate q, or m of N without replacement: q = m/N), and
given that set the outputs differ only when the client is in it. Joint
convexity of (P, Q) -> sum P^alpha Q^(1-alpha) then gives, per round,

    eps_q(alpha) <= log(1 - q + q exp((alpha - 1) eps(alpha))) / (alpha - 1).

This bound is weaker than the Gaussian add-or-remove amplification (it is
linear in q, not quadratic), but it is proved for what runs; the reference
implementations' stronger figure treats the absent client's share as present.
It holds only when the server samples as announced, which clients cannot check.

Three figures (`DistributedAccountant.epsilons`), all composed by RDP and
converted with dp_accounting's `compute_epsilon`:
- `with_sampling`: every round's survivors' actual noise, amplified by q;
- `without_sampling`: the same noise, every round counted as including the client;
- `client_bound`: what a client computes alone, trusting neither the server's
  sampling nor its survivor counts: noise of t shares (the threshold it
  enforces), every announced round (`client_epsilon`). It assumes at least t
  of the survivors in a sum are honest; c colluders with the server remove
  their c shares, so it then holds with t - c.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from dpfl_app.privacy import skellam

ORDERS = tuple(range(2, 257)) + (320, 384, 448, 512, 768, 1024)  # integers: the Skellam theorem's
MAX_BITS = 62  # residues and centred values fit int64/uint64 with room for a sum's carry
DEFAULT_BETA = math.exp(-0.5)  # conditional rounding: at most 1/(1 - beta) ~ 2.5 tries expected


def rounded_l2_bound(scaled_clip: float, dim: int, beta: float = DEFAULT_BETA) -> float:
    """B: the L2 bound a conditionally rounded vector of norm <= `scaled_clip` is kept under.

    Kairouz, Liu & Steinke 2021 (Sec. 4.1): stochastic rounding of y in R^d
    gives ||round(y)||^2 <= ||y||^2 + d/4 + sqrt(2 ln(1/beta)) (||y|| + sqrt(d)/2)
    with probability >= 1 - beta; any rounding within 1 per coordinate gives
    ||y|| + sqrt(d). The client re-rounds until the bound holds (and falls back
    to rounding towards zero), so B holds *always*; the theorem only bounds
    how many tries that takes. beta = 0: the deterministic bound.
    """
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    deterministic = scaled_clip + math.sqrt(dim)
    if beta == 0:
        return deterministic
    squared = (scaled_clip**2 + dim / 4
               + math.sqrt(2 * math.log(1 / beta)) * (scaled_clip + math.sqrt(dim) / 2))
    return min(deterministic, math.sqrt(squared))


@dataclass(frozen=True)
class DistributedDpParams:
    """One round's parameters, as clients and server must agree on them (results.json's block).

    clip: C, the L2 clip of the float update; dim: its length d (padded to a
    power of 2 for the rotation); scale: gamma, float -> integer grid; bits: b,
    the modulus 2**b; beta: conditional rounding; share_variance v and
    count_share_variance v_c: one client's Skellam variances (integer units);
    threshold: t, the fewest survivors the protocol lets a sum be released for.
    """

    clip: float
    dim: int
    scale: float
    bits: int
    share_variance: float
    count_share_variance: float
    threshold: int
    beta: float = DEFAULT_BETA

    def __post_init__(self):
        checks = [("clip", self.clip > 0), ("dim", self.dim >= 1), ("scale", self.scale > 0),
                  ("bits", 2 <= self.bits <= MAX_BITS), ("threshold", self.threshold >= 1),
                  ("share_variance", self.share_variance >= 0),
                  ("count_share_variance", self.count_share_variance >= 0),
                  ("beta", 0 <= self.beta < 1)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"distributed DP: {name}={getattr(self, name)!r} is out of range")

    @property
    def padded_dim(self) -> int:
        """d': the rotation's dimension, the next power of 2 >= d."""
        return 1 << max(0, (int(self.dim) - 1).bit_length())

    @property
    def l2_sensitivity(self) -> float:
        """B on the integer grid (zero-out: a client's whole rounded vector)."""
        return rounded_l2_bound(self.scale * self.clip, self.padded_dim, self.beta)

    @property
    def l1_sensitivity(self) -> float:
        b = self.l2_sensitivity
        return min(math.sqrt(self.padded_dim) * b, b * b)

    @property
    def bytes_per_client(self) -> int:
        """The masked vector on the wire: d' + 1 coordinates of b bits, packed."""
        return math.ceil((self.padded_dim + 1) * self.bits / 8)

    def noise_multiplier(self, shares: int) -> float:
        """Central-equivalent z of n shares: sqrt(n v) / B (the Gaussian part of the bound)."""
        return math.sqrt(shares * self.share_variance) / self.l2_sensitivity

    def to_dict(self) -> dict:
        return {**asdict(self), "padded_dim": self.padded_dim, "mechanism": "skellam",
                "l2_sensitivity": self.l2_sensitivity, "l1_sensitivity": self.l1_sensitivity,
                "bytes_per_client": self.bytes_per_client,
                "noise_multiplier_at_threshold": self.noise_multiplier(self.threshold)}


def round_rdp(params: DistributedDpParams, shares: int) -> np.ndarray:
    """RDP at ORDERS of one round whose sum holds `shares` clients' noise (update + count)."""
    if shares < 1:
        raise ValueError(f"a released sum holds at least one share, got {shares}")
    l1, l2 = params.l1_sensitivity, params.l2_sensitivity
    return np.array([skellam.rdp(a, l1, l2, shares * params.share_variance)
                     + skellam.rdp(a, 1, 1, shares * params.count_share_variance)
                     for a in ORDERS])


def sampled_rdp(rdp: np.ndarray, sampling_probability: float) -> np.ndarray:
    """The zero-out mixture bound log(1 - q + q e^{(a-1) eps}) / (a - 1), per order (see above)."""
    q = float(sampling_probability)
    if not 0 < q <= 1:
        raise ValueError(f"sampling probability must be in (0, 1], got {q!r}")
    a = np.array(ORDERS, dtype=float)
    with np.errstate(divide="ignore"):
        mixed = np.logaddexp(np.log1p(-q) if q < 1 else -np.inf, math.log(q) + (a - 1) * rdp)
    return np.minimum(mixed / (a - 1), rdp)


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    """dp_accounting's RDP -> (epsilon, delta) conversion over ORDERS."""
    if not np.all(np.isfinite(rdp)):
        rdp = np.where(np.isfinite(rdp), rdp, np.inf)
    return float(compute_epsilon(ORDERS, rdp, delta)[0])


def client_epsilon(params: DistributedDpParams, rounds: int, delta: float) -> float:
    """A client's own bound: t shares (its threshold), `rounds` rounds, no amplification."""
    return epsilon_from_rdp(rounds * round_rdp(params, params.threshold), delta)


class DistributedAccountant:
    """Composes rounds with the noise the survivors actually contributed (see module doc)."""

    def __init__(self, params: DistributedDpParams, delta: float, sampling_probability: float):
        self.params, self.delta, self.q = params, float(delta), float(sampling_probability)
        self._sampled = np.zeros(len(ORDERS))
        self._unsampled = np.zeros(len(ORDERS))
        self.survivors: list[int] = []

    def compose_round(self, survivors: int) -> None:
        """One released sum holding `survivors` >= t clients' shares."""
        if survivors < self.params.threshold:
            raise ValueError(f"a sum of {survivors} survivors is below the threshold "
                             f"{self.params.threshold}: the protocol must not release it")
        rdp = round_rdp(self.params, survivors)
        self._unsampled = self._unsampled + rdp
        self._sampled = self._sampled + sampled_rdp(rdp, self.q)
        self.survivors.append(int(survivors))

    def epsilons(self) -> dict:
        rounds = len(self.survivors)
        return {"with_sampling": epsilon_from_rdp(self._sampled, self.delta),
                "without_sampling": epsilon_from_rdp(self._unsampled, self.delta),
                "client_bound": client_epsilon(self.params, rounds, self.delta) if rounds else 0.0,
                "rounds": rounds, "delta": self.delta}

    def to_dict(self) -> dict:
        """The accounting block's `distributed_dp` entry."""
        return {"noise_at": "clients", "params": self.params.to_dict(),
                "sampling_probability": self.q, "survivors": list(self.survivors),
                "adjacency": "zero-out", **self.epsilons()}


def with_noise(params: DistributedDpParams, noise_multiplier: float,
               count_noise_std: float) -> DistributedDpParams:
    """Shares for a central-equivalent z at the threshold: t v = (z B)^2, and a count noise
    of standard deviation sigma_b on sum(b_i - 1/2) at the threshold: t v_c = (2 sigma_b)^2."""
    t = params.threshold
    return replace(params, share_variance=(noise_multiplier * params.l2_sensitivity) ** 2 / t,
                   count_share_variance=(2 * count_noise_std) ** 2 / t)


def log_wrap_probability(params: DistributedDpParams, contributors: int) -> float:
    """log of a bound on P(some coordinate of a round's sum leaves [-2^(b-1), 2^(b-1))).

    Per update coordinate j, the sum is S_j + R_j + N_j: S_j, the rotated scaled
    sum of the inputs, is sub-Gaussian with variance proxy (gamma n C)^2 / d'
    (Hoeffding over the rotation's random signs, which must be drawn
    independently of the inputs); |R_j| < n (each rounding moves a coordinate
    by less than 1); N_j ~ Skellam(n v). The count coordinate: |sum c_i| <= n
    plus Skellam(n v_c). A union bound over the d' + 1 coordinates. Worst case
    at the most contributors a round can have (noise and signal grow with n).
    """
    n, p = int(contributors), params
    half = 2.0 ** (p.bits - 1)
    signal = (p.scale * n * p.clip) ** 2 / p.padded_dim
    update = skellam.log_tail(half - n, n * p.share_variance, signal)
    count = skellam.log_tail(half - n, n * p.count_share_variance)
    return min(0.0, float(np.logaddexp(math.log(p.padded_dim) + update, count)))


def choose_scale(params: DistributedDpParams, noise_multiplier: float, count_noise_std: float,
                 contributors: int, log_wrap_target: float = math.log(1e-9)) -> DistributedDpParams:
    """The largest scale gamma whose wrap-around bound stays below the target, with shares
    recalibrated (`with_noise`) at every gamma tried, and shares the sampler can draw
    (`skellam.MAX_POISSON_MEAN`). Raises when even gamma -> 0 wraps."""

    def fits(scale: float) -> bool:
        trial = with_noise(replace(params, scale=scale), noise_multiplier, count_noise_std)
        samplable = max(trial.share_variance, trial.count_share_variance) <= 2 * skellam.MAX_POISSON_MEAN
        return samplable and log_wrap_probability(trial, contributors) <= log_wrap_target

    lo, hi = 1e-12 / params.clip, 2.0 ** params.bits / params.clip
    if not fits(lo):
        raise ValueError(f"distributed DP: {params.bits} bits cannot hold the sum of "
                         f"{contributors} clients' noise without wrap-around; raise bits")
    for _ in range(200):  # bisection in log space
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        if hi / lo < 1 + 1e-9:
            break
    return with_noise(replace(params, scale=lo), noise_multiplier, count_noise_std)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, rounds: int,
                               params: DistributedDpParams, count_noise_std: float,
                               sampling_probability: float | None = None) -> float:
    """The smallest central-equivalent z at the threshold meeting the target over `rounds`.

    With `sampling_probability` None, the client's own bound (no amplification);
    otherwise the amplified figure with only t survivors every round (the
    worst case the protocol allows). Bisection on log z, to 1e-4 relative, returning
    the upper end so the target holds.
    """

    def epsilon(z: float) -> float:
        rdp = round_rdp(with_noise(params, z, count_noise_std), params.threshold)
        if sampling_probability is not None:
            rdp = sampled_rdp(rdp, sampling_probability)
        return epsilon_from_rdp(rounds * rdp, delta)

    lo, hi = 1e-3, 1e4
    if epsilon(hi) > target_epsilon:
        raise ValueError(f"distributed DP: no noise multiplier up to {hi} reaches "
                         f"epsilon={target_epsilon} (the count noise alone may exceed it)")
    while hi / lo > 1 + 1e-4:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if epsilon(mid) <= target_epsilon else (mid, hi)
    return hi


def client_refusal(params: DistributedDpParams, rounds: int, delta: float,
                   max_epsilon: float) -> str | None:
    """Why a client with node-config `max-epsilon` refuses the announced mechanism, or None.

    Pure: from the announced parameters alone (its own share v, the threshold t it
    enforces, the announced rounds T and delta), the client's own bound
    `client_epsilon`, which trusts neither the server's sampling nor its counts.
    max_epsilon <= 0 means no limit. Refuses inf and nan (no noise) too.
    """
    if max_epsilon <= 0:
        return None
    epsilon = client_epsilon(params, rounds, delta)
    if epsilon <= max_epsilon:
        return None
    shown = "inf (no noise)" if math.isinf(epsilon) else f"{epsilon:.3f}"
    return (f"privacy policy: the announced client noise (Skellam share variance "
            f"{params.share_variance:.4g} at scale {params.scale:.4g}, threshold t={params.threshold}, "
            f"T={rounds} rounds, delta={delta}) gives this client epsilon={shown} without "
            f"amplification > node-config max-epsilon={max_epsilon}")
