"""DP-FTRL's round: the clipped sum plus correlated noise, then the model step (no Flower).

Kairouz et al. 2021, "Practical and Private (Deep) Learning without Sampling
or Shuffling", in the matrix-mechanism form of Denisov et al. 2022 and
Choquette-Choo et al. 2023: round t releases

    sum_i clip(delta_i, C_t) + z_delta * C_t * (C^-1 z)_t        (then / m)

so the model trajectory is A (x + C^-1 z) = B (C x + z) with B = A C^-1:
the prefix sums (or, with server momentum, the momentum workload) with noise
shaped by B. Everything after the noised sum (the division by the fixed m, the
server step, the clip-norm update from the noised count) is post-processing,
exactly as in `mechanism.dp_fedavg_release`; the count gets independent noise
each round. The noised sum is rounded to the same power-of-two grid as
DP-FedAvg's (mechanism.py explains why). With one band (C = I) every draw and
every operation is DP-FedAvg's, bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from dpfl_app.privacy import mechanism
from dpfl_app.privacy.matrix_factorization import CorrelatedNoise


def noised_sum(clipped_deltas: Sequence[Sequence[np.ndarray]], like: Sequence[np.ndarray],
               clip_norm: float, clients_per_round: float, update_noise_multiplier: float,
               noise: CorrelatedNoise, rng: np.random.Generator) -> list[np.ndarray]:
    """sum of clipped deltas + z_delta C_t (C^-1 z)_t, on the release grid, in float64."""
    std = update_noise_multiplier * clip_norm
    shaped = noise.next(like, rng) if std > 0 else None
    # The grid from the smallest marginal std of the shaped noise (1/c_0 in units of std).
    grid_std = std * noise.marginal_stddev()
    sums = []
    for layer, ref in enumerate(like):
        total = np.zeros(ref.shape, dtype=np.float64)
        for delta in clipped_deltas:
            total += delta[layer]
        if std > 0:
            grid = mechanism.release_grid(grid_std, clients_per_round * clip_norm)
            total = np.rint((total + std * shaped[layer]) / grid) * grid
        sums.append(total)
    return sums


def ftrl_release(
    global_model: Sequence[np.ndarray],
    clipped_deltas: Sequence[Sequence[np.ndarray]],
    unclipped_count: int,
    num_contributors: int,
    clip_norm: float,
    clients_per_round: float,
    split: mechanism.NoiseSplit,
    noise: CorrelatedNoise,
    rng: np.random.Generator,
    **post_processing,
) -> tuple[list[np.ndarray], float, float]:
    """(new model, noisy unclipped fraction, next clip norm), as dp_fedavg_release returns.

    The correlated noise is added here; the rest (division by m, the step of
    `post_processing`: server_lr, target_quantile, clip_lr, step, and the noised
    count) is `mechanism.dp_fedavg_release` given the noised sum, with no update noise.
    """
    total = noised_sum(clipped_deltas, global_model, clip_norm, clients_per_round,
                       split.update_noise_multiplier, noise, rng)
    already_noised = dataclasses.replace(split, update_noise_multiplier=0.0)
    return mechanism.dp_fedavg_release(global_model, [total], unclipped_count,
                                       num_contributors, clip_norm, clients_per_round,
                                       already_noised, rng, **post_processing)
