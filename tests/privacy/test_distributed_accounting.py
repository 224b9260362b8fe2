"""The distributed-DP accountant: survivors' noise, the client's own bound, amplification by
sampling under zero-out adjacency (checked against exact Renyi divergences of the explicit
mixtures), calibration, and the modulus's wrap-around bound (checked by simulation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from dpfl_app.privacy import distributed, skellam
from dpfl_app.privacy import distributed_accounting as accounting
from dpfl_app.privacy import distributed_ledger as ledger


def _params(**changes):
    base = dict(clip=1.0, dim=650, scale=2000.0, bits=20, share_variance=1e5,
                count_share_variance=40.0, threshold=8)
    return distributed.DistributedDpParams(**{**base, **changes})


def _log_mixture(q, rest_var, share_var, shift, support):
    """log pmf of (1 - q) Sk(rest) + q (Sk(rest + share) + shift): one round, dimension 1,
    conditioned on the other clients' sample (the bound must hold for each)."""
    out = stats.skellam.logpmf(support, rest_var / 2, rest_var / 2)
    inn = stats.skellam.logpmf(support - shift, (rest_var + share_var) / 2, (rest_var + share_var) / 2)
    return np.logaddexp(np.log1p(-q) + out, math.log(q) + inn)


@pytest.mark.parametrize("q", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("rest,share,shift", [(4, 1.0, 1), (20, 5.0, 2), (3, 10.0, 3)])
def test_sampled_bound_holds_against_the_exact_mixture_divergence(q, rest, share, shift):
    """Zero-out: the client's data x vs 0, its share present when it is sampled, in both worlds."""
    total = rest * share + share
    half = int(shift + 40 * math.sqrt(total) + 60)
    support = np.arange(-half, half + 1)
    with_x = _log_mixture(q, rest * share, share, shift, support)
    with_zero = _log_mixture(q, rest * share, share, 0, support)
    base = np.array([skellam.rdp(a, shift, shift, total) for a in accounting.ORDERS])
    bound = accounting.mixture_rdp(base, q)
    for i, order in enumerate(accounting.ORDERS[:40]):
        for lp, lq in ((with_x, with_zero), (with_zero, with_x)):
            exact = special.logsumexp(order * lp + (1 - order) * lq) / (order - 1)
            assert exact <= bound[i] * (1 + 1e-9) + 1e-12
    assert np.all(bound <= base)  # never worse than no amplification
    assert bound[0] < base[0]  # and it does amplify


def test_accountant_uses_the_survivors_noise_and_refuses_a_sum_below_the_threshold():
    params = _params()
    acc = accounting.DistributedAccountant(params, 1e-6, "poisson", 0.05)
    with pytest.raises(ValueError, match="below the threshold"):
        acc.compose_round(params.threshold - 1)
    for survivors in (8, 12, 9):
        acc.compose_round(survivors)
    expected = sum(accounting.round_rdp(params, n) for n in (8, 12, 9))
    eps = acc.epsilons()
    assert eps["without_sampling"] == pytest.approx(accounting.epsilon_from_rdp(expected, 1e-6))
    assert eps["with_sampling"] < eps["without_sampling"] < eps["client_bound"]
    assert eps["client_bound"] == accounting.client_epsilon(params, 3, 1e-6)
    assert acc.survivors == [8, 12, 9]


def test_with_only_threshold_survivors_the_server_figure_is_the_clients_bound():
    params = _params()
    acc = accounting.DistributedAccountant(params, 1e-6, "poisson", 1.0)
    for _ in range(5):
        acc.compose_round(params.threshold)
    eps = acc.epsilons()
    assert eps["without_sampling"] == pytest.approx(eps["client_bound"], rel=1e-12)
    assert eps["with_sampling"] == pytest.approx(eps["client_bound"], rel=1e-12)  # q = 1


def test_a_dropout_raises_epsilon_and_the_survivors_round_is_accounted_as_such():
    params = _params()
    full, dropped = (accounting.DistributedAccountant(params, 1e-6, "poisson", 0.1) for _ in range(2))
    for acc, survivors in ((full, 20), (dropped, 10)):
        for _ in range(10):
            acc.compose_round(survivors)
    assert dropped.epsilons()["with_sampling"] > full.epsilons()["with_sampling"]


def test_client_bound_grows_with_rounds_and_shrinks_with_the_threshold():
    eps = [accounting.client_epsilon(_params(threshold=t), r, 1e-6)
           for t, r in ((8, 10), (8, 20), (16, 20))]
    assert eps[0] < eps[1] and eps[2] < eps[1]


def test_sensitivities_include_the_rounding():
    p = _params()
    assert p.l2_sensitivity > p.scale * p.clip
    assert p.l1_sensitivity == pytest.approx(math.sqrt(1024) * p.l2_sensitivity)
    assert _params(scale=0.01).l1_sensitivity == pytest.approx(_params(scale=0.01).l2_sensitivity ** 2)


@pytest.mark.parametrize("q", [None, 0.05])
def test_calibration_is_tight(q):
    """The one calibration (`distributed_ledger.calibrate`): the target holds with t survivors
    every round, and 0.1 % less combined noise misses it."""
    plan = ledger.calibrate(8.0, 1e-6, 30, "poisson", q, 5.0, 650, 20, 8, 10, 10)

    def epsilon(z):
        trial = ledger.plan(z, 5.0, 650, 20, 8, 10, 10)
        return accounting.client_epsilon(trial.params, 30, 1e-6, "poisson", q)

    z = plan.split.noise_multiplier
    assert epsilon(z) <= 8.0 < epsilon(z * 0.999)
    assert plan == ledger.plan(z, 5.0, 650, 20, 8, 10, 10)  # built with the z it carries


def test_calibration_says_when_the_bits_cannot_hold_the_noise():
    with pytest.raises(ValueError, match="raise noise-bits"):
        ledger.calibrate(0.5, 1e-6, 100, "poisson", None, None, 650, 8, 8, 10, 10)


def test_with_noise_sets_the_threshold_sum_to_the_multiplier():
    p = distributed.with_noise(_params(), 1.5, 4.0)
    assert p.noise_multiplier(p.threshold) == pytest.approx(1.5)
    assert p.threshold * p.count_share_variance == pytest.approx(64.0)


def test_chosen_scale_is_the_largest_within_the_wrap_target():
    template = _params()
    p = distributed.choose_scale(template, 1.0, 5.0, 50)
    target = math.log(1e-9)
    assert distributed.log_wrap_probability(p, 50) <= target
    bigger = distributed.with_noise(distributed.DistributedDpParams(
        **{**p.__dict__, "scale": p.scale * 1.01}), 1.0, 5.0)
    assert distributed.log_wrap_probability(bigger, 50) > target
    with pytest.raises(ValueError, match="raise bits"):
        distributed.choose_scale(_params(bits=4), 1.0, 5.0, 50)


def test_wrap_bound_holds_in_simulation_and_costs_at_most_two_bits():
    """Aligned inputs of norm C (the worst case for the sum), the real pipeline's integers:
    at 10 bits the bound says < 1e-4 and no round wraps; at 8 bits most rounds do, so the
    bound asks for at most two bits more than the simulated sums need."""
    from dpfl_app.secagg import discrete  # the real pipeline's arithmetic; test-only import

    rng = np.random.default_rng(9)
    dim, n, trials = 64, 6, 400
    p = distributed.with_noise(_params(dim=dim, bits=10, scale=100.0, threshold=n), 0.5, 2.0)
    assert math.exp(distributed.log_wrap_probability(p, n)) < 1e-4
    enc = discrete.Encoding(p.clip, p.scale, p.l2_sensitivity, p.bits, b"s" * 32, 0)
    peaks = []
    for trial in range(trials):
        enc = enc._replace(round_number=trial)
        deltas = [v / np.linalg.norm(v) for v in rng.normal(size=(n, dim)) + 0.3]
        total = sum(discrete.integer_update(d, enc, rng) for d in deltas)
        total = total + sum(skellam.noise_share(p.padded_dim, p.share_variance, rng)
                            for _ in range(n))
        peaks.append(int(np.max(np.abs(total))))
    peaks = np.array(peaks)
    assert np.all(peaks < 2 ** (10 - 1))  # 10 bits: no wrap
    assert np.mean(peaks >= 2 ** (8 - 1)) > 0.5  # 8 bits: most rounds wrap


def test_to_dict_records_the_mechanism():
    acc = accounting.DistributedAccountant(_params(), 1e-6, "poisson", 0.05)
    acc.compose_round(10)
    block = acc.to_dict()
    assert block["noise_at"] == "clients" and block["adjacency"] == "zero-out"
    assert {"bits", "scale", "share_variance", "count_share_variance", "threshold",
            "bytes_per_client", "mechanism"} <= set(block["params"])
    assert block["params"]["bytes_per_client"] == math.ceil(1025 * 20 / 8)
    assert block["survivors"] == [10]


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="bits"):
        _params(bits=63)
    with pytest.raises(ValueError, match="threshold"):
        _params(threshold=0)


def test_client_refuses_above_its_max_epsilon_from_its_own_bound():
    params = distributed.with_noise(_params(), 2.0, 30.0)
    eps = accounting.client_epsilon(params, 20, 1e-6)
    assert accounting.client_refusal(params, 20, 1e-6, 0.0) is None  # no limit
    assert accounting.client_refusal(params, 20, 1e-6, eps * 1.001) is None
    reason = accounting.client_refusal(params, 20, 1e-6, eps * 0.999)
    assert reason and "max-epsilon" in reason and "threshold t=8" in reason
    silent = distributed.DistributedDpParams(**{**params.__dict__, "share_variance": 0.0})
    assert "inf (no noise)" in accounting.client_refusal(silent, 20, 1e-6, 100.0)
    # a smaller announced threshold means less guaranteed noise: refused at the same limit
    fewer = distributed.DistributedDpParams(**{**params.__dict__, "threshold": 4})
    assert accounting.client_refusal(fewer, 20, 1e-6, eps * 1.001) is not None


def _gaussian_eps(sigma, max_order):
    return np.array([0.0, 0.0] + [j / (2 * sigma**2) for j in range(2, max_order + 1)])


@pytest.mark.parametrize("q,sigma", [(0.01, 1.0), (0.1, 2.0), (0.5, 4.0)])
def test_theorem9_is_what_dp_accounting_computes_for_the_gaussian_above_order_256(q, sigma):
    """dp_accounting's without-replacement Gaussian (Wang et al. 2019) switches to the general
    Theorem 9 above order 256, and uses the tighter Theorem 27 below: ours is Theorem 9."""
    from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

    for alpha in (300, 400):
        ours = accounting.theorem9_log_moment(_gaussian_eps(sigma, alpha), q, alpha)
        theirs = rdp_lib._compute_rdp_sample_wor_gaussian_int(q, sigma, alpha)  # noqa: SLF001
        assert ours == pytest.approx(theirs, rel=1e-9)
    for alpha in (2, 5, 32, 256):
        ours = accounting.theorem9_log_moment(_gaussian_eps(sigma, alpha), q, alpha) / (alpha - 1)
        theirs = rdp_lib._compute_rdp_sample_wor_gaussian_scalar(q, sigma, alpha)  # noqa: SLF001
        assert theirs <= ours * (1 + 1e-9) <= 4 * theirs + 1e-12


@pytest.mark.parametrize("q", [0.05, 0.3])
@pytest.mark.parametrize("other", [-2, 0, 2])
def test_without_replacement_bound_holds_against_exact_mixtures(q, other):
    """Replace-one, m of N: the client's x = +2 or x' = -2 (sensitivity 4) when sampled, another
    client's value `other` in its place when not; the same number of shares either way."""
    variance, shift = 30.0, 2
    half = int(3 * shift + 40 * math.sqrt(variance) + 60)
    support = np.arange(-half, half + 1)

    def log_mixture(x):
        sk = lambda s: stats.skellam.logpmf(support - s, variance / 2, variance / 2)  # noqa: E731
        return np.logaddexp(np.log1p(-q) + sk(other), math.log(q) + sk(x))

    p, p_prime = log_mixture(shift), log_mixture(-shift)
    base = np.array([skellam.rdp(a, 2 * shift, 2 * shift, variance) for a in accounting.ORDERS])
    bound = accounting.without_replacement_rdp(base, q)
    for i, order in enumerate(accounting.ORDERS[:60]):
        for lp, lq in ((p, p_prime), (p_prime, p)):
            exact = special.logsumexp(order * lp + (1 - order) * lq) / (order - 1)
            assert exact <= bound[i] * (1 + 1e-9) + 1e-12
    assert bound[0] < 0.5 * base[0]  # and it amplifies


def test_fixed_sampling_accounts_replace_one_and_amplifies_quadratically():
    """Small q, many rounds: Theorem 9's q^2 beats the mixture bound's q despite the doubled
    sensitivity (z = 2, q = 0.01, 1,000 rounds: about 3.6 against 10.4)."""
    params = distributed.with_noise(_params(), 2.0, 1e6)
    fixed = accounting.DistributedAccountant(params, 1e-5, "fixed", 0.01)
    poisson = accounting.DistributedAccountant(params, 1e-5, "poisson", 0.01)
    for acc in (fixed, poisson):
        for _ in range(1000):
            acc.compose_round(8)
    f, p = fixed.epsilons(), poisson.epsilons()
    assert f["without_sampling"] > p["without_sampling"]  # sensitivity 2B against B
    assert f["with_sampling"] < 0.5 * p["with_sampling"]  # but q^2 amplification against q
    assert f["client_bound"] == accounting.client_epsilon(params, 1000, 1e-5, "fixed")
    assert fixed.to_dict()["adjacency"] == "replace-one"
    with pytest.raises(ValueError, match="sampling"):
        accounting.DistributedAccountant(params, 1e-6, "bernoulli", 0.1)


def test_state_dict_restores_the_same_epsilons():
    params = _params()
    acc = accounting.DistributedAccountant(params, 1e-6, "fixed", 0.1)
    for survivors in (9, 12, 8):
        acc.compose_round(survivors)
    resumed = accounting.DistributedAccountant(params, 1e-6, "fixed", 0.1)
    resumed.compose_round(20)  # whatever it held before is replaced
    resumed.load_state_dict(acc.state_dict())
    assert resumed.epsilons() == acc.epsilons() and resumed.survivors == [9, 12, 8]


def test_calibrated_params_meet_the_target_at_the_threshold_and_fit_the_modulus():
    """The ε = 4 recipe's N = 1,437, m = 1,000, t = 800 at b = 18: epsilon <= target with t
    survivors every round, amplified; the wrap-around bound holds at the most contributors
    (the Poisson cohort's bound); 1 % less noise misses the target. (The server's earlier
    calibration started its search at z = 1,000, which 18 bits cannot hold, and failed.)"""
    from dpfl_app.privacy.distributed import log_wrap_probability

    plan = ledger.calibrate(4.0, 1e-5, 40, "poisson", 1000 / 1437, None, 2410, 18, 800, 1000,
                            1237)
    params = plan.params
    assert params.noise_multiplier(800) == pytest.approx(plan.split.update_noise_multiplier)

    def epsilon(p):
        accountant = accounting.DistributedAccountant(p, 1e-5, "poisson", 1000 / 1437)
        for _ in range(40):
            accountant.compose_round(800)
        return accountant.epsilons()["with_sampling"]

    assert 3.9 < epsilon(params) <= 4.0
    less = ledger.plan(plan.split.noise_multiplier / 1.01, None, 2410, 18, 800, 1000, 1237)
    assert epsilon(less.params) > 4.0
    assert log_wrap_probability(params, 1237) <= math.log(1e-9)


def test_calibration_passes_on_a_count_noise_that_is_too_small():
    """A given sigma_b below z/2 is the user's key to fix, not the modulus."""
    with pytest.raises(ValueError, match="clipped-count-stddev"):
        ledger.calibrate(0.5, 1e-6, 100, "poisson", None, 0.2, 650, 30, 8, 10, 10)


def _old_figures(params, model, survivors, withheld, extra_rounds):
    """The ledger's figures as it computed them before one computation served all: the
    accountant's RDP sums, each epsilon computed from scratch, and the budget check's
    projection from the threshold's round RDP written out."""
    adjacency = accounting.ADJACENCY[model.sampling]
    q = model.sampling_probability
    plain = sum((accounting.round_rdp(params, n, adjacency) for n in survivors),
                np.zeros(len(accounting.ORDERS)))
    amplified = sum((accounting.amplified_rdp(accounting.round_rdp(params, n, adjacency),
                                              model.sampling, q) for n in survivors),
                    np.zeros(len(accounting.ORDERS)))
    rounds = len(survivors) + withheld
    threshold_rdp = accounting.round_rdp(params, params.threshold, adjacency)
    projected = amplified + extra_rounds * accounting.amplified_rdp(threshold_rdp,
                                                                    model.sampling, q)
    return {"with_sampling": accounting.epsilon_from_rdp(amplified, model.delta)
            if survivors else 0.0,
            "without_sampling": accounting.epsilon_from_rdp(plain, model.delta)
            if survivors else 0.0,
            "client_bound": accounting.epsilon_from_rdp(rounds * threshold_rdp, model.delta)
            if rounds else 0.0,
            "projected": accounting.epsilon_from_rdp(projected, model.delta)}


@pytest.mark.parametrize("sampling, q, survivors, withheld", [
    ("poisson", 0.3, [9, 12, 8, 8], 2), ("fixed", 0.1, [10, 20], 0), ("poisson", 0.7, [], 3),
    ("fixed", 1.0, [8] * 5, 1)])
def test_ledger_figures_equal_the_old_computation_and_are_computed_once(
        monkeypatch, sampling, q, survivors, withheld):
    """`DistributedLedger.to_dict`, `epsilons` and `would_exceed` give the numbers of the
    old computation (`_old_figures`); to_dict computes each of the three epsilons once
    (it computed them twice), and the budget check reads the accountant's public method."""
    from dpfl_app.privacy.accounting import AccountingModel

    params = distributed.with_noise(_params(), 1.5, 40.0)
    model = AccountingModel(sampling, 1.5, 100, round(100 * q), 1e-6)
    book = ledger.DistributedLedger(model, params)
    for n in survivors:
        book.compose_round(shares=n)
    book.compose_round(count=withheld, shares=None)
    old = _old_figures(params, model, survivors, withheld, 3)
    block = book.to_dict()
    figures = book.epsilons()
    for key in ("with_sampling", "without_sampling", "client_bound"):
        assert block[key] == old[key], key
        assert figures["rdp" if key == "with_sampling" else key] == old[key], key
    assert book.epsilon_if_secret() == old["with_sampling"]
    assert block["rounds"] == len(survivors) and block["withheld_rounds"] == withheld
    assert book.accountant.epsilon_with_sampling(3) == old["projected"]
    assert book.would_exceed(old["projected"] * (1 - 1e-9), 3)
    assert not book.would_exceed(old["projected"] * (1 + 1e-9), 3)
    calls = []
    real = accounting.epsilon_from_rdp
    monkeypatch.setattr(accounting, "epsilon_from_rdp",
                        lambda *a: calls.append(1) or real(*a))
    assert book.to_dict() == block
    assert len(calls) == 2 + (withheld + len(survivors) > 0)  # with, without, client: once


def test_an_unknown_sampling_is_a_value_error_for_the_calibration_and_the_clients_bound():
    """One function for epsilon at t shares per round: the calibration's amplified figure
    and the clients' own bound refuse an unknown sampling alike (the calibration's raised
    a bare KeyError)."""
    with pytest.raises(ValueError, match="sampling must be one of"):
        ledger.calibrate(4.0, 1e-6, 30, "bernoulli", 0.1, None, 650, 20, 8, 10, 10)
    with pytest.raises(ValueError, match="sampling must be one of"):
        accounting.client_epsilon(_params(), 30, 1e-6, "bernoulli")
