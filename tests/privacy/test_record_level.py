"""Record-level accounting (privacy/record_level.py) against Opacus's own accountants.

Opacus accounts DP-SGD as `history = [(noise_multiplier, sample_rate, steps)]`:
its RDP accountant (its own orders and RDP formula) and its PRV accountant
(Gopi et al. 2021) are independent implementations of the same composition
of Poisson-sampled Gaussian steps. Our RDP must agree with Opacus's RDP, and
our headline (PLD, pessimistic discretisation) with its PRV, within the
gap between different order grids and discretisations: 2 %.
"""

from __future__ import annotations

import math

import pytest

from dpfl_app.privacy.record_level import (RecordLevelModel, calibrate_record_noise,
                                           ledger_epsilon, record_accounting, record_epsilon,
                                           steps_per_epoch)

SETTINGS = [  # (sigma, q, local epochs, rounds, delta)
    (1.0, 0.1, 5, 5, 1e-5),  # the feasibility check: 250 steps
    (1.922, 0.1, 5, 5, 1e-5),
    (0.8, 0.2, 2, 10, 1e-6),
]


@pytest.mark.parametrize("rate,steps", [(0.1, 10), (0.25, 4), (0.3, 4), (1.0, 1), (1 / 3, 3),
                                        (0.07, 15)])
def test_steps_per_epoch_is_the_ceiling_of_one_over_q(rate, steps):
    assert steps_per_epoch(rate) == steps


@pytest.mark.parametrize("sigma,q,epochs,rounds,delta", SETTINGS)
def test_epsilon_matches_opacus_rdp_and_prv_accountants(sigma, q, epochs, rounds, delta):
    from opacus.accountants import PRVAccountant, RDPAccountant

    model = RecordLevelModel(sigma, q, epochs, delta)
    steps = rounds * epochs * steps_per_epoch(q)
    rdp, prv = RDPAccountant(), PRVAccountant()
    for accountant in (rdp, prv):
        accountant.history = [(sigma, q, steps)]
    assert record_epsilon(model, rounds, "rdp") == pytest.approx(rdp.get_epsilon(delta), rel=0.02)
    assert record_epsilon(model, rounds) == pytest.approx(prv.get_epsilon(delta), rel=0.02)
    # the headline is the tighter of the two upper bounds, and PLD is tighter here
    assert record_epsilon(model, rounds) < record_epsilon(model, rounds, "rdp")


def test_epsilon_depends_only_on_public_settings_and_grows_with_rounds():
    model = RecordLevelModel(1.0, 0.1, 5, 1e-5)
    eps = [record_epsilon(model, r) for r in range(4)]
    assert eps[0] == 0 and eps == sorted(eps) and len(set(eps)) == 4
    assert record_epsilon(RecordLevelModel(0.0, 0.1, 5, 1e-5), 1) == math.inf


@pytest.mark.parametrize("target", [2.0, 4.0, 8.0])
def test_calibrated_noise_meets_the_target_and_is_the_smallest_at_four_digits(target):
    sigma = calibrate_record_noise(target, 1e-5, 0.1, 5, 5)
    model = RecordLevelModel(sigma, 0.1, 5, 1e-5)
    assert record_epsilon(model, 5) <= target
    below = RecordLevelModel(sigma - 10 ** (math.floor(math.log10(sigma)) - 3), 0.1, 5, 1e-5)
    assert record_epsilon(below, 5) > target


def test_a_ledger_of_one_repeated_model_equals_the_plan_and_mixed_ledgers_compose():
    a, b = RecordLevelModel(1.0, 0.1, 5, 1e-5), RecordLevelModel(2.0, 0.1, 5, 1e-5)
    assert ledger_epsilon([a] * 3, 1e-5) == record_epsilon(a, 3)
    mixed = ledger_epsilon([a, b], 1e-5)
    assert record_epsilon(b, 2) < mixed < record_epsilon(a, 2)
    assert ledger_epsilon([], 1e-5) == 0.0


def test_accounting_record_names_every_input_of_a_recompute():
    rec = record_accounting(RecordLevelModel(1.0, 0.1, 5, 1e-5), 3)
    assert rec["steps"] == 150 and rec["steps_per_round"] == 50 and rec["unit"] == "record"
    assert rec["step_event"]["sampling_probability"] == 0.1
    assert rec["step_event"]["event"]["noise_multiplier"] == 1.0
    assert rec["epsilon"] <= rec["epsilon_rdp"]


@pytest.mark.parametrize("kwargs,word", [
    ({"noise_multiplier": -1.0}, "noise"), ({"sampling_rate": 0.0}, "sampling rate"),
    ({"sampling_rate": 1.5}, "sampling rate"), ({"delta": 1.0}, "delta"),
    ({"local_epochs": 0}, "epochs"), ({"noise_multiplier": math.nan}, "noise"),
])
def test_bad_parameters_are_refused(kwargs, word):
    with pytest.raises(ValueError, match=word):
        RecordLevelModel(**{"noise_multiplier": 1.0, "sampling_rate": 0.1, "local_epochs": 5,
                            "delta": 1e-5, **kwargs})
