"""Record-level accounting for DP-SGD at each site (no Flower imports).

The privacy unit is one record (one person's example) at one site. Each site
runs DP-SGD (Abadi et al. 2016) on its own data: every local step draws each
record independently with probability q (Poisson sampling), clips each
example's gradient to the clip norm, sums, and adds Gaussian noise with
standard deviation sigma * clip. One step is
``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` under add-or-remove-one
adjacency of records.

The number of steps is a public function of the settings: ``ceil(1/q)`` steps
per local epoch, ``local-epochs`` epochs per round. So a site's epsilon after
r rounds is the composition of ``r * local_epochs * ceil(1/q)`` steps, and
depends on nothing about its data (not even how many records it holds). The
server can therefore state one bound that holds for every record at every
site that trained in every round, and each site can account its own rounds.

Accountants, as for the user-level figure (accountants.py): the headline is
dp_accounting's PLD (pessimistic discretisation, interval max(1e-3,
eps_rdp/2000)), reported as min(PLD, RDP); RDP over dp_accounting's default
orders is shown beside it. Opacus's RDP and PRV accountants give the same
figures (tests/privacy/test_record_level.py).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import asdict, dataclass

import dp_accounting

from .accountants import (PLD_MAX_RDP_EPSILON, PLD_MIN_DISCRETIZATION, RDP_ORDERS,
                          CachedRdpAccountant, PoissonPldAccountant, quiet_absl)
from .calibration import round_up

UNIT = "record"  # the label of every record-level figure: a person's example at one site


def steps_per_epoch(sampling_rate: float) -> int:
    """ceil(1/q) Poisson steps make one expected pass over the data (1/q itself when whole)."""
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {sampling_rate!r}")
    inverse = 1.0 / sampling_rate
    nearest = round(inverse)
    return int(nearest) if abs(inverse - nearest) < 1e-9 * inverse else math.ceil(inverse)


def _real(x, name: str, low: float, high: float, low_open: bool, high_open: bool) -> float:
    ok = isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
    ok = ok and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not ok:
        raise ValueError(f"{name} must be a finite number in {'(' if low_open else '['}{low}, "
                         f"{high}{')' if high_open else ']'}, got {x!r}")
    return float(x)


@dataclass(frozen=True)
class RecordLevelModel:
    """What one site does each round: DP-SGD steps with these public parameters."""

    noise_multiplier: float  # sigma: noise stddev / clip norm on each step's summed gradient
    sampling_rate: float  # q: each record joins each step independently with probability q
    local_epochs: int
    delta: float

    def __post_init__(self):
        object.__setattr__(self, "noise_multiplier", _real(
            self.noise_multiplier, "record noise multiplier", 0, math.inf, False, True))
        object.__setattr__(self, "sampling_rate", _real(
            self.sampling_rate, "record sampling rate", 0, 1, True, False))
        object.__setattr__(self, "delta", _real(self.delta, "record delta", 0, 1, True, True))
        epochs = self.local_epochs
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
            raise ValueError(f"local epochs must be an integer >= 1, got {epochs!r}")
        object.__setattr__(self, "local_epochs", int(epochs))

    @property
    def steps_per_round(self) -> int:
        return self.local_epochs * steps_per_epoch(self.sampling_rate)

    def step_event(self) -> dp_accounting.DpEvent:
        return dp_accounting.PoissonSampledDpEvent(
            self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier))

    def event(self, rounds: int) -> dp_accounting.DpEvent:
        """Every step of `rounds` rounds at one site."""
        return dp_accounting.SelfComposedDpEvent(self.step_event(), rounds * self.steps_per_round)

    def to_dict(self) -> dict:
        return {**asdict(self), "steps_per_epoch": steps_per_epoch(self.sampling_rate),
                "steps_per_round": self.steps_per_round}

    @classmethod
    def from_dict(cls, d: dict) -> "RecordLevelModel":
        return cls(d["noise_multiplier"], d["sampling_rate"], d["local_epochs"], d["delta"])


@functools.lru_cache(maxsize=1024)
def record_epsilon(model: RecordLevelModel, rounds: int, accountant: str = "pld") -> float:
    """Epsilon at model.delta of one record after its site trained `rounds` rounds.

    'pld' is the headline: min(PLD, RDP), both upper bounds; 'rdp' is RDP alone.
    """
    if accountant not in ("pld", "rdp"):
        raise ValueError(f"accountant must be 'pld' or 'rdp', got {accountant!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if rounds == 0:
        return 0.0
    if model.noise_multiplier == 0:
        return math.inf
    with quiet_absl():
        accountant_ = PoissonPldAccountant() if accountant == "pld" else CachedRdpAccountant()
        return float(accountant_.compose(model.event(int(rounds))).get_epsilon(model.delta))


@functools.lru_cache(maxsize=256)
def calibrate_record_noise(target_epsilon: float, delta: float, sampling_rate: float,
                           local_epochs: int, rounds: int) -> float:
    """Smallest sigma (4 significant digits, rounded up) with record epsilon <= target."""
    if not (isinstance(target_epsilon, numbers.Real) and 0 < target_epsilon < math.inf):
        raise ValueError(f"target record epsilon must be a finite number > 0, got {target_epsilon!r}")
    def model(sigma: float) -> RecordLevelModel:
        return RecordLevelModel(float(sigma), sampling_rate, local_epochs, delta)

    def epsilon(sigma: float) -> float:
        return record_epsilon(model(sigma), rounds)

    lo, hi = 1e-3, 1.0
    while epsilon(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"record epsilon {target_epsilon} is out of reach")
    with quiet_absl():
        sigma = dp_accounting.calibrate_dp_mechanism(
            PoissonPldAccountant, lambda s: model(s).event(rounds), target_epsilon, delta,
            dp_accounting.ExplicitBracketInterval(lo, hi), tol=1e-4)
    sigma = round_up(max(sigma, 1e-3))
    while epsilon(sigma) > target_epsilon:  # the search's tolerance may stop just short
        sigma = round_up(sigma * 1.0001 + 1e-9)
    return sigma


def pld_discretization(model: RecordLevelModel, rounds: int) -> float | None:
    """The PLD value discretisation interval behind the headline epsilon, if PLD was used."""
    eps_rdp = record_epsilon(model, rounds, "rdp")
    if rounds == 0 or not math.isfinite(eps_rdp) or eps_rdp > PLD_MAX_RDP_EPSILON:
        return None
    return max(PLD_MIN_DISCRETIZATION, eps_rdp / 2000)


def record_accounting(model: RecordLevelModel, rounds: int) -> dict:
    """Everything a recompute with dp_accounting needs (results.json, `accounting.record_level`)."""
    return {
        "unit": UNIT,
        "adjacency": "add-or-remove-one record at one site",
        **model.to_dict(),
        "rounds": rounds,
        "steps": rounds * model.steps_per_round,
        "step_event": {"type": "PoissonSampledDpEvent", "sampling_probability": model.sampling_rate,
                       "event": {"type": "GaussianDpEvent",
                                 "noise_multiplier": model.noise_multiplier}},
        "composition": "SelfComposedDpEvent(step_event, steps)",
        "neighboring_relation": "ADD_OR_REMOVE_ONE",
        "rdp_orders": list(RDP_ORDERS),
        "pld_value_discretization_interval": pld_discretization(model, rounds),
        "epsilon_rule": "min(pld, rdp)",
        "epsilon": record_epsilon(model, rounds),
        "epsilon_rdp": record_epsilon(model, rounds, "rdp"),
    }


def ledger_epsilon(trained: list[RecordLevelModel], delta: float, accountant: str = "pld") -> float:
    """Epsilon at `delta` of a site that trained one round under each model of `trained`
    (a site's own ledger: normally one model repeated, composed exactly as `record_epsilon`)."""
    counts: dict[RecordLevelModel, int] = {}
    for model in trained:
        key = RecordLevelModel(model.noise_multiplier, model.sampling_rate, model.local_epochs, delta)
        counts[key] = counts.get(key, 0) + 1
    if len(counts) <= 1:
        return next((record_epsilon(m, c, accountant) for m, c in counts.items()), 0.0)
    if any(m.noise_multiplier == 0 for m in counts):
        return math.inf
    events = dp_accounting.ComposedDpEvent([m.event(c) for m, c in counts.items()])
    with quiet_absl():
        accountant_ = PoissonPldAccountant() if accountant == "pld" else CachedRdpAccountant()
        return float(accountant_.compose(events).get_epsilon(delta))
