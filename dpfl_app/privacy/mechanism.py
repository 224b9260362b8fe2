"""DP-FedAvg with adaptive clipping: the per-round mechanism, in plain numpy.

Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"
(arXiv 1905.03871), Algorithm 1 and Theorem 1. Each round t, with clip norm
C_t, combined noise multiplier z and expected cohort size m:

    w_{t+1} = w_t + (sum_i clip(delta_i, C_t) + N(0, (z_delta * C_t)^2 I)) / m
    b_bar   = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2      (b_i = 1: not clipped)
    C_{t+1} = C_t * exp(-clip_lr * (b_bar - target_quantile))

with z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2, so that the pair of releases is a
single Gaussian mechanism with noise multiplier exactly z (Andrew et al.,
Theorem 1). No Flower imports here: the strategy feeds this module numpy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Andrew et al.'s default count noise is m/20. When z >= 2 * m/20 that default
# is unusable, and we raise sigma_b until the update noise z_delta is at most
# this factor above z. A larger sigma_b only makes the clip-norm estimate
# noisier; it never weakens the guarantee, which is fixed by z.
MAX_UPDATE_NOISE_INFLATION = 1.1


@dataclass(frozen=True)
class NoiseSplit:
    """How the combined noise multiplier z is split between the two releases."""

    noise_multiplier: float  # z: the multiplier the accountant sees
    update_noise_multiplier: float  # z_delta: noise on the clipped sum, in units of C_t
    count_stddev: float  # sigma_b: noise on the centred count of unclipped updates
    default_count_stddev: float  # Andrew et al.'s m/20, for the log
    raised: bool  # True when sigma_b was raised above the default


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 (Andrew et al., Theorem 1)."""
    if noise_multiplier == 0:
        return 0.0
    if count_stddev <= 0:
        return noise_multiplier  # no count release: the update alone carries z
    if noise_multiplier >= 2 * count_stddev:
        raise ValueError(
            f"noise multiplier z={noise_multiplier} must be < 2 * clipped-count-stddev"
            f" = {2 * count_stddev}"
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


def split_noise(
    noise_multiplier: float,
    clients_per_round: float,
    count_stddev: float | None = None,
) -> NoiseSplit:
    """Choose sigma_b (unless given) and derive z_delta.

    `count_stddev=None` picks Andrew et al.'s m/20, raised where needed so that
    z < 2 sigma_b with z_delta <= MAX_UPDATE_NOISE_INFLATION * z. A given
    `count_stddev` is used as is and must satisfy z < 2 sigma_b.
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise must be >= 0, got {noise_multiplier}")
    if clients_per_round <= 0:
        raise ValueError(f"clients must be > 0, got {clients_per_round}")
    default = clients_per_round / 20
    if noise_multiplier == 0:
        # No privacy claimed: keep the count noiseless unless asked otherwise.
        sigma_b = 0.0 if count_stddev is None else count_stddev
        return NoiseSplit(0.0, 0.0, sigma_b, default, False)
    if count_stddev is not None:
        if count_stddev <= 0 or noise_multiplier >= 2 * count_stddev:
            raise ValueError(
                f"clipped-count-stddev={count_stddev} is too small for noise="
                f"{noise_multiplier}: it must be > noise/2 = {noise_multiplier / 2}"
                " (Andrew et al. Theorem 1). Leave it unset to choose it automatically."
            )
        sigma_b = count_stddev
    else:
        # z_delta = z / sqrt(1 - (z / 2 sigma_b)^2) <= k z  <=>  sigma_b >= z / (2 sqrt(1 - k^-2))
        minimum = noise_multiplier / (2 * math.sqrt(1 - MAX_UPDATE_NOISE_INFLATION**-2))
        sigma_b = max(default, minimum)
    return NoiseSplit(
        noise_multiplier=noise_multiplier,
        update_noise_multiplier=update_noise_multiplier(noise_multiplier, sigma_b),
        count_stddev=sigma_b,
        default_count_stddev=default,
        raised=count_stddev is None and sigma_b > default,
    )


def update_noise_stddev(split: NoiseSplit, clip_norm: float) -> float:
    """Std of the Gaussian noise added to the clipped *sum*: z_delta * C_t."""
    return split.update_noise_multiplier * clip_norm


# Floating-point releases (Mironov 2012; Haney et al. 2022): a Gaussian sampled
# in floating point (numpy's ziggurat) takes values on an uneven lattice, and the
# low-order bits of (query + noise) then depend on the query. Measured on the old
# full-precision b_bar (m = 10, sigma_b = 5, 200,000 draws per dataset): a test
# that reads only the 8 lowest mantissa bits separated neighbouring datasets with
# advantage 0.054, more than the 0.040 the whole Gaussian mechanism allows.
# So every noised sum is rounded to a power-of-two grid far coarser than those
# bits, and only the grid point is released (every later step is a fixed
# function of it). The rounding acts on query + noise, so with an ideal sampler
# the release is post-processing of the continuous Gaussian mechanism: the accounting
# (RDP, PLD, the subsampled events) holds unchanged. The rounding step is the one
# of Mironov's snapping mechanism (Mironov 2012), applied to the Gaussian; the
# grid is stated in `release_grid`. What remains is the sampler's own error in
# how much mass each grid cell gets, bounded below (`float_residual`).
# A discrete Gaussian (Canonne, Kamath & Steinke 2020) was not used: it has the
# same Renyi DP / concentrated DP as the continuous one (shown in that paper), but its
# (epsilon, delta) trade-off curve is *not* dominated by the continuous one
# (e.g. sigma = 1, sensitivity 1: beta is lower by up to 0.016), so the PLD
# accountant we report for Poisson sampling would not cover it.
GRID_BELOW_NOISE_BITS = 10  # grid <= noise std / 2^10: adds variance <= 2^-20 sigma^2 / 12
GRID_ABOVE_ULP_BITS = 30  # grid >= 2^30 float64 ulps of any value the sum can take
# The residual, bounded (docs/privacy.md, "Randomness and floating point"). numpy's
# standard_normal is a 256-layer ziggurat: in layer i it returns u * x_i / 2^52
# for a 52-bit integer u, so its values lie on a lattice of spacing at most
# x_0 / 2^52 < 3.92 * 2^-52 (x_0 = v / f(r) = 3.9107 for r = 3.6542), its
# acceptance tests compare 53-bit uniforms with float64 densities (relative
# error ~2^-52), and it never returns |Z| > r + 53 ln 2 / r < 13.8 (its tail
# draws -log(1 - u) / r). A cell is at least 2^-11 sigma wide, so it holds at
# least 2^41 / 3.92 > 2^39 lattice points: discreteness changes its mass by a
# factor within 1 +- 2^-38. query + sigma Z is rounded to the grid exactly
# (`noised_on_grid` adds with TwoSum), so the only other float64 error is the
# product sigma * Z, off by at most 2^-53 * 13.8 sigma < 2^-49 sigma: each cell
# boundary moves by at most 2^-38 of a cell. While a cell is at most sigma/2^8
# wide (`narrow_grid`), the density changes by less than 6% across it. So for
# every cell, sampled mass / ideal mass lies in [e^-g, e^g] with
# g = FLOAT_CELL_LOG_ERROR = 2^-36 (2 * 1.06 * 2^-38 + 2^-38 < 2^-36), except
# beyond |Z| = 13.8, where the ideal Gaussian has mass 2 Phi(-13.8) < 1e-42 and
# numpy none.
FLOAT_CELL_LOG_ERROR = 2.0**-36
FLOAT_TAIL_MASS = 1e-42
NARROW_GRID_BITS = 8


def narrow_grid(noise_stddev: float, sum_bound: float) -> bool:
    """The grid is at most noise std / 2^8, as `float_residual`'s bound needs.

    True unless sum_bound > ~2^14 noise std (m / z_delta above ~16,000).
    """
    return release_grid(noise_stddev, sum_bound) <= noise_stddev / 2**NARROW_GRID_BITS


def float_residual(coordinates: int, epsilon: float, delta: float) -> dict:
    """What numpy's sampler adds to an (epsilon, delta) of the ideal Gaussian mechanism.

    `coordinates` = every noised number released over the run: T (d + 1).
    Per coordinate, every cell's probability is within a factor e^+-g of the
    ideal one (g = FLOAT_CELL_LOG_ERROR) on both neighbouring datasets, also under
    sampling (a mixture keeps the factor) and across adaptive rounds (chain
    rule). So the released transcript is (epsilon + 2 n g, e^{n g} (delta + n
    e^epsilon FLOAT_TAIL_MASS))-DP for n coordinates. Holds while every
    release's grid is narrow (`narrow_grid`).
    """
    n = int(coordinates)
    added = n * FLOAT_CELL_LOG_ERROR
    tail = n * math.exp(min(epsilon, 700.0)) * FLOAT_TAIL_MASS if math.isfinite(epsilon) else 0.0
    return {"coordinates_released": n, "epsilon_added": 2 * added,
            "delta_factor": math.exp(added), "delta_added": math.exp(added) * tail,
            "epsilon_with_float": epsilon + 2 * added,
            "delta_with_float": math.exp(added) * (delta + tail)}


def run_float_residual(split: NoiseSplit, clients_per_round: float, noise_scale: float,
                       dim: int, rounds: int, epsilon: float, delta: float) -> dict | None:
    """`float_residual` of a run: `rounds` releases of d update coordinates and one count.

    `bound_applies` says whether every grid is narrow (the grids' ratios to the
    noise do not depend on C_t). None without noise (epsilon is inf anyway).
    """
    if split.noise_multiplier == 0 or not math.isfinite(epsilon):
        return None
    narrow = narrow_grid(noise_scale * split.update_noise_multiplier, clients_per_round) and (
        split.count_stddev == 0 or narrow_grid(noise_scale * split.count_stddev,
                                               clients_per_round / 2))
    return {**float_residual(rounds * (dim + 1), epsilon, delta), "bound_applies": narrow}


def release_grid(noise_stddev: float, sum_bound: float) -> float:
    """Power-of-two grid for releasing a noised sum with this noise std.

    At most noise_std / 2^20 (negligible extra variance), and at least 2^30 ulps
    of float64 at `sum_bound` + 64 sigma, so neither the sampler's lattice
    (~2^-50 sigma) nor the rounding of query + noise can move a value across a
    grid boundary except with probability ~2^-30. Depends only on public values.
    """
    grid = 2.0 ** (math.floor(math.log2(noise_stddev)) - GRID_BELOW_NOISE_BITS)
    _, exponent = math.frexp(abs(sum_bound) + 64 * noise_stddev)  # value < 2^exponent
    return max(grid, 2.0 ** (exponent - 53 + GRID_ABOVE_ULP_BITS))


def noised_on_grid(total: np.ndarray | float, noise_stddev: float, sum_bound: float,
                   rng: np.random.Generator) -> np.ndarray:
    """round((total + N(0, std^2)) / grid) * grid, rounding the exact sum.

    total + noise is added with TwoSum (Knuth): s + e is the exact sum of the
    two float64 values. The grid is a power of two, at least 2^30 ulps of s,
    so k = rint(s / grid) is exact, and so is s - k * grid; e (at most half an
    ulp of s) can only decide an exact tie. So the grid point is the one of
    the exact real sum, not of its float64 rounding.
    """
    grid = release_grid(noise_stddev, sum_bound)
    x = np.asarray(total, dtype=np.float64)
    y = rng.normal(0.0, noise_stddev, np.shape(total))
    s = x + y
    back = s - x
    e = (x - (s - back)) + (y - back)  # TwoSum: s + e == x + y exactly
    k = np.rint(s / grid)
    d = s - k * grid  # exact, |d| <= grid / 2
    k = k + ((d == grid / 2) & (e > 0)) - ((d == -grid / 2) & (e < 0))
    return k * grid


def noised_mean_update(
    deltas: Sequence[Sequence[np.ndarray]],
    clients_per_round: float,
    sum_noise_stddev: float,
    rng: np.random.Generator,
    like: Sequence[np.ndarray],
    sum_bound: float = 1.0,
) -> list[np.ndarray]:
    """(sum of clipped deltas + N(0, std^2 I)) / m, with the fixed denominator m.

    `like` gives the shapes and dtypes (the global model), so that a round with
    no accepted reply still releases pure noise of the right shape. The noised
    sum is rounded to `release_grid(std, sum_bound)`; pass m * C_t as
    `sum_bound` (it sets only the grid, never a clip).
    """
    mean = []
    for layer, ref in enumerate(like):
        total = np.zeros(ref.shape, dtype=np.float64)
        for delta in deltas:
            total += delta[layer]
        if sum_noise_stddev > 0:
            total = noised_on_grid(total, sum_noise_stddev, sum_bound, rng)
        mean.append((total / clients_per_round).astype(ref.dtype, copy=False))
    return mean


def noisy_unclipped_fraction(
    unclipped_bits: Sequence[int],
    clients_per_round: float,
    count_stddev: float,
    rng: np.random.Generator,
) -> float:
    """b_bar = (sum (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2.

    Centring makes one client's contribution lie in [-1/2, 1/2], the
    sensitivity Andrew et al. Theorem 1 needs. The noised centred count is
    rounded to `release_grid(sigma_b, m / 2)` before anything else is computed.
    """
    return noisy_unclipped_fraction_of_count(sum(int(b) for b in unclipped_bits),
                                             len(unclipped_bits), clients_per_round,
                                             count_stddev, rng)


def noisy_unclipped_fraction_of_count(
    unclipped_count: int,
    num_contributors: int,
    clients_per_round: float,
    count_stddev: float,
    rng: np.random.Generator,
) -> float:
    """The same release from the count alone, as secure aggregation provides it:
    sum (b_i - 1/2) = sum b_i - n/2 over the n contributors."""
    centred = float(unclipped_count) - 0.5 * num_contributors
    if count_stddev > 0:
        centred = float(noised_on_grid(centred, count_stddev, clients_per_round / 2, rng))
    return centred / clients_per_round + 0.5


def next_clip_norm(
    clip_norm: float, unclipped_fraction: float, target_quantile: float, clip_lr: float
) -> float:
    """Geometric update C * exp(-lr (b_bar - gamma)).

    Too many updates clipped (b_bar < gamma) grows C; too few shrinks it, so C
    tracks the target quantile of update norms.
    """
    return clip_norm * math.exp(-clip_lr * (unclipped_fraction - target_quantile))


def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """Global L2 norm of a list of arrays, as the clip sees them."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def clip_to_norm(arrays: Sequence[np.ndarray], clip_norm: float) -> list[np.ndarray]:
    """Scale `arrays` so their global L2 norm is at most `clip_norm`.

    Clients clip with Flower's `adaptiveclipping_mod`; the server clips again so
    that a client which skipped the mod still has sensitivity C_t. For an
    honest client this only rounds.
    """
    norm = l2_norm(arrays)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return [np.asarray(a, dtype=np.float64) * scale for a in arrays]


def clipped_sum(rows: np.ndarray, clip_norm: float) -> np.ndarray:
    """The sum of `clip_to_norm` of each row (one flattened delta per row), all at once.

    For a cohort whose updates are rows of one matrix (the study engine); the
    same clip as `clip_to_norm`, in float64, up to summation order.
    """
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.sqrt(np.square(rows).sum(axis=1))
    scale = np.where(norms <= clip_norm, 1.0, clip_norm / np.maximum(norms, np.finfo(float).tiny))
    return scale @ rows


def dp_fedavg_step(
    global_model: Sequence[np.ndarray],
    client_models: Sequence[Sequence[np.ndarray]],
    unclipped_bits: Sequence[int],
    clip_norm: float,
    clients_per_round: float,
    split: NoiseSplit,
    rng: np.random.Generator,
    **release,
) -> tuple[list[np.ndarray], float, float]:
    """One server round: (new global model, noisy unclipped fraction, next clip norm).

    Clips each client's delta w_i - w_t to C_t, then releases as
    `dp_fedavg_release` does (its keyword arguments: server_lr, target_quantile,
    clip_lr, step, noise_scale). Shared by the strategy and the in-process
    loops, so all run exactly the same math.
    """
    deltas = [clip_to_norm([a - g for a, g in zip(model, global_model)], clip_norm)
              for model in client_models]
    return dp_fedavg_release(
        global_model, deltas, sum(int(b) for b in unclipped_bits), len(unclipped_bits),
        clip_norm, clients_per_round, split, rng, **release,
    )


def server_step(global_model: Sequence[np.ndarray], mean: list[np.ndarray], server_lr: float,
                step: Callable[[Sequence[np.ndarray], list[np.ndarray]], list[np.ndarray]]
                | None = None) -> list[np.ndarray]:
    """The next model from the released mean: `step` (a server optimizer) or the plain
    w + server_lr * mean. Post-processing, no privacy cost."""
    if step is not None:
        return step(global_model, mean)
    return [np.asarray(g + server_lr * u, dtype=g.dtype) for g, u in zip(global_model, mean)]


def dp_fedavg_release(
    global_model: Sequence[np.ndarray],
    clipped_deltas: Sequence[Sequence[np.ndarray]],
    unclipped_count: int,
    num_contributors: int,
    clip_norm: float,
    clients_per_round: float,
    split: NoiseSplit,
    rng: np.random.Generator,
    *,
    server_lr: float,
    target_quantile: float,
    clip_lr: float,
    step: Callable[[Sequence[np.ndarray], list[np.ndarray]], list[np.ndarray]] | None = None,
    noise_scale: float = 1.0,
) -> tuple[list[np.ndarray], float, float]:
    """The release of `dp_fedavg_step` from already clipped deltas and the count of b_i = 1.

    Secure aggregation calls it with one "delta": the unmasked sum of the
    survivors' clipped deltas, and the unmasked sum of their norm bits; the
    noise and the fixed denominator m are the same (the accounting charges a
    possibly withheld sum: `AccountingModel.withheld_inputs`). The update
    noise is drawn before the count noise. `step(global_model, noised_mean)`
    gives the next model (a server optimizer); without it, the plain step
    w + server_lr * mean. `noise_scale` multiplies both noises: m / m_big
    simulates the noise of a cohort of m_big (strategy/large_deployment.py);
    such a run is not private.
    """
    mean = noised_mean_update(clipped_deltas, clients_per_round,
                              noise_scale * update_noise_stddev(split, clip_norm), rng,
                              global_model, sum_bound=clients_per_round * clip_norm)
    new_model = server_step(global_model, mean, server_lr, step)
    fraction = noisy_unclipped_fraction_of_count(unclipped_count, num_contributors,
                                                 clients_per_round,
                                                 noise_scale * split.count_stddev, rng)
    return new_model, fraction, next_clip_norm(clip_norm, fraction, target_quantile, clip_lr)
