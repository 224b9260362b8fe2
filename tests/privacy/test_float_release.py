"""Floating-point low-bit leakage: a test that reads only the lowest mantissa bits of
the released clipped fraction b_bar must not tell neighbouring datasets apart better
than the Gaussian mechanism allows (Mironov 2012; Haney et al. 2022)."""

import math

import numpy as np
import pytest

from dpfl_app.privacy import mechanism

M, SIGMA_B = 10, 5.0  # 10 clients per round, count noise sigma_b = 5 (z up to ~10)
N = 200_000  # releases per dataset, for training and again for testing the test
LOW_BITS = 8
# Neighbouring cohorts (add-or-remove-one): one more unclipped client moves the
# centred count sum(b_i - 1/2) by 1/2.
CENTRED = (0.0, 0.5)
# Any test, on anything released, has advantage (TPR - FPR) at most the total
# variation distance of the two Gaussians: 2 Phi(delta / (2 sigma)) - 1.
MECHANISM_BOUND = math.erf(0.5 / (2 * SIGMA_B) / math.sqrt(2))  # = 0.0399
# Advantage is a difference of two proportions over N draws each: SE <= sqrt(0.5 / N).
TOLERANCE = 4 * math.sqrt(0.5 / N)  # 0.0063


def old_float64_release(centred: float, rng: np.random.Generator, n: int) -> np.ndarray:
    """b_bar as main released it before: full float64, nothing rounded."""
    return (centred + rng.normal(0.0, SIGMA_B, size=n)) / M + 0.5


def new_release(centred: float, rng: np.random.Generator, n: int) -> np.ndarray:
    """b_bar as `noisy_unclipped_fraction` releases it, vectorised over n draws."""
    return mechanism.noised_on_grid(np.full(n, centred), SIGMA_B, M / 2, rng) / M + 0.5


def low_bits(values: np.ndarray) -> np.ndarray:
    return (values.view(np.uint64) & np.uint64(2**LOW_BITS - 1)).astype(np.int64)


def low_bit_advantage(release, seed: int) -> float:
    """Likelihood-ratio test on the low mantissa bits, learnt on one sample and
    scored on a fresh one: P(says neighbour | neighbour) - P(says neighbour | base)."""
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]
    learn = [np.bincount(low_bits(release(c, rng, N)), minlength=2**LOW_BITS) + 1
             for c, rng in zip(CENTRED, rngs[:2])]
    says_neighbour = learn[1] > learn[0]
    base, neighbour = (says_neighbour[low_bits(release(c, rng, N))].mean()
                       for c, rng in zip(CENTRED, rngs[2:]))
    return float(neighbour - base)


def test_new_release_matches_noisy_unclipped_fraction():
    """`new_release` is what the strategy's function returns, draw for draw."""
    bits = [1] * 5 + [0] * 5  # centred count 0
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    one_by_one = [mechanism.noisy_unclipped_fraction(bits, M, SIGMA_B, a) for _ in range(50)]
    np.testing.assert_array_equal(one_by_one, np.concatenate(
        [new_release(0.0, b, 1) for _ in range(50)]))


def test_low_bits_of_the_old_float64_release_beat_the_mechanism_bound():
    """The leak this fixes: on main, the low bits alone beat the whole mechanism's bound."""
    advantage = low_bit_advantage(old_float64_release, seed=11)
    assert advantage > MECHANISM_BOUND + TOLERANCE, advantage  # measured 0.054 vs 0.040


def test_low_bits_of_the_released_fraction_stay_within_the_mechanism_bound():
    """The same test on today's release stays clearly inside the bound (measured 0.022:
    what it still sees is the value's binade, which the mechanism may reveal)."""
    advantage = low_bit_advantage(new_release, seed=11)
    assert advantage + TOLERANCE < MECHANISM_BOUND, advantage


def test_released_fraction_is_a_function_of_its_grid_index_alone():
    """Every bit of b_bar is recomputed from the integer grid index k, so the low
    bits carry nothing beyond k = round((count + noise) / grid), a post-processing
    of the continuous Gaussian mechanism."""
    grid = mechanism.release_grid(SIGMA_B, M / 2)
    for centred, seed in zip(CENTRED, (1, 2)):
        released = new_release(centred, np.random.default_rng(seed), N)
        k = np.rint((released - 0.5) * M / grid)
        np.testing.assert_array_equal(k * grid / M + 0.5, released)


@pytest.mark.parametrize("std,bound", [(5.0, 5.0), (0.3, 3.0), (1e-3, 0.6), (2.0, 1e9)])
def test_release_grid_is_a_power_of_two_far_above_the_floats_and_below_the_noise(std, bound):
    grid = mechanism.release_grid(std, bound)
    assert math.log2(grid).is_integer()
    assert grid >= 2**30 * np.spacing(bound + 64 * std)  # sum's rounding cannot cross cells
    if bound <= 2**10 * std:  # m / z_delta <= 1024: rounding adds < 1e-7 of the variance (2^-20 / 12)
        assert grid <= std / 2**10


def test_noised_update_is_released_on_the_grid():
    like = [np.zeros((4, 3))]
    deltas = [[np.full((4, 3), 0.123456789)], [np.full((4, 3), -0.05)]]
    std, m, clip = 0.7, 4, 0.2
    mean = mechanism.noised_mean_update(deltas, m, std, np.random.default_rng(2), like,
                                        sum_bound=m * clip)
    cells = mean[0] * m / mechanism.release_grid(std, m * clip)
    np.testing.assert_array_equal(cells, np.rint(cells))


def _exact_grid_point(x: float, y: float, grid: float) -> float:
    """round((x + y) / grid) * grid in exact rational arithmetic (half to even)."""
    from fractions import Fraction

    q = (Fraction(x) + Fraction(y)) / Fraction(grid)
    return float(round(q) * Fraction(grid))


def test_the_grid_point_is_that_of_the_exact_sum_even_next_to_a_cell_boundary():
    """query + noise is rounded as a real number: float64's rounding of the sum
    cannot move a value across a cell boundary (it used to, for ~2^-30 of a cell)."""
    std, bound = 0.7, 3.0
    grid = mechanism.release_grid(std, bound)
    noise = np.random.default_rng(5).normal(0.0, std, 400)
    # Midpoints between grid points near 2.5 + noise, and queries fl(mid - noise): the
    # exact query + noise is mid plus the subtraction's rounding error, under half an
    # ulp, so float64 rounds the sum onto the midpoint itself.
    mids = (np.floor((2.5 + noise) / grid) + 0.5) * grid
    queries = mids - noise
    released = mechanism.noised_on_grid(queries, std, bound, np.random.default_rng(5))
    exact = np.array([_exact_grid_point(q, y, grid) for q, y in zip(queries, noise)])
    np.testing.assert_array_equal(released, exact)
    old = np.rint((queries + noise) / grid) * grid  # the float64 sum, then the grid
    assert np.sum(old != exact) > 20  # it crossed boundaries (a tie broken the wrong way)


def test_the_float_residual_is_bounded_for_the_largest_model_and_10000_rounds():
    """lenet (d = 62,050, the largest model) for 10,000 rounds: the sampler's residual
    adds at most 0.02 to epsilon and 1% to delta (FLOAT_CELL_LOG_ERROR = 2^-36)."""
    n = 10_000 * (62_050 + 1)
    residual = mechanism.float_residual(n, 8.0, 1e-5)
    assert residual["epsilon_added"] == pytest.approx(2 * n * 2.0**-36)
    assert residual["epsilon_added"] < 0.02 and residual["delta_factor"] < 1.01
    assert residual["delta_added"] < 1e-25
    # the bound needs cells of at most sigma/2^8: true for every m / z_delta <= 10,000
    for ratio in (1, 20, 1000, 10_000):
        assert mechanism.narrow_grid(1.0, ratio) and mechanism.narrow_grid(1e-3, ratio * 1e-3)


def test_a_runs_report_and_results_state_the_float_residual(tmp_path):
    import json

    from tests.inprocess import default_run_config, run_server

    run_server(default_run_config(**{"output-dir": str(tmp_path), "rounds": 2}))
    (run_dir,) = list(tmp_path.iterdir())
    residual = json.loads((run_dir / "results.json").read_text())["accounting"]["float_residual"]
    assert residual["coordinates_released"] == 2 * (650 + 1)  # digits-linear, and the count
    assert residual["bound_applies"] and 0 < residual["epsilon_added"] < 1e-6
    assert "**Floating point:**" in (run_dir / "privacy.md").read_text()


def test_the_float_line_calls_a_vacuous_bound_vacuous_rather_than_printing_delta_above_one():
    from dpfl_app.privacy.report import float_line

    huge = dict(mechanism.float_residual(3255, epsilon=3048.0, delta=1e-5), bound_applies=True)
    assert huge["delta_with_float"] > 1  # e^epsilon times the sampler's tail mass
    line = float_line(huge)
    assert "vacuous" in line and "e+" not in line
    usual = dict(mechanism.float_residual(3255, epsilon=8.0, delta=1e-5), bound_applies=True)
    assert "vacuous" not in float_line(usual) and "δ = 1e-05" in float_line(usual)
