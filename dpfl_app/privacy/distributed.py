"""Distributed DP's parameters: the grid, the modulus and the clients' Skellam shares.

What is released. Each round every surviving client i sends, under secure
aggregation modulo 2**b, the integer vector q_i + N_i, where q_i is its
clipped, rotated, scaled (by gamma) and conditionally rounded update, with
||q_i||_2 <= B always (`rounded_l2_bound`), and N_i ~ Skellam of variance v
per coordinate; plus one count coordinate c_i = 2 b_i - 1 (the centred norm
bit of adaptive clipping, times 2) with its own Skellam share of variance v_c.
The server learns only the modular sum: sum_i q_i + Skellam(n v) and
sum_i c_i + Skellam(n v_c), n = the survivors. Reduction modulo 2**b, the
centred lift, unscaling and the inverse rotation are post-processing of that
integer sum, so a wrap-around costs accuracy, never privacy;
`log_wrap_probability` bounds how often it happens, and `choose_scale` picks the
largest gamma that keeps it below a stated target (1e-9 per round by default).

`distributed_accounting` turns these parameters and each round's survivors into epsilon.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from dpfl_app.privacy import skellam

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


class ModulusTooSmall(ValueError):
    """No scale keeps the sum of the clients' noise inside 2**bits (`choose_scale`)."""


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
        raise ModulusTooSmall(f"distributed DP: {params.bits} bits cannot hold the sum of "
                         f"{contributors} clients' noise without wrap-around; raise bits")
    for _ in range(200):  # bisection in log space
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        if hi / lo < 1 + 1e-9:
            break
    return with_noise(replace(params, scale=lo), noise_multiplier, count_noise_std)


def announcement(params: DistributedDpParams) -> dict:
    """The mechanism's parameters, as the clients receive them (besides dp-noise etc.)."""
    return {"dp-noise-at": "clients", "dp-scaled-clip": params.scale * params.clip,
            "dp-dim": params.dim, "dp-bits": params.bits,
            "dp-share-variance": params.share_variance,
            "dp-count-share-variance": params.count_share_variance,
            "dp-noise-threshold": params.threshold}


def announced_params(config: dict) -> DistributedDpParams:
    """The parameters back from an announcement (`announcement`); ValueError if malformed."""
    try:
        return DistributedDpParams(
            clip=1.0, dim=int(config["dp-dim"]), scale=float(config["dp-scaled-clip"]),
            bits=int(config["dp-bits"]), share_variance=float(config["dp-share-variance"]),
            count_share_variance=float(config["dp-count-share-variance"]),
            threshold=int(config["dp-noise-threshold"]))
    except KeyError as missing:
        raise ValueError(f"the server did not announce {missing.args[0]}") from None
