"""DP-FTRL's factorization, sensitivity, noise and accounting, against independent computations.

The brute force enumerates every participation pattern that b-min-separation
allows on small T and takes the worst; the noise's covariance is measured;
epsilon is recomputed with dp_accounting from the brute-force sensitivity.
"""

from __future__ import annotations

import itertools
import math

import dp_accounting
import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from dpfl_app.privacy import ftrl_accounting as fa
from dpfl_app.privacy import matrix_factorization as mf
from dpfl_app.privacy import mechanism
from dpfl_app.privacy.ftrl_release import ftrl_release


def allowed_patterns(rounds: int, b: int):
    """Every non-empty set of rounds whose consecutive members are >= b apart."""
    for size in range(1, rounds + 1):
        for rounds_taken in itertools.combinations(range(rounds), size):
            if all(j - i >= b for i, j in zip(rounds_taken, rounds_taken[1:])):
                yield rounds_taken


def brute_force_sensitivity(matrix: np.ndarray, b: int) -> float:
    """max over patterns of ||sum_{i in pattern} C[:, i]|| (each contribution +1: the worst
    case when C^T C >= 0 entrywise, which the test checks)."""
    gram = matrix.T @ matrix
    assert np.all(gram >= -1e-12)
    return math.sqrt(max(gram[np.ix_(p, p)].sum() for p in allowed_patterns(len(matrix), b)))


def balle_wang_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity / std = mu (Balle & Wang 2018,
    Theorem 8): delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu); scipy's root."""
    gap = lambda eps: (norm.cdf(mu / 2 - eps / mu)  # noqa: E731
                       - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu) - delta)
    return brentq(gap, 0.0, 100.0, xtol=1e-13, rtol=1e-13)


def test_square_root_coefficients_are_kalinin_lamperts_closed_form():
    c = mf.toeplitz_sqrt(np.ones(12))
    assert c == pytest.approx([math.comb(2 * n, n) / 4 ** n for n in range(12)], rel=1e-14)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_square_root_squares_to_the_workload(momentum):
    a = mf.workload_coefficients(9, momentum)
    root = mf.toeplitz(mf.toeplitz_sqrt(a), 9)
    assert root @ root == pytest.approx(mf.toeplitz(a, 9), abs=1e-12)
    # the momentum workload is the model's response to unit updates under heavy-ball momentum
    if momentum:
        velocity, weights = 0.0, []
        for t in range(9):
            velocity = momentum * velocity + (1.0 if t == 0 else 0.0)
            weights.append(sum(weights[-1:]) + velocity)
        assert a == pytest.approx(np.array(weights))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("rounds", [1, 2, 5, 8, 11])
def test_sensitivity_equals_brute_force_over_every_allowed_pattern(rounds, momentum):
    for b in range(1, rounds + 1):
        for bands in range(1, b + 1):
            c = mf.banded_sqrt(rounds, bands, momentum)
            matrix = mf.toeplitz(c, rounds)
            expected = brute_force_sensitivity(matrix, b)
            assert mf.sensitivity(c, rounds, b) == pytest.approx(expected, rel=1e-12), (b, bands)
            # every prefix of the run (epsilon is reported after each round)
            for t in range(1, rounds):
                assert mf.sensitivity(c, t, b) == pytest.approx(
                    brute_force_sensitivity(matrix[:t, :t], b), rel=1e-12)


def test_vector_contributions_never_exceed_the_sensitivity():
    """Contributions are vectors of norm <= 1, not +1: random ones stay within the bound."""
    rng = np.random.default_rng(7)
    rounds, b, bands = 10, 3, 3
    c = mf.banded_sqrt(rounds, bands)
    matrix, bound = mf.toeplitz(c, rounds), mf.sensitivity(c, rounds, b)
    for pattern in list(allowed_patterns(rounds, b))[::7]:
        for _ in range(20):
            u = rng.normal(size=(len(pattern), 5))
            u /= np.linalg.norm(u, axis=1, keepdims=True)
            assert np.linalg.norm(matrix[:, pattern] @ u) <= bound + 1e-12


def test_more_bands_than_the_separation_would_break_the_closed_form():
    """Why p <= b is required: overlapping columns add cross terms the formula omits."""
    rounds, b = 8, 2
    c = mf.banded_sqrt(rounds, 4)
    squares = np.cumsum(c ** 2)
    naive = math.sqrt(sum(squares[min(4, rounds - s) - 1] for s in range(0, rounds, b)))
    assert brute_force_sensitivity(mf.toeplitz(c, rounds), b) > naive * 1.05
    with pytest.raises(ValueError, match="bands <= min-separation"):
        mf.sensitivity(c, rounds, b)


def test_expected_error_equals_the_explicit_matrices():
    rounds, b = 12, 4
    for bands in range(1, b + 1):
        c = mf.banded_sqrt(rounds, bands)
        big_b = mf.toeplitz(np.ones(rounds), rounds) @ np.linalg.inv(mf.toeplitz(c, rounds))
        direct = brute_force_sensitivity(mf.toeplitz(c, rounds), b) ** 2 * np.sum(big_b ** 2)
        assert mf.expected_error(c, rounds, b) == pytest.approx(direct / rounds, rel=1e-10)
    assert mf.choose_bands(rounds, 1) == 1  # b = 1 allows only the identity
    assert mf.choose_bands(rounds, b) > 1  # correlated noise beats independent noise


def test_injected_noise_has_the_factorizations_covariance():
    """Each of S coordinates is an independent run of T rounds; their empirical covariance
    across rounds must be C^-1 C^-T. Tolerance: 6 standard errors of each entry,
    sqrt((S_ii S_jj + S_ij^2) / S), so a false failure is below 1e-8 per entry."""
    rounds, bands, samples = 8, 3, 200_000
    c = mf.banded_sqrt(rounds, bands)
    noise = mf.CorrelatedNoise(c)
    rng = np.random.default_rng(2024)
    y = np.stack([noise.next([np.zeros(samples)], rng)[0] for _ in range(rounds)])
    empirical = y @ y.T / samples
    inverse = np.linalg.inv(mf.toeplitz(c, rounds))
    expected = inverse @ inverse.T
    stderr = np.sqrt((np.outer(np.diag(expected), np.diag(expected)) + expected ** 2) / samples)
    assert np.all(np.abs(empirical - expected) <= 6 * stderr)
    # and the noise is really correlated: the off-diagonal expected entries are far from 0
    assert np.abs(expected[1, 0]) > 100 * stderr[1, 0]


def test_identity_factorization_is_dp_fedavg_without_amplification():
    """One band: the same model, count and clip as DP-FedAvg's release, bit for bit, and
    the epsilon of T rounds of Gaussian(z) composed (dp_accounting, no amplification)."""
    rng_shape = np.random.default_rng(0)
    like = [rng_shape.normal(size=(4, 3)).astype(np.float32), np.zeros(3, np.float32)]
    deltas = [[rng_shape.normal(size=a.shape) * 0.1 for a in like] for _ in range(5)]
    model, split = fa.build_model(2.0, rounds=6, min_separation=1, clients_per_round=5,
                                  delta=1e-5)
    assert model.bands == 1
    kwargs = dict(server_lr=1.5, target_quantile=0.3, clip_lr=0.2)
    ours = ftrl_release(like, deltas, 3, 5, 0.7, 5, split, mf.CorrelatedNoise(model.coefficients),
                        np.random.default_rng(11), **kwargs)
    theirs = mechanism.dp_fedavg_release(like, deltas, 3, 5, 0.7, 5, split,
                                         np.random.default_rng(11), **kwargs)
    for a, b in zip(ours[0], theirs[0]):
        assert np.array_equal(a, b)
    assert ours[1:] == theirs[1:]
    assert split == mechanism.split_noise(2.0, 5)  # the same split of z as DP-FedAvg's

    ledger = fa.FtrlLedger(model)
    ledger.compose_round(6)
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 6)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(event)
    assert ledger.epsilon() == pytest.approx(pld.get_epsilon(1e-5), rel=1e-3)


@pytest.mark.parametrize("rounds,b", [(9, 3), (10, 4)])
def test_epsilon_from_brute_force_sensitivity(rounds, b):
    """The ledger's epsilon after every round against dp_accounting on the brute-force
    sensitivity of the update and the count (sqrt(k_t)/2 over k_t participations)."""
    model, split = fa.build_model(3.0, rounds, b, clients_per_round=20, delta=1e-6)
    matrix = mf.toeplitz(np.array(model.coefficients), rounds)
    ledger = fa.FtrlLedger(model)
    for t in range(1, rounds + 1):
        ledger.compose_round()
        sens = brute_force_sensitivity(matrix[:t, :t], b)
        k = max(len(p) for p in allowed_patterns(t, b))
        mu = math.sqrt((sens / split.update_noise_multiplier) ** 2 + k / (4 * split.count_stddev ** 2))
        assert ledger.epsilon() == pytest.approx(balle_wang_epsilon(mu, 1e-6), rel=1e-8)
        assert ledger.epsilon("rdp") >= ledger.epsilon()  # RDP is the looser bound
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    expected = acc.compose(dp_accounting.GaussianDpEvent(1 / mu)).get_epsilon(1e-6)
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-6)
    # at T the pair is one Gaussian with multiplier z / sens_T, as the split promises
    assert model.event_noise_multiplier() == pytest.approx(3.0 / model.sensitivity(), rel=1e-12)


def test_calibration_meets_the_target_and_only_just():
    sens = fa.run_sensitivity(40, 4)
    z = fa.calibrate_noise(4.0, 1e-5, sens)
    assert fa.gaussian_epsilon(z / sens, 1e-5) <= 4.0
    assert fa.gaussian_epsilon(z * 0.999 / sens, 1e-5) > 4.0 - 0.05


def test_noise_buffer_holds_bands_minus_one_vectors():
    noise = mf.CorrelatedNoise(mf.banded_sqrt(20, 4))
    rng = np.random.default_rng(1)
    for _ in range(10):
        noise.next([np.zeros(3)], rng)
    assert len(noise.buffer) == 3
