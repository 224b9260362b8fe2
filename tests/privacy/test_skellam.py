"""The Skellam sampler and its RDP bound (Agarwal, Kairouz & Liu 2021), checked independently.

- the sampler against scipy's Skellam pmf (chi-square goodness of fit), and drawn from ChaCha20;
- the sum of m shares against scipy's Skellam(m mu) pmf;
- the RDP bound against the exact Renyi divergence and dp_accounting's PLD of the explicit pmfs
  (dimension 1), against the Gaussian mechanism as the scale grows, and against the formula of
  google-research `federated/distributed_dp` (accounting_utils.py), transcribed below.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import RdpAccountant
from randomgen import ChaCha
from scipy import special, stats

from dpfl_app.privacy import distributed, randomness, skellam
from dpfl_app.privacy import distributed_accounting as accounting

P_REJECT = 1e-4  # a fixed-seed test rejects at p < 1e-4: a correct sampler passes, see the controls


def _chacha(key: int) -> np.random.Generator:
    """The CSPRNG's algorithm (ChaCha20) with a fixed key: reproducible test draws."""
    return np.random.Generator(ChaCha(key=key, counter=0, rounds=randomness.CHACHA_ROUNDS))


def _gof_pvalue(draws: np.ndarray, variance: float) -> float:
    """Chi-square test of integer draws against Skellam(V/2, V/2), bins with >= 20 expected,
    the two tails lumped into the end bins."""
    mu = variance / 2
    lo, hi = int(draws.min()), int(draws.max())
    values = np.arange(lo, hi + 1)
    observed = np.bincount(draws - lo, minlength=values.size).astype(float)
    expected = stats.skellam.pmf(values, mu, mu) * draws.size
    expected[0] += stats.skellam.cdf(lo - 1, mu, mu) * draws.size
    expected[-1] += stats.skellam.sf(hi, mu, mu) * draws.size
    # merge bins from both ends until each holds >= 20 expected draws
    keep = expected >= 20
    first, last = np.argmax(keep), len(keep) - 1 - np.argmax(keep[::-1])
    obs = np.concatenate([[observed[:first + 1].sum()], observed[first + 1:last],
                          [observed[last:].sum()]])
    exp = np.concatenate([[expected[:first + 1].sum()], expected[first + 1:last],
                          [expected[last:].sum()]])
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


@pytest.mark.parametrize("variance", [0.5, 7.0, 300.0])
def test_sampler_matches_scipy_skellam(variance):
    draws = skellam.noise_share(200_000, variance, _chacha(0xD15C0 + int(variance)))
    assert draws.dtype == np.int64
    assert _gof_pvalue(draws, variance) > P_REJECT


def test_goodness_of_fit_has_power_against_a_five_percent_variance_error():
    """The control: the same test, same sample size, rejects a sampler 5 % too wide."""
    draws = skellam.noise_share(200_000, 300.0 * 1.05, _chacha(1))
    assert _gof_pvalue(draws, 300.0) < P_REJECT


def test_sum_of_m_shares_is_the_skellam_the_accountant_assumes():
    m, share = 30, 3.0
    rng = _chacha(2)
    total = sum(skellam.noise_share(100_000, share, rng) for _ in range(m))
    assert _gof_pvalue(total, m * share) > P_REJECT
    params = distributed.DistributedDpParams(clip=1.0, dim=8, scale=10.0, bits=30,
                                             share_variance=share, count_share_variance=2.0,
                                             threshold=5)
    l1, l2 = params.l1_sensitivity, params.l2_sensitivity
    expected = [skellam.rdp(a, l1, l2, m * share) + skellam.rdp(a, 1, 1, m * 2.0)
                for a in accounting.ORDERS]
    assert accounting.round_rdp(params, m) == pytest.approx(expected, rel=1e-12)


def test_sampler_draws_from_the_os_keyed_chacha20_by_default(monkeypatch):
    made = []

    def spy():
        gen = randomness.secure_generator()
        made.append(gen)
        return gen

    monkeypatch.setattr(skellam, "secure_generator", spy)
    first, second = skellam.noise_share(64, 1e6), skellam.noise_share(64, 1e6)
    assert len(made) == 2  # a fresh generator per share, never a stored one
    for gen in made:
        assert isinstance(gen.bit_generator, ChaCha)
        assert gen.bit_generator.state["state"]["rounds"] == 20
    assert first.tolist() != second.tolist()


def test_sampler_refuses_a_negative_variance():
    with pytest.raises(ValueError, match="variance"):
        skellam.noise_share(3, -1.0)


def _log_pmf(variance: float, shift: int, support: np.ndarray) -> np.ndarray:
    return stats.skellam.logpmf(support - shift, variance / 2, variance / 2)


def _exact_renyi(order: int, shift: int, variance: float) -> float:
    """D_order(Sk + shift || Sk) by direct summation over a support holding all but ~e^-800."""
    half = int(shift + 40 * math.sqrt(variance) + 60)
    support = np.arange(-half, half + 1)
    lp, lq = _log_pmf(variance, shift, support), _log_pmf(variance, 0, support)
    ok = np.isfinite(lp) & np.isfinite(lq)
    return float(special.logsumexp(order * lp[ok] + (1 - order) * lq[ok]) / (order - 1))


@pytest.mark.parametrize("variance", [2.0, 10.0, 50.0])
@pytest.mark.parametrize("shift", [1, 3])
def test_rdp_bound_holds_against_the_exact_renyi_divergence(variance, shift):
    for order in (2, 3, 5, 8, 16, 32, 64):
        exact = _exact_renyi(order, shift, variance)
        bound = skellam.rdp(order, shift, shift, variance)
        assert exact <= bound * (1 + 1e-9)
    # and it is close where the noise is wide: within 5 % at order 2 and V = 50 shift 1
    if variance == 50.0 and shift == 1:
        assert skellam.rdp(2, 1, 1, 50.0) <= 1.05 * _exact_renyi(2, 1, 50.0)


def _pld_epsilon(variance: float, shift: int, rounds: int, delta: float) -> float:
    half = int(shift + 40 * math.sqrt(variance) + 60)
    support = np.arange(-half, half + 1)

    def pmf(s):
        return {int(k): float(v) for k, v in zip(support, _log_pmf(variance, s, support))
                if np.isfinite(v)}

    pld = privacy_loss_distribution.from_two_probability_mass_functions(
        pmf(shift), pmf(0), value_discretization_interval=1e-4)
    return float(pld.self_compose(rounds).get_epsilon_for_delta(delta))


@pytest.mark.parametrize("variance,shift,rounds,slack", [(10.0, 1, 10, 1.3), (50.0, 1, 10, 1.2),
                                                         (200.0, 3, 20, 1.2)])
def test_epsilon_against_dp_accountings_pld_of_the_explicit_pmf(variance, shift, rounds, slack):
    """Exact privacy loss (PLD, pessimistic) <= ours; ours within the RDP->(eps, delta) slack."""
    exact = _pld_epsilon(variance, shift, rounds, 1e-5)
    rdp = np.array([skellam.rdp(a, shift, shift, variance) for a in accounting.ORDERS])
    ours = accounting.epsilon_from_rdp(rounds * rdp, 1e-5)
    assert exact <= ours <= slack * exact


def test_bound_tends_to_the_gaussian_mechanism_as_the_scale_grows():
    z, rounds, delta = 1.3, 50, 1e-6
    gauss = RdpAccountant(accounting.ORDERS).compose(GaussianDpEvent(z), rounds).get_epsilon(delta)
    gaps = []
    for scale in (3, 30, 300, 3000):  # sensitivity `scale`, variance (z * scale)^2
        rdp = np.array([skellam.rdp(a, scale, scale, (z * scale) ** 2) for a in accounting.ORDERS])
        gaps.append(accounting.epsilon_from_rdp(rounds * rdp, delta) / gauss - 1)
    assert all(g >= 0 for g in gaps)  # never below the Gaussian
    assert gaps == sorted(gaps, reverse=True)  # shrinking with the scale
    assert gaps[-1] < 1e-3


def _reference_skellam_rdp(l1_sens, l2_sens, central_var, scale, order):
    """Transcribed from google-research/federated distributed_dp/accounting_utils.py
    (`_skellam_rdp`): sensitivities and variance in the *unscaled* domain, `scale` = gamma."""
    a, s, mu = order, scale, central_var
    rdp = a / (2 * mu) * l2_sens**2
    rdp += min(((2 * a - 1) * s * l2_sens**2 + 6 * l1_sens) / (4 * s**3 * mu**2),
               3 * l1_sens / (2 * s * mu))
    return rdp


def _reference_rounded_l2_norm_bound(l2_norm_bound, beta, dim):
    """Transcribed from the same file (`rounded_l2_norm_bound`, Kairouz et al. 2021)."""
    bound_1 = l2_norm_bound + np.sqrt(dim)
    if beta == 0:
        return bound_1
    squared_bound_2 = np.square(l2_norm_bound) + 0.25 * dim
    squared_bound_2 += np.sqrt(2.0 * np.log(1.0 / beta)) * (l2_norm_bound + 0.5 * np.sqrt(dim))
    return min(bound_1, np.sqrt(squared_bound_2))


def test_rdp_bound_agrees_with_google_research_distributed_dp():
    rng = np.random.default_rng(3)
    for _ in range(200):
        scale, l2 = 10 ** rng.uniform(-1, 4), rng.uniform(0.01, 5)
        l1 = l2 * rng.uniform(1, 30)
        central_var, order = 10 ** rng.uniform(-4, 2), int(rng.integers(2, 300))
        theirs = _reference_skellam_rdp(l1, l2, central_var, scale, order)
        ours = skellam.rdp(order, scale * l1, scale * l2, scale**2 * central_var)
        assert ours == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("beta", [0.0, math.exp(-0.5), 0.01])
def test_rounding_bound_agrees_with_google_research_distributed_dp(beta):
    for scaled, dim in [(1.0, 1), (100.0, 1024), (3e4, 1024), (5.0, 2**20)]:
        assert distributed.rounded_l2_bound(scaled, dim, beta) == pytest.approx(
            _reference_rounded_l2_norm_bound(scaled, beta, dim), rel=1e-12)


def test_rdp_edge_cases():
    assert skellam.rdp(2, 0, 0, 0.0) == 0.0
    assert skellam.rdp(2, 1, 1, 0.0) == math.inf
    with pytest.raises(ValueError, match="integer orders"):
        skellam.rdp(1.5, 1, 1, 1.0)


def test_tail_bound_is_above_the_exact_skellam_tail():
    for variance, threshold in [(10.0, 10), (100.0, 40), (1e4, 500)]:
        exact = 2 * stats.skellam.sf(threshold - 1, variance / 2, variance / 2)
        bound = math.exp(skellam.log_tail(threshold, variance))
        assert exact <= bound <= 100 * exact  # a Chernoff bound: valid, and not absurdly loose


def test_sampler_refuses_shares_beyond_its_checked_range():
    with pytest.raises(ValueError, match="smaller scale"):
        skellam.noise_share(3, 4.1 * skellam.MAX_POISSON_MEAN)
