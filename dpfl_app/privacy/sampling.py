"""Cohort sampling as the accountant assumes it, shared by the strategy and the study engine.

Both consume the server's noise RNG in the same order (the coins, or the seed
of the fixed-size draw, before the round's noise), so a run with
`deterministic-noise=true` samples the same cohorts in Flower and in process.
No Flower imports: callers pass positions in their list of clients.
"""

from __future__ import annotations

import random

import numpy as np


def poisson_positions(rng: np.random.Generator, count: int, probability: float) -> list[int]:
    """Positions 0..count-1 kept by one independent coin each, in order (Poisson sampling).

    One `rng.random()` per client, drawn in position order: `rng.random(count)`
    draws the same doubles in one call.
    """
    return np.flatnonzero(rng.random(count) < probability).tolist()


def fixed_size_seed(rng: np.random.Generator) -> int:
    """The seed of Python's `random` for Flower's `random.sample` of m clients."""
    return int(rng.integers(2**63))


def fixed_size_positions(rng: np.random.Generator, count: int, size: int) -> list[int]:
    """Positions of `size` of `count` clients without replacement, as Flower's
    `sample_nodes` picks them (`random.sample` after `random.seed(fixed_size_seed(rng))`)."""
    return random.Random(fixed_size_seed(rng)).sample(range(count), size)
