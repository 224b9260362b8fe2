"""User-level privacy accounting for DP-FedAvg (no Flower imports).

Follows dp_accounting's split: an :class:`AccountingModel` describes *what ran*
each round as a ``DpEvent`` (dp-accounting's event language); accountants interpret it.

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

Calibration lives in `calibration.py`, the accountant classes in
`accountants.py`. Numerical choices: RDP orders are dp_accounting's ``DEFAULT_RDP_ORDERS``. The
PLD discretisation interval is ``max(1e-3, eps_rdp / 2000)``. It is coarser
only where epsilon is already large; this keeps PLD well under 1 s per call.
When ``eps_rdp > 10_000`` the PLD computation is skipped and the RDP bound,
also a valid upper bound, stands in for it.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import asdict, dataclass

import dp_accounting
from dp_accounting.privacy_accountant import NeighboringRelation

from dpfl_app.privacy import SAMPLING_MODES  # noqa: F401  (re-export)
from dpfl_app.privacy.accountants import CachedRdpAccountant, PoissonPldAccountant, quiet_absl

ACCOUNTANTS = ("rdp", "pld")
_ADJACENCY = {"poisson": "add-or-remove-one", "fixed": "replace-one"}


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
        """One round: Poisson-sampled Gaussian, or sampled without replacement (docs/privacy.md)."""
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
    with quiet_absl():
        if accountant == "rdp":
            accountant_ = CachedRdpAccountant(model.neighboring_relation)
        else:
            accountant_ = PoissonPldAccountant()
        return float(accountant_.compose(event).get_epsilon(model.delta))


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

    `noise_secret=False` (deterministic-noise: the noise follows from a seed that
    the run's results record) makes every epsilon inf: anyone with the seed can
    regenerate the noise and subtract it. `epsilon_if_secret` still gives the
    figure the same run would have with secret noise, for comparison only; the
    budget check (`would_exceed`) uses it, so an experiment stops at the round
    a real run would.
    """

    def __init__(self, model: AccountingModel, headline: str = "auto", *, noise_secret: bool = True):
        if not isinstance(model, AccountingModel):
            raise TypeError(f"model must be an AccountingModel, got {type(model).__name__}")
        self.model = model
        self.noise_secret = bool(noise_secret)
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

    def epsilon_if_secret(self, accountant: str | None = None) -> float | None:
        """Epsilon as if the noise were secret; the guarantee only when `noise_secret`."""
        return epsilon_after(self.model, self._rounds, accountant or self.headline)

    def epsilon(self, accountant: str | None = None) -> float | None:
        """The guaranteed epsilon: inf when the noise is reproducible from a known seed."""
        eps = self.epsilon_if_secret(accountant)
        if eps is None or self.noise_secret or self._rounds == 0:
            return eps
        return math.inf

    def epsilons(self) -> dict:
        out = {"rdp": self.epsilon("rdp"), "pld": self.epsilon("pld"), "headline": self.headline}
        if not self.noise_secret:
            out["if_noise_secret"] = self.epsilon_if_secret()
        return out

    def would_exceed(self, max_epsilon: float, extra_rounds: int = 1) -> bool:
        return epsilon_after(self.model, self._rounds + extra_rounds, self.headline) > max_epsilon

    def state_dict(self) -> dict:
        return {"version": 1, "model": self.model.to_dict(), "headline": self.headline,
                "rounds": self._rounds, "noise_secret": self.noise_secret}

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
        if state.get("noise_secret", True) != self.noise_secret:
            raise ValueError("checkpoint differs in whether the noise is secret "
                             f"(saved {state.get('noise_secret', True)}, now {self.noise_secret})")
        self._rounds = int(rounds)

    def to_dict(self) -> dict:
        return {**self.model.to_dict(), "accountant": self.headline, "rounds": self._rounds,
                "noise_secret": self.noise_secret}
