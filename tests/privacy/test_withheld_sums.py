"""Secure aggregation withholds a round's sum depending on who took part: accounted.

The exact pair of the issue: D = {w}, D' = {w, u}, every other slot offline.
A cohort of one is never summed, so D releases noise only, always; D' releases
the sum of w and u (norm up to 2C, count up to 1) exactly when both are
sampled. The two releases are (1 - p) N(0) + p N(2C) against N(0), with
p = q^2 (Poisson) or m(m-1)/(N(N-1)) (m of N without replacement): exactly
the privacy loss of `PoissonSampledDpEvent(p, GaussianDpEvent(z/2))`, computed
here with dp_accounting's PLD alone. The ε that a secure-aggregation run
prints (and announces to its clients) must be at least that.
"""

from __future__ import annotations

import dp_accounting as dpa
import pytest
from dp_accounting.pld import PLDAccountant

from dpfl_app.client import policy as client_policy
from dpfl_app.config import validate
from dpfl_app.privacy.accounting import AccountingModel, epsilon_after, withheld_sum_bound
from dpfl_app.strategy.build import build_strategy
from tests.inprocess import default_run_config

DELTA = 1e-5
# N, m, z, T; the table: the epsilon printed on a6424b9, and the exact pair's.
ROWS = [(10, 6, 1.0, 5, 8.38, 18.43), (10, 6, 2.0, 5, 3.29, 5.91),
        (20, 10, 1.5, 10, 5.84, 9.87), (10, 2, 1.0, 20, 6.62, 9.14)]


def exact_pair_epsilon(p: float, z: float, rounds: int) -> float:
    """The pair's epsilon at DELTA: mixture weight p of N(2C) against N(0), z/2 per round.

    A discretisation of 1e-3 and dp_accounting's pessimistic PLD: an upper
    estimate of the pair's true epsilon within ~1e-2, so the comparison below
    is not flattered by discretisation.
    """
    pld = PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(dpa.PoissonSampledDpEvent(p, dpa.GaussianDpEvent(z / 2)), rounds)
    return pld.get_epsilon(DELTA)


def _ledger(sampling: str, n: int, m: int, z: float, rounds: int):
    """The run's ledger, or None when the configuration is refused in one line (the
    issue allows either): secure aggregation's client floors refuse a cohort of m=2."""
    from dpfl_app.errors import ConfigError
    from dpfl_app.secagg import floors

    run_config = default_run_config(**{
        "secure-aggregation": True, "sampling": sampling, "population": n, "clients": m,
        "noise": z, "rounds": rounds, "target-delta": DELTA})
    if m < floors.min_cohort(m):
        with pytest.raises(ConfigError, match=r"secure-aggregation=true needs clients >= \d+"):
            validate(run_config)
        return None
    cfg = validate(run_config)
    ledger = build_strategy(cfg, n, z).ledger  # the run's own ledger
    ledger.compose_round(rounds)
    return ledger


@pytest.mark.parametrize("n,m,z,rounds,old_printed,exact", ROWS)
def test_poisson_secure_epsilon_covers_the_exact_pair(n, m, z, rounds, old_printed, exact):
    assert exact_pair_epsilon((m / n) ** 2, z, rounds) == pytest.approx(exact, abs=0.01)
    ledger = _ledger("poisson", n, m, z, rounds)
    if ledger is None:
        return  # refused before training, with one line
    printed = ledger.epsilon()
    assert printed >= exact  # was old_printed < exact
    # What a client is told is the same figure (its policy must see it too).
    announced = {**client_policy.announcement(ledger.model, rounds, True), "dp-rounds": rounds}
    assert client_policy.announced_epsilon(announced) == pytest.approx(printed, rel=1e-9)


@pytest.mark.parametrize("n,m,z,rounds,_old,_exact", ROWS)
def test_fixed_size_secure_epsilon_covers_the_exact_pair(n, m, z, rounds, _old, _exact):
    both_sampled = m * (m - 1) / (n * (n - 1))
    exact = exact_pair_epsilon(both_sampled, z, rounds)
    ledger = _ledger("fixed", n, m, z, rounds)
    assert ledger is None or ledger.epsilon() >= exact  # None: refused with one line


def test_without_secure_aggregation_nothing_is_withheld_and_epsilon_is_unchanged():
    cfg = validate(default_run_config(**{"population": 10, "clients": 6, "rounds": 5,
                                         "noise": 1.0, "target-delta": DELTA}))
    ledger = build_strategy(cfg, 10, 1.0).ledger
    ledger.compose_round(5)
    assert ledger.model.withheld_inputs == 0
    assert ledger.epsilon() == pytest.approx(8.38, abs=0.01)


def test_the_withheld_sum_bound_is_the_cohort_or_the_floor():
    # Worst case over dropouts: the largest survivor set, every slot under Poisson.
    assert withheld_sum_bound("poisson", 100, 10) == 100
    assert withheld_sum_bound("fixed", 100, 10) == 10
    # A rule "withheld when fewer than F survive" (e.g. no client drops out mid-protocol).
    assert withheld_sum_bound("poisson", 100, 10, survivor_floor=1) == 2
    assert withheld_sum_bound("fixed", 100, 10, survivor_floor=4) == 4


@pytest.mark.parametrize("sampling,base", [("poisson", 1), ("fixed", 2)])
def test_the_event_multiplier_is_z_over_the_largest_sensitivity(sampling, base):
    model = AccountingModel(sampling, 1.2, 50, 5, DELTA)
    assert model.event_noise_multiplier == pytest.approx(1.2 / base)
    withheld = model.replace(withheld_inputs=5)
    assert withheld.sensitivity_multiple == 5
    assert withheld.event_noise_multiplier == pytest.approx(1.2 / 5)
    assert AccountingModel.from_dict(withheld.to_dict()) == withheld
    # Floor 2 under Poisson: exactly the pair's z/2 event, with q (an upper bound of q^2).
    floor = model.replace(withheld_inputs=2)
    assert epsilon_after(floor, 5, "auto") >= exact_pair_epsilon(0.01, 1.2, 5)


def test_the_no_dropout_figure_follows_the_smallest_summed_cohort():
    """Under the no-dropout assumption only the cohort-size floor withholds: W = max(2, F)."""
    from dpfl_app.privacy.accounting import PrivacyLedger

    ledger = PrivacyLedger(AccountingModel("poisson", 1.0, 10, 6, DELTA, withheld_inputs=10))
    ledger.compose_round(5)
    assert ledger.epsilon_if_no_dropout() == pytest.approx(
        epsilon_after(ledger.model.replace(withheld_inputs=2), 5, "pld"))
    assert ledger.epsilon_if_no_dropout() >= exact_pair_epsilon(0.36, 1.0, 5)  # 18.43
    ledger.no_dropout_floor = 4  # e.g. a client floor on the cohort
    assert ledger.epsilon_if_no_dropout() == pytest.approx(
        epsilon_after(ledger.model.replace(withheld_inputs=4), 5, "pld"))
    assert ledger.epsilon_if_no_dropout() <= ledger.epsilon()
