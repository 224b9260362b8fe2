"""User-level privacy accounting for DP-FedAvg (no Flower imports).

Follows dp_accounting's split: an :class:`AccountingModel` describes *what ran*
each round as a ``DpEvent`` (dp-notes section 3); accountants interpret it.

* ``poisson``: each of N clients joins with probability q = m/N and the server
  divides by the fixed m. Add-or-remove-one adjacency. Round event:
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``. RDP and PLD both apply.
  The headline is PLD (tighter; pessimistic discretisation, so still an upper
  bound). RDP is shown as a cross-check.
* ``fixed``: exactly m of N without replacement (Flower's ``random.sample``).
  Replace-one adjacency doubles the sensitivity. Round event:
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z/2))``. Only RDP
  applies, because dp_accounting's PLD has no without-replacement event.
  :class:`CachedRdpAccountant` takes, order by order, the smaller of two
  valid RDP bounds: Wang et al.'s without-replacement bound and the plain
  Gaussian(z/2) bound. The second holds under any sampling, because Renyi
  divergence is jointly quasi-convex. For large m/N (for example 6 of 10)
  Wang's bound is *looser* than no amplification at all. When m == N the two
  coincide.

z is the combined multiplier of the (update, centred count) pair (Andrew et
al. 2021, Thm 1). z == 0 means no noise, and every epsilon is ``inf``.

Numerical choices: RDP orders are dp_accounting's ``DEFAULT_RDP_ORDERS``. The
PLD discretisation interval is ``max(1e-3, eps_rdp / 2000)``. It is coarser
only where epsilon is already large; this keeps PLD well under 1 s per call.
When ``eps_rdp > 10_000`` the PLD computation is skipped and the RDP bound,
also a valid upper bound, stands in for it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
from dataclasses import asdict, dataclass

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation, PrivacyAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon

SAMPLING_MODES = ("poisson", "fixed")
ACCOUNTANTS = ("rdp", "pld")
RDP_ORDERS = tuple(DEFAULT_RDP_ORDERS)
PLD_MIN_DISCRETIZATION = 1e-3
PLD_MAX_RDP_EPSILON = 10_000.0
_ADJACENCY = {"poisson": "add-or-remove-one", "fixed": "replace-one"}


@contextlib.contextmanager
def _quiet_absl():
    """Drop dp_accounting's 'failed to converge ... Excluding this order' noise."""
    logger = logging.getLogger("absl")
    flt = lambda rec: "failed to converge" not in rec.getMessage()  # noqa: E731
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class AccountingModel:
    """Which sampling the server performs, and the parameters of one round."""

    sampling: str
    noise_multiplier: float
    population: int
    clients_per_round: int
    delta: float

    def __post_init__(self):
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        z = self.noise_multiplier
        if isinstance(z, bool) or not isinstance(z, numbers.Real) or not math.isfinite(z) or z < 0:
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {z!r}")
        if not _is_int(self.population) or self.population < 1:
            raise ValueError(f"population must be an integer >= 1, got {self.population!r}")
        m = self.clients_per_round
        if not _is_int(m) or not 1 <= m <= self.population:
            raise ValueError(
                f"clients_per_round must be an integer in [1, population={self.population}], got {m!r}"
            )
        d = self.delta
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0 < d < 1:
            raise ValueError(f"delta must be a number in (0, 1), got {d!r}")
        # Normalise numpy scalars so the model hashes, compares and serialises cleanly.
        object.__setattr__(self, "noise_multiplier", float(z))
        object.__setattr__(self, "population", int(self.population))
        object.__setattr__(self, "clients_per_round", int(m))
        object.__setattr__(self, "delta", float(d))

    @property
    def adjacency(self) -> str:
        return _ADJACENCY[self.sampling]

    @property
    def event_noise_multiplier(self) -> float:
        """Multiplier in the DpEvent: z (add/remove) or z/2 (replace-one, sensitivity 2C)."""
        return self.noise_multiplier if self.sampling == "poisson" else self.noise_multiplier / 2

    @property
    def sampling_probability(self) -> float:
        return self.clients_per_round / self.population

    @property
    def neighboring_relation(self) -> NeighboringRelation:
        if self.sampling == "poisson":
            return NeighboringRelation.ADD_OR_REMOVE_ONE
        return NeighboringRelation.REPLACE_ONE

    def round_event(self) -> dp_accounting.DpEvent:
        """One round, per dp-notes section 3."""
        gaussian = dp_accounting.GaussianDpEvent(self.event_noise_multiplier)
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(self.sampling_probability, gaussian)
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, self.clients_per_round, gaussian
        )

    def replace(self, **changes) -> "AccountingModel":
        return AccountingModel(**{**self._fields(), **changes})

    def _fields(self) -> dict:
        return asdict(self)

    def to_dict(self) -> dict:
        d = self._fields()
        d.update(
            adjacency=self.adjacency,
            event_noise_multiplier=self.event_noise_multiplier,
            sampling_probability=self.sampling_probability,
        )
        return {k: d[k] for k in (
            "sampling", "adjacency", "noise_multiplier", "event_noise_multiplier",
            "population", "clients_per_round", "delta", "sampling_probability")}

    @classmethod
    def from_dict(cls, d: dict) -> "AccountingModel":
        return cls(**{k: d[k] for k in ("sampling", "noise_multiplier", "population",
                                        "clients_per_round", "delta")})


@functools.lru_cache(maxsize=1024)
def _leaf_rdp(event: dp_accounting.DpEvent, relation: NeighboringRelation) -> tuple:
    """Per-order RDP of one occurrence of a non-composite event (cached: events are hashable).

    A without-replacement Gaussian under replace-one gets min(Wang et al. bound,
    unamplified Gaussian bound) per order; anything else is dp_accounting's RDP value.
    """
    fresh = lambda: RdpAccountant(RDP_ORDERS, relation)  # noqa: E731
    with _quiet_absl():
        if (isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent)
                and isinstance(event.event, dp_accounting.GaussianDpEvent)
                and relation == NeighboringRelation.REPLACE_ONE):
            if event.event.noise_multiplier == 0:  # dp_accounting divides by zero here
                return (math.inf,) * len(RDP_ORDERS)
            plain = fresh().compose(event.event).rdp
            if event.sample_size >= event.source_dataset_size:
                return tuple(plain)
            return tuple(np.minimum(fresh().compose(event).rdp, plain))
        return tuple(fresh().compose(event).rdp)


class CachedRdpAccountant(PrivacyAccountant):
    """RDP accountant over RDP_ORDERS that caches per-event RDP vectors.

    Under REPLACE_ONE, each without-replacement Gaussian round is bounded by
    min(Wang et al. bound, unamplified Gaussian bound), order by order. Every
    other event gets dp_accounting's RdpAccountant value unchanged.
    """

    def __init__(self, neighboring_relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE):
        super().__init__(neighboring_relation)
        self._rdp = np.zeros(len(RDP_ORDERS))

    def _maybe_compose(self, event, count, do_compose):
        if isinstance(event, dp_accounting.SelfComposedDpEvent):
            return self._maybe_compose(event.event, event.count * count, do_compose)
        if isinstance(event, dp_accounting.ComposedDpEvent):
            for e in event.events:
                err = self._maybe_compose(e, count, do_compose)
                if err is not None:
                    return err
            return None
        err = RdpAccountant(RDP_ORDERS, self.neighboring_relation)._maybe_compose(event, count, False)
        if err is None and do_compose and count:
            self._rdp = self._rdp + count * np.array(_leaf_rdp(event, self.neighboring_relation))
        return err

    def get_epsilon(self, target_delta: float) -> float:
        return float(compute_epsilon(RDP_ORDERS, self._rdp, target_delta)[0])


class PoissonPldAccountant(PrivacyAccountant):
    """PLD accountant (add-or-remove-one) whose discretisation interval is set from
    the RDP bound of the same events: max(1e-3, eps_rdp / 2000). Returns
    min(PLD, RDP); both are upper bounds. Above eps_rdp = 10_000 it returns the
    RDP bound without building the PLD. epsilon_after and calibration both use
    this class, so a calibrated parameter meets the target under epsilon_after too.
    """

    def __init__(self):
        super().__init__(NeighboringRelation.ADD_OR_REMOVE_ONE)
        self._rdp = CachedRdpAccountant()
        self._events: list = []

    def _maybe_compose(self, event, count, do_compose):
        err = PLDAccountant()._maybe_compose(event, count, False)
        if err is None:
            err = self._rdp._maybe_compose(event, count, False)
        if err is None and do_compose:
            self._rdp.compose(event, count)
            self._events.append((event, count))
        return err

    def get_epsilon(self, target_delta: float) -> float:
        eps_rdp = self._rdp.get_epsilon(target_delta)
        if not math.isfinite(eps_rdp) or eps_rdp > PLD_MAX_RDP_EPSILON:
            return eps_rdp
        pld = PLDAccountant(value_discretization_interval=max(PLD_MIN_DISCRETIZATION, eps_rdp / 2000))
        for event, count in self._events:
            pld.compose(event, count)
        return float(min(pld.get_epsilon(target_delta), eps_rdp))


def _check_accountant(model: AccountingModel, accountant: str | None) -> str:
    if accountant in (None, "auto"):
        return headline_accountant(model)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS} or 'auto', got {accountant!r}")
    return accountant


def headline_accountant(model: AccountingModel) -> str:
    """'pld' for Poisson sampling (tighter), 'rdp' for fixed-size sampling."""
    return "pld" if model.sampling == "poisson" else "rdp"


@functools.lru_cache(maxsize=4096)
def _epsilon(model: AccountingModel, rounds: int, accountant: str) -> float | None:
    if accountant == "pld" and model.sampling == "fixed":
        return None  # dp_accounting's PLD has no sampled-without-replacement event
    if rounds == 0:
        return 0.0
    if model.noise_multiplier == 0:
        return math.inf
    event = dp_accounting.SelfComposedDpEvent(model.round_event(), rounds)
    if accountant == "rdp":
        return CachedRdpAccountant(model.neighboring_relation).compose(event).get_epsilon(model.delta)
    return float(PoissonPldAccountant().compose(event).get_epsilon(model.delta))


def epsilon_after(model: AccountingModel, rounds: int, accountant: str = "rdp") -> float | None:
    """Epsilon at model.delta after `rounds` rounds; None if `accountant` does not apply."""
    if not _is_int(rounds) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    return _epsilon(model, int(rounds), _check_accountant(model, accountant))


def max_rounds_within(model: AccountingModel, max_epsilon: float, limit: int,
                      accountant: str = "auto") -> int:
    """Largest T in [0, limit] with epsilon_after(model, T) <= max_epsilon (binary search)."""
    acc = _check_accountant(model, accountant)
    if not _is_int(limit) or limit < 0:
        raise ValueError(f"limit must be an integer >= 0, got {limit!r}")
    if max_epsilon < 0:
        return 0
    if epsilon_after(model, limit, acc) <= max_epsilon:
        return limit
    lo, hi = 0, limit  # eps(lo) <= max (eps(0) = 0), eps(hi) > max
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if epsilon_after(model, mid, acc) <= max_epsilon else (lo, mid)
    return lo


class PrivacyLedger:
    """Cumulative accounting over rounds; holds the model and the number of rounds composed.

    The headline ("auto") is PLD for Poisson sampling and RDP for fixed-size
    sampling. Epsilon is recomposed from scratch (SelfComposedDpEvent), cached.
    """

    def __init__(self, model: AccountingModel, headline: str = "auto"):
        if not isinstance(model, AccountingModel):
            raise TypeError(f"model must be an AccountingModel, got {type(model).__name__}")
        self.model = model
        self.headline = _check_accountant(model, headline)
        if epsilon_after(model, 1, self.headline) is None:
            raise ValueError(
                f"accountant {self.headline!r} does not apply to {model.sampling!r} sampling; use 'rdp'")
        self._rounds = 0

    @property
    def rounds(self) -> int:
        return self._rounds

    def compose_round(self, count: int = 1) -> None:
        if not _is_int(count) or count < 0:
            raise ValueError(f"count must be an integer >= 0, got {count!r}")
        self._rounds += int(count)

    def epsilon(self, accountant: str | None = None) -> float | None:
        return epsilon_after(self.model, self._rounds, accountant or self.headline)

    def epsilons(self) -> dict:
        return {"rdp": self.epsilon("rdp"), "pld": self.epsilon("pld"), "headline": self.headline}

    def would_exceed(self, max_epsilon: float, extra_rounds: int = 1) -> bool:
        return epsilon_after(self.model, self._rounds + extra_rounds, self.headline) > max_epsilon

    def state_dict(self) -> dict:
        return {"version": 1, "model": self.model.to_dict(), "headline": self.headline,
                "rounds": self._rounds}

    def load_state_dict(self, state: dict) -> None:
        """Restore rounds from a checkpoint. The model must match; the headline may differ."""
        try:
            saved = AccountingModel.from_dict(state["model"])
            rounds = state["rounds"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a PrivacyLedger state: {err!r}") from err
        if saved != self.model:
            diff = {k: (v, getattr(self.model, k)) for k, v in saved._fields().items()
                    if getattr(self.model, k) != v}
            raise ValueError(f"checkpoint was accounted under a different model "
                             f"(field: (saved, current)) {diff}; refusing to load it")
        if not _is_int(rounds) or rounds < 0:
            raise ValueError(f"rounds in state must be an integer >= 0, got {rounds!r}")
        self._rounds = int(rounds)

    def to_dict(self) -> dict:
        return {**self.model.to_dict(), "accountant": self.headline, "rounds": self._rounds}


# ---------------------------------------------------------------- calibration

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
        with _quiet_absl():
            return fresh().compose(make_event(x)).get_epsilon(delta) - target_epsilon
    return gap


def calibrate_noise(target_epsilon, delta, rounds, population, clients_per_round,
                    sampling, accountant="rdp") -> float:
    """Smallest noise multiplier z (to within 1e-6) with epsilon <= target after `rounds`.

    Values below 1e-3 are not searched: if z = 1e-3 already meets the target, 1e-3 is returned.
    """
    _check_target(target_epsilon, rounds)
    base = AccountingModel(sampling, 1.0, population, clients_per_round, delta)
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
    with _quiet_absl():
        return float(dp_accounting.calibrate_dp_mechanism(
            fresh, make_event, target_epsilon, delta,
            dp_accounting.ExplicitBracketInterval(lo, hi)))


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
    with _quiet_absl():
        m = int(dp_accounting.calibrate_dp_mechanism(
            fresh, make_event, target_epsilon, delta,
            dp_accounting.ExplicitBracketInterval(1, population), discrete=True))
    while m + step != bad and gap(m + step) <= 0:  # brentq is only within 1 of the optimum
        m += step
    return m


def calibrate_clients(target_epsilon, delta, rounds, population, *, noise_to_clients_ratio,
                      sampling="poisson", accountant="rdp") -> int | None:
    """Smallest m in [1, N] meeting the target when z = m * noise_to_clients_ratio
    (the noise std on the *averaged* update, zC/m, stays fixed; seed 002's question).
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
