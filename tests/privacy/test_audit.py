"""The audit's math: the two-Gaussian epsilon, canaries, and the estimate on a simulated run.

`simulate` runs the DP-FedAvg release (mechanism.noised_mean_update, the code the
strategy uses) with canary clients only, Poisson-sampled at the default q = 6/10
for 5 rounds; the statistics are the audit's own. Fixed seeds throughout.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from scipy import integrate, stats

from dpfl_app.privacy import audit, mechanism
from dpfl_app.privacy.accounting import AccountingModel, epsilon_after
from dpfl_app.privacy.report import audit_section

DELTA = 1e-5


def simulate(noise: float, seed: int, *, canaries: int = 300, dim: int = 2000, rounds: int = 5,
             noise_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Max cosines of inserted and unseen canaries after `rounds` noised releases.

    `noise_factor` < 1 is the broken mechanism: it claims `noise` but adds less.
    """
    rng = np.random.default_rng(seed)
    directions = audit.CanaryDirections(1000 + seed, 2 * canaries, dim)
    best = np.full(2 * canaries, -np.inf)
    for _ in range(rounds):
        chosen = audit.sample_canaries(rng, canaries, 0.6, "poisson")
        deltas = [[u] for u in directions.rows(chosen)]  # clip norm 1
        (mean,) = mechanism.noised_mean_update(deltas, 6, noise_factor * noise, rng,
                                               [np.zeros(dim)])
        best = np.maximum(best, directions.cosines(mean))
    return best[:canaries], best[canaries:]


def accounted(noise: float) -> float:
    return epsilon_after(AccountingModel("poisson", noise, 10, 6, DELTA), 5, "pld")


# --- the two-Gaussian epsilon ------------------------------------------------------
@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0])
def test_equal_variances_give_the_gaussian_mechanism_epsilon(mu):
    """N(0,1) vs N(mu,1) is the Gaussian mechanism with sigma = 1/mu: dp_accounting agrees."""
    pld = dp_accounting.pld.privacy_loss_distribution.from_gaussian_mechanism(
        1 / mu, value_discretization_interval=1e-4)
    assert audit.epsilon_two_gaussians(0, 1, mu, 1, DELTA) == pytest.approx(
        pld.get_epsilon_for_delta(DELTA), rel=1e-4)


@pytest.mark.parametrize("params", [(0, 1, 1, 1.5), (0, 1, 0, 1.2), (0.2, 0.5, 2, 1),
                                    (0.0, 0.02, 0.1, 0.01)])
def test_unequal_variances_match_numerical_integration(params):
    """At the returned epsilon, the larger hockey-stick divergence, integrated numerically, is delta."""
    delta = 1e-3
    eps = audit.epsilon_two_gaussians(*params, delta)
    mu0, s0, mu1, s1 = params

    def divergence(mp, sp, mq, sq):
        excess = lambda x: max(stats.norm.pdf(x, mp, sp) - math.exp(eps) * stats.norm.pdf(x, mq, sq), 0)  # noqa: E731
        lo, hi = min(mp - 40 * sp, mq - 40 * sq), max(mp + 40 * sp, mq + 40 * sq)
        return integrate.quad(excess, lo, hi, points=np.linspace(lo, hi, 50), limit=500)[0]

    assert max(divergence(mu1, s1, mu0, s0), divergence(mu0, s0, mu1, s1)) == pytest.approx(
        delta, rel=1e-5)
    assert audit.epsilon_two_gaussians(0, 1, 0, 1, delta) == 0.0  # identical: no leak


# --- canaries --------------------------------------------------------------------
def test_directions_are_unit_reproducible_and_nearly_orthogonal():
    dirs = audit.CanaryDirections(7, 600, 1000)  # more than one block
    rows = dirs.rows([0, 299, 599])
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0)
    assert np.array_equal(rows, audit.CanaryDirections(7, 600, 1000).rows([0, 299, 599]))
    cos = dirs.cosines(rows[1])
    assert cos[299] == pytest.approx(1.0)
    others = np.delete(cos, 299)
    # cosines of independent uniform directions: mean 0, std 1/sqrt(dim) ~ 0.032
    assert abs(others.mean()) < 4 * 0.032 / math.sqrt(599)
    assert others.std() == pytest.approx(1 / math.sqrt(1000), rel=0.1)  # 599 samples: ~3% error


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_canaries_are_sampled_at_the_real_clients_rate(sampling):
    rng = np.random.default_rng(0)
    counts = np.zeros(50)
    for _ in range(2000):
        counts[audit.sample_canaries(rng, 50, 0.37, sampling)] += 1
    # each canary joins 2000 rounds w.p. 0.37: binomial std ~ 21.6; over 50 canaries the mean
    # has std ~ 3.1, so 6 * 3.1 = 19 rounds of tolerance on the mean
    assert abs(counts.mean() - 740) < 19
    if sampling == "fixed":  # 50 * 0.37 = 18.5: always 18 or 19 of them
        sizes = {len(audit.sample_canaries(rng, 50, 0.37, "fixed")) for _ in range(200)}
        assert sizes == {18, 19}


def test_canary_bits_are_fair_coins_fixed_by_seed_and_round():
    bits = np.stack([audit.canary_bits(7, t, 400) for t in range(50)])
    assert set(np.unique(bits)) == {0, 1}
    # 20,000 coins: the mean is within 0.5 +- 0.011 (3 standard deviations)
    assert abs(bits.mean() - 0.5) < 0.011
    assert np.array_equal(bits[3], audit.canary_bits(7, 3, 400))
    assert not np.array_equal(bits[3], bits[4])


# --- the estimate on simulated runs ------------------------------------------------
def test_without_noise_the_canaries_are_detected():
    inserted, unseen = simulate(0.0, seed=0, canaries=100, dim=4000)
    eps = audit.empirical_epsilon(inserted, unseen, DELTA)
    # With 60 canaries per round the inserted cosines are ~1/sqrt(60) = 0.13 against unseen
    # ones of std 1/sqrt(4000) = 0.016: eight standard deviations apart.
    assert eps > 30


def test_with_large_noise_the_estimate_is_near_zero():
    for seed in range(3):
        inserted, unseen = simulate(20.0, seed=seed, canaries=1000, dim=1000)
        # The signal is mu = 1/20 per round. What remains is the fit's own error: two sample
        # standard deviations of 1000 skewed maxima differ by a few percent, which the Gaussian
        # test at delta = 1e-5 (4.3 standard deviations out) reads as epsilon 0.1-0.9 (seeds
        # 0-7 gave 0.14 to 0.93), against > 30 without noise.
        assert audit.empirical_epsilon(inserted, unseen, DELTA) < 1.0


@pytest.mark.parametrize("noise", [0.3, 1.0])
def test_over_several_seeds_the_estimate_stays_below_the_accounted_epsilon(noise):
    bound = accounted(noise)
    estimates = [audit.empirical_epsilon(*simulate(noise, seed), DELTA) for seed in range(5)]
    assert max(estimates) < bound, (estimates, bound)
    assert min(estimates) > 0.3 * bound  # and it is not vacuous: the attack does find them


def test_a_mechanism_adding_a_tenth_of_its_noise_is_caught_and_flagged():
    claimed = 2.0
    inserted, unseen = simulate(claimed, seed=0, noise_factor=0.1)
    result = audit.estimate(inserted, unseen, DELTA, accounted(claimed))
    assert result["epsilon"] > 2 * result["accounted_epsilon"]
    assert result["verdict"] == "above"
    section = "\n".join(audit_section({**result, "canaries": 300, "unseen_canaries": 300,
                                       "canaries_per_round": 180.0}))
    assert "EXCEEDS the accounted" in section and "Something is wrong" in section
    # the honest mechanism, same seed: below, and the report says so
    honest = audit.estimate(*simulate(claimed, seed=0), DELTA, accounted(claimed))
    assert honest["verdict"] == "below"
    assert "below the accounted ε" in "\n".join(audit_section(
        {**honest, "canaries": 300, "unseen_canaries": 300, "canaries_per_round": 180.0}))


def test_population_warning_only_when_k_is_not_small():
    assert audit.population_warning(10, 1000, 0.01) is None
    assert "not small compared with the population N=10" in audit.population_warning(300, 10, 0.6)
