"""Calibration: the noise, or the clients per round, that meet a target epsilon.

Searches go through `dp_accounting.calibrate_dp_mechanism` with the same
accountants that report a run's epsilon, so a calibrated value meets its
target under `accounting.epsilon_after` too. No Flower imports.
"""

from __future__ import annotations

import math
import numbers
from decimal import ROUND_CEILING, Decimal

import dp_accounting
from dp_accounting.privacy_accountant import NeighboringRelation

from dpfl_app.privacy.accountants import CachedRdpAccountant, PoissonPldAccountant, quiet_absl
from dpfl_app.privacy.accounting import AccountingModel, _check_accountant, _is_int


# A calibrated z is returned rounded *up* to this many significant digits, so the
# value printed (with %g or more digits) is the value that meets the target: a
# user who copies "1.691" gets exactly the privacy we checked, never a z rounded
# down to 1.69 that overshoots the target.
SIGNIFICANT_DIGITS = 4


def round_up(x: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """Smallest float of a decimal with `digits` significant digits that is >= x (x > 0)."""
    exponent = math.floor(math.log10(x)) - digits + 1
    up = Decimal(x).scaleb(-exponent).to_integral_value(ROUND_CEILING).scaleb(exponent)
    return float(up)  # >= x: x is a float <= up, and float() rounds to the nearest


def _next_up(x: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """The next decimal of `digits` significant digits above x."""
    exponent = math.floor(math.log10(x)) - digits + 1
    return round_up(x + 10.0 ** exponent * 0.5, digits)


def _make_fresh(sampling: str, accountant: str):
    if accountant == "rdp":
        relation = (NeighboringRelation.ADD_OR_REMOVE_ONE if sampling == "poisson"
                    else NeighboringRelation.REPLACE_ONE)
        return lambda: CachedRdpAccountant(relation)
    if sampling != "poisson":
        raise ValueError("the PLD accountant does not apply to 'fixed' sampling; use accountant='rdp'")
    return PoissonPldAccountant


def _check_target(target_epsilon, rounds):
    if not (isinstance(target_epsilon, numbers.Real) and 0 < target_epsilon < math.inf):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not _is_int(rounds) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")


def _gap(fresh, make_event, target_epsilon, delta):
    def gap(x):
        with quiet_absl():
            return fresh().compose(make_event(x)).get_epsilon(delta) - target_epsilon
    return gap


def calibrate_noise(target_epsilon, delta, rounds, population, clients_per_round,
                    sampling, accountant="rdp", withheld_inputs=0) -> float:
    """Smallest z of SIGNIFICANT_DIGITS significant digits with epsilon <= target after `rounds`.

    Values below 1e-3 are not searched: if z = 1e-3 already meets the target, 1e-3 is returned.
    `withheld_inputs`: the model's W (secure aggregation's withheld sums).
    """
    _check_target(target_epsilon, rounds)
    base = AccountingModel(sampling, 1.0, population, clients_per_round, delta, withheld_inputs)
    accountant = _check_accountant(base, accountant)
    fresh = _make_fresh(sampling, accountant)
    make_event = lambda z: dp_accounting.SelfComposedDpEvent(  # noqa: E731
        base.replace(noise_multiplier=float(z)).round_event(), rounds)
    gap = _gap(fresh, make_event, target_epsilon, delta)
    lo, hi = 1e-3, 1.0
    while gap(hi) > 0:
        lo, hi = hi, hi * 2
        if hi > 2 ** 20:
            raise ValueError(f"no noise multiplier <= 2**20 reaches epsilon {target_epsilon}")
    if gap(lo) <= 0:
        return lo
    with quiet_absl():
        z = float(dp_accounting.calibrate_dp_mechanism(
            fresh, make_event, target_epsilon, delta,
            dp_accounting.ExplicitBracketInterval(lo, hi)))
    short = round_up(z)
    while gap(short) > 0:  # epsilon falls as z grows: a guard against numerical steps
        short = _next_up(short)
    return short


def _calibrate_m(target_epsilon, delta, rounds, population, sampling, accountant, z_of_m, smallest):
    _check_target(target_epsilon, rounds)
    base = AccountingModel(sampling, 1.0, population, 1, delta)
    accountant = _check_accountant(base, accountant)
    fresh = _make_fresh(sampling, accountant)
    make_event = lambda m: dp_accounting.SelfComposedDpEvent(  # noqa: E731
        base.replace(clients_per_round=int(m), noise_multiplier=z_of_m(int(m))).round_event(), rounds)
    gap = _gap(fresh, make_event, target_epsilon, delta)
    good, bad, step = (population, 1, -1) if smallest else (1, population, 1)
    if gap(good) > 0:
        return None
    if gap(bad) <= 0:
        return bad
    with quiet_absl():
        m = int(dp_accounting.calibrate_dp_mechanism(
            fresh, make_event, target_epsilon, delta,
            dp_accounting.ExplicitBracketInterval(1, population), discrete=True))
    while m + step != bad and gap(m + step) <= 0:  # brentq is only within 1 of the optimum
        m += step
    return m


def calibrate_clients(target_epsilon, delta, rounds, population, *, noise_to_clients_ratio,
                      sampling="poisson", accountant="rdp") -> int | None:
    """Smallest m in [1, N] meeting the target when z = m * noise_to_clients_ratio
    (the noise std on the *averaged* update, zC/m, stays fixed; as in McMahan et al. 2018, where noise grows with the cohort).
    None if even m = N does not reach it.

    With z held fixed instead, epsilon *grows* with m; see max_clients_within.
    """
    r = noise_to_clients_ratio
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 < r < math.inf:
        raise ValueError(f"noise_to_clients_ratio must be a finite number > 0, got {r!r}")
    return _calibrate_m(target_epsilon, delta, rounds, population, sampling, accountant,
                        lambda m: m * float(r), smallest=True)


def max_clients_within(target_epsilon, delta, rounds, population, *, noise_multiplier,
                       sampling="poisson", accountant="rdp") -> int | None:
    """Largest m in [1, N] meeting the target at a fixed z (epsilon grows with m/N).
    None if even m = 1 exceeds it."""
    AccountingModel(sampling, noise_multiplier, population, 1, delta)  # validate
    return _calibrate_m(target_epsilon, delta, rounds, population, sampling, accountant,
                        lambda m: float(noise_multiplier), smallest=False)
