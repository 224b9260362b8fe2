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


def noised_mean_update(
    deltas: Sequence[Sequence[np.ndarray]],
    clients_per_round: float,
    sum_noise_stddev: float,
    rng: np.random.Generator,
    like: Sequence[np.ndarray],
) -> list[np.ndarray]:
    """(sum of clipped deltas + N(0, std^2 I)) / m, with the fixed denominator m.

    `like` gives the shapes and dtypes (the global model), so that a round with
    no accepted reply still releases pure noise of the right shape.
    """
    mean = []
    for layer, ref in enumerate(like):
        total = np.zeros(ref.shape, dtype=np.float64)
        for delta in deltas:
            total += delta[layer]
        if sum_noise_stddev > 0:
            total += rng.normal(0.0, sum_noise_stddev, size=ref.shape)
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
    sensitivity Andrew et al. Theorem 1 needs.
    """
    centred = sum(float(b) - 0.5 for b in unclipped_bits)
    if count_stddev > 0:
        centred += rng.normal(0.0, count_stddev)
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


def dp_fedavg_step(
    global_model: Sequence[np.ndarray],
    client_models: Sequence[Sequence[np.ndarray]],
    unclipped_bits: Sequence[int],
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
    """One server round: (new global model, noisy unclipped fraction, next clip norm).

    Shared by the strategy and the benchmark's in-process loop, so both run
    exactly the same math. The update noise is drawn before the count noise.
    `step(global_model, noised_mean)` gives the next model (a server
    optimizer); without it, the plain step w + server_lr * mean.
    `noise_scale` multiplies both noises: m / m_big simulates the noise of a
    cohort of m_big (strategy/large_deployment.py); such a run is not private.
    """
    deltas = [clip_to_norm([a - g for a, g in zip(model, global_model)], clip_norm)
              for model in client_models]
    mean = noised_mean_update(deltas, clients_per_round,
                              noise_scale * update_noise_stddev(split, clip_norm), rng,
                              global_model)
    # A step of server-lr along the released mean: post-processing, no privacy cost.
    if step is not None:
        new_model = step(global_model, mean)
    else:
        new_model = [np.asarray(g + server_lr * u, dtype=g.dtype)
                     for g, u in zip(global_model, mean)]
    fraction = noisy_unclipped_fraction(unclipped_bits, clients_per_round,
                                        noise_scale * split.count_stddev, rng)
    return new_model, fraction, next_clip_norm(clip_norm, fraction, target_quantile, clip_lr)
