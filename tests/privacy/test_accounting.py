"""Tests for dpfl_app.privacy.accounting, against reference values computed with
dp_accounting's RDP and PLD accountants directly (Google's dp-accounting library)."""

import json
import math
import sys
import time
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon

try:
    import dpfl_app  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dpfl_app.privacy.accountants import CachedRdpAccountant  # noqa: E402
from dpfl_app.privacy.accounting import (  # noqa: E402
    AccountingModel,
    PrivacyLedger,
    epsilon_after,
    max_rounds_within,
)
from dpfl_app.privacy.calibration import (  # noqa: E402
    calibrate_clients,
    calibrate_noise,
    max_clients_within,
)

REPLACE_ONE = dpa.NeighboringRelation.REPLACE_ONE

# (N, m, z, T, delta, poisson RDP, poisson PLD, WOR replace-one z/2), computed with dp_accounting
REFERENCE = [
    (100, 10, 1.0, 20, 1e-5, 4.224, 3.591, 24.89),
    (1000, 50, 1.1, 200, 1e-6, 5.043, 4.556, 37.99),
]


def _direct_poisson(n, m, z, t, delta, pld=False):
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(m / n, dpa.GaussianDpEvent(z)), t)
    acct = PLDAccountant(value_discretization_interval=1e-4) if pld else RdpAccountant()
    return acct.compose(event).get_epsilon(delta)


def _direct_wor_rdp(n, m, z, t, delta):
    event = dpa.SelfComposedDpEvent(
        dpa.SampledWithoutReplacementDpEvent(n, m, dpa.GaussianDpEvent(z / 2)), t)
    return RdpAccountant(neighboring_relation=REPLACE_ONE).compose(event).get_epsilon(delta)


@pytest.mark.parametrize("n,m,z,t,delta,rdp,pld,wor", REFERENCE)
def test_reference_values_from_notes(n, m, z, t, delta, rdp, pld, wor):
    poisson = AccountingModel("poisson", z, n, m, delta)
    fixed = AccountingModel("fixed", z, n, m, delta)
    assert epsilon_after(poisson, t, "rdp") == pytest.approx(rdp, rel=1e-2)
    assert epsilon_after(poisson, t, "pld") == pytest.approx(pld, rel=1e-2)
    assert epsilon_after(fixed, t, "rdp") == pytest.approx(wor, rel=1e-2)
    assert epsilon_after(fixed, t, "pld") is None  # PLD has no without-replacement event


@pytest.mark.parametrize("n,m,z,t,delta,rdp,pld,wor", REFERENCE)
def test_matches_independent_dp_accounting_computation(n, m, z, t, delta, rdp, pld, wor):
    poisson = AccountingModel("poisson", z, n, m, delta)
    fixed = AccountingModel("fixed", z, n, m, delta)
    assert epsilon_after(poisson, t, "rdp") == pytest.approx(_direct_poisson(n, m, z, t, delta), rel=1e-9)
    # our PLD uses a 1e-3 grid; the independent one 1e-4
    assert epsilon_after(poisson, t, "pld") == pytest.approx(
        _direct_poisson(n, m, z, t, delta, pld=True), rel=1e-3)
    # here Wang et al.'s WOR bound is tighter than no amplification, so it is used as is
    assert epsilon_after(fixed, t, "rdp") == pytest.approx(_direct_wor_rdp(n, m, z, t, delta), rel=1e-9)


def test_round_events_follow_the_notes_table():
    p = AccountingModel("poisson", 0.8, 200, 20, 1e-6)
    ev = p.round_event()
    assert isinstance(ev, dpa.PoissonSampledDpEvent)
    assert ev.sampling_probability == pytest.approx(0.1)
    assert ev.event == dpa.GaussianDpEvent(0.8)
    assert p.adjacency == "add-or-remove-one" and p.event_noise_multiplier == 0.8
    f = AccountingModel("fixed", 0.8, 200, 20, 1e-6)
    ev = f.round_event()
    assert isinstance(ev, dpa.SampledWithoutReplacementDpEvent)
    assert (ev.source_dataset_size, ev.sample_size) == (200, 20)
    assert ev.event == dpa.GaussianDpEvent(0.4)
    assert f.adjacency == "replace-one" and f.event_noise_multiplier == 0.4
    d = f.to_dict()
    assert set(d) == {"sampling", "adjacency", "noise_multiplier", "event_noise_multiplier",
                      "population", "clients_per_round", "delta", "sampling_probability"}
    assert json.loads(json.dumps(d)) == d


def test_tff_tutorial_setting():
    # TFF tutorial: z = 1.2, 120 of 3383 clients per round, 100 rounds, Poisson, delta = 1e-5,
    # stated as (2, 1e-5)-DP. Measured with dp-accounting 0.6.0: RDP 1.9861, PLD 1.7075.
    model = AccountingModel("poisson", 1.2, 3383, 120, 1e-5)
    rdp, pld = epsilon_after(model, 100, "rdp"), epsilon_after(model, 100, "pld")
    assert 1.95 < rdp <= 2.0
    assert rdp == pytest.approx(1.9861, abs=1e-3)
    assert pld == pytest.approx(1.7075, abs=2e-3)
    # 120 is exactly the largest cohort at z = 1.2 that stays within epsilon 2 (RDP)
    assert max_clients_within(2, 1e-5, 100, 3383, noise_multiplier=1.2) == 120
    assert epsilon_after(model.replace(clients_per_round=121), 100, "rdp") > 2


def test_the_default_setting_is_not_private_under_any_model():
    # N = 10, m = 6, z = 0.3, 5 rounds, delta = 1e-5
    p = AccountingModel("poisson", 0.3, 10, 6, 1e-5)
    f = AccountingModel("fixed", 0.3, 10, 6, 1e-5)
    no_amp = RdpAccountant().compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(0.3), 5)).get_epsilon(1e-5)
    assert no_amp == pytest.approx(61.87, abs=0.05)  # a single Gaussian release per round, no amplification: about 62
    assert epsilon_after(p, 5, "rdp") == pytest.approx(55.09, abs=0.05)
    assert epsilon_after(p, 5, "pld") == pytest.approx(51.68, abs=0.05)
    assert epsilon_after(f, 5, "rdp") == pytest.approx(180.48, abs=0.05)
    assert min(epsilon_after(p, 5, "pld"), epsilon_after(f, 5, "rdp")) > 20


def test_fixed_sampling_takes_the_tighter_valid_bound_per_order():
    # For large m/N, Wang et al.'s WOR bound is looser than no amplification at all:
    # N=10, m=6, z=0.3, 5 rounds: WOR 230.7, Gaussian(z/2) under replace-one 180.5.
    n, m, z, t, delta = 10, 6, 0.3, 5, 1e-5
    wor_ev = dpa.SampledWithoutReplacementDpEvent(n, m, dpa.GaussianDpEvent(z / 2))
    wor = RdpAccountant(neighboring_relation=REPLACE_ONE).compose(wor_ev).rdp
    plain = RdpAccountant(neighboring_relation=REPLACE_ONE).compose(dpa.GaussianDpEvent(z / 2)).rdp
    expected = compute_epsilon(DEFAULT_RDP_ORDERS, t * np.minimum(wor, plain), delta)[0]
    ours = epsilon_after(AccountingModel("fixed", z, n, m, delta), t, "rdp")
    assert ours == pytest.approx(expected, rel=1e-9)
    assert ours < _direct_wor_rdp(n, m, z, t, delta) - 40
    # m == N: every client every round is a plain Gaussian(z/2) under replace-one
    full = epsilon_after(AccountingModel("fixed", z, n, n, delta), t, "rdp")
    gauss = RdpAccountant(neighboring_relation=REPLACE_ONE).compose(
        dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z / 2), t)).get_epsilon(delta)
    assert full == pytest.approx(gauss, rel=1e-9)
    # m == N under Poisson: q = 1
    no_amp = RdpAccountant().compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), t)).get_epsilon(delta)
    assert epsilon_after(AccountingModel("poisson", z, n, n, delta), t, "rdp") == pytest.approx(no_amp, rel=1e-9)


@pytest.mark.parametrize("kwargs,field", [
    (dict(sampling="uniform"), "sampling"),
    (dict(noise_multiplier=-0.1), "noise_multiplier"),
    (dict(noise_multiplier=math.inf), "noise_multiplier"),
    (dict(population=0), "population"),
    (dict(population=10.0), "population"),
    (dict(clients_per_round=0), "clients_per_round"),
    (dict(clients_per_round=11), "clients_per_round"),
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
])
def test_model_validation_names_the_field(kwargs, field):
    args = dict(sampling="poisson", noise_multiplier=1.0, population=10, clients_per_round=5, delta=1e-5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        AccountingModel(**args)


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_ledger_monotone_and_would_exceed(sampling):
    ledger = PrivacyLedger(AccountingModel(sampling, 1.0, 100, 10, 1e-5))
    assert ledger.headline == ("pld" if sampling == "poisson" else "rdp")
    assert ledger.epsilon() == 0.0
    eps = []
    for _ in range(10):
        ledger.compose_round()
        eps.append(ledger.epsilon())
    assert ledger.rounds == 10
    assert all(b > a for a, b in zip(eps, eps[1:]))
    assert ledger.epsilon() == epsilon_after(ledger.model, 10, ledger.headline)
    e11 = epsilon_after(ledger.model, 11, ledger.headline)
    assert ledger.would_exceed((eps[-1] + e11) / 2) is True
    assert ledger.would_exceed(e11 + 1e-9) is False
    assert ledger.would_exceed(e11 + 1e-9, extra_rounds=5) is True
    assert ledger.rounds == 10  # would_exceed does not compose
    d = ledger.epsilons()
    assert d["headline"] == ledger.headline and d["rdp"] >= ledger.epsilon()
    assert (d["pld"] is None) == (sampling == "fixed")
    assert ledger.to_dict()["rounds"] == 10 and ledger.to_dict()["accountant"] == ledger.headline
    assert max_rounds_within(ledger.model, eps[4], 50) == 5


def test_ledger_state_dict_round_trip_and_mismatch():
    model = AccountingModel("fixed", 0.7, 50, 5, 1e-6)
    ledger = PrivacyLedger(model)
    ledger.compose_round(7)
    state = json.loads(json.dumps(ledger.state_dict()))
    restored = PrivacyLedger(AccountingModel("fixed", 0.7, 50, 5, 1e-6))
    restored.load_state_dict(state)
    assert restored.rounds == 7 and restored.epsilon() == ledger.epsilon()
    for other in (model.replace(noise_multiplier=0.71), model.replace(sampling="poisson"),
                  model.replace(clients_per_round=6), model.replace(delta=1e-5)):
        with pytest.raises(ValueError, match="different model"):
            PrivacyLedger(other).load_state_dict(state)
    with pytest.raises(ValueError):
        restored.load_state_dict({"rounds": 3})


def test_zero_noise_is_infinite_epsilon_without_crashing():
    for sampling in ("poisson", "fixed"):
        for m in (6, 10):
            ledger = PrivacyLedger(AccountingModel(sampling, 0.0, 10, m, 1e-5))
            ledger.compose_round()
            assert ledger.epsilon() == math.inf
            assert ledger.epsilon("rdp") == math.inf
            assert ledger.would_exceed(1e9)
    assert PrivacyLedger(AccountingModel("fixed", 0.0, 10, 6, 1e-5)).epsilon("pld") is None
    # the accountant itself (used by calibration) must not divide by zero either
    wor0 = dpa.SampledWithoutReplacementDpEvent(10, 6, dpa.GaussianDpEvent(0.0))
    assert CachedRdpAccountant(REPLACE_ONE).compose(wor0).get_epsilon(1e-5) == math.inf
    with pytest.raises(ValueError):
        PrivacyLedger(AccountingModel("fixed", 1.0, 10, 6, 1e-5), headline="pld")


@pytest.mark.parametrize("sampling,accountant,n,m,t,target", [
    ("poisson", "rdp", 100, 10, 20, 2.0),
    ("poisson", "pld", 100, 10, 20, 2.0),
    ("fixed", "rdp", 10, 6, 5, 8.0),
])
def test_calibrate_noise_is_smallest_meeting_target(sampling, accountant, n, m, t, target):
    z = calibrate_noise(target, 1e-5, t, n, m, sampling, accountant)
    model = AccountingModel(sampling, z, n, m, 1e-5)
    assert epsilon_after(model, t, accountant) <= target
    assert epsilon_after(model.replace(noise_multiplier=z * (1 - 1e-3)), t, accountant) > target


def test_calibrate_clients_for_noise_that_grows_with_the_cohort():
    # a planning example (McMahan et al. 2018; docs/privacy.md's, with δ=1e-4): N=50000, z = 0.005*m,
    # delta=1e-4, target eps 2, 100 rounds, Poisson, RDP
    m = calibrate_clients(2, 1e-4, 100, 50000, noise_to_clients_ratio=0.005)
    assert m == 124
    base = AccountingModel("poisson", 0.62, 50000, 124, 1e-4)
    assert epsilon_after(base, 100, "rdp") == pytest.approx(1.9697, abs=1e-3)
    assert epsilon_after(base.replace(clients_per_round=123, noise_multiplier=123 * 0.005), 100) > 2
    # unreachable: the ratio is too small even with everyone every round
    assert calibrate_clients(8, 1e-5, 5, 10, noise_to_clients_ratio=0.05) is None


def test_pld_is_fast_enough():
    model = AccountingModel("poisson", 1.0987, 1000, 50, 1e-6)  # fresh model: not cached
    start = time.perf_counter()
    epsilon_after(model, 200, "pld")
    assert time.perf_counter() - start < 2.0


def test_ledger_with_reproducible_noise_guarantees_nothing():
    """deterministic-noise: the seed is published, so epsilon is inf; the secret-noise
    figure stays available (labelled) and drives the budget check."""
    model = AccountingModel("poisson", 1.0, 100, 10, 1e-5)
    ledger = PrivacyLedger(model, noise_secret=False)
    assert ledger.epsilon() == 0.0  # nothing released yet
    ledger.compose_round(20)
    secret = epsilon_after(model, 20, "pld")
    assert ledger.epsilon() == ledger.epsilon("rdp") == math.inf
    assert ledger.epsilons() == {"rdp": math.inf, "pld": math.inf, "headline": "pld",
                                 "if_noise_secret": secret}
    assert ledger.epsilon_if_secret() == secret
    assert not ledger.would_exceed(epsilon_after(model, 21, "pld"))
    assert ledger.to_dict()["noise_secret"] is False
    fresh = PrivacyLedger(model)
    with pytest.raises(ValueError, match="secret"):
        fresh.load_state_dict(ledger.state_dict())
