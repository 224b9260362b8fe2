"""The one draw behind every cohort: real clients' slots and the audit's canaries.

Both call `draw`, so the audit's canaries are sampled by exactly the code that
samples real clients (the accountant's Poisson or fixed-size model), from the
same private generator. No Flower imports.
"""

from __future__ import annotations

import math

import numpy as np


def draw(rng: np.random.Generator, population: int, expected: float, sampling: str) -> np.ndarray:
    """Sorted indices in [0, population) chosen this round, `expected` of them on average.

    poisson: an independent coin per index with probability expected/population.
    fixed: a draw without replacement of floor(expected) indices, or one more
    with probability frac(expected) (only when expected is not an integer), so
    every index's chance is exactly expected/population.
    """
    if sampling == "poisson":
        return np.flatnonzero(rng.random(population) < expected / population)
    if abs(expected - round(expected)) <= 1e-9 * max(1.0, expected):
        expected = round(expected)  # k * (m/N) in floating point, e.g. 50 * (7/50) = 7.000000000000001
    whole = math.floor(expected)
    size = whole + int(expected > whole and rng.random() < expected - whole)
    return np.sort(rng.choice(population, size=size, replace=False))
