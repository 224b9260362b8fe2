"""DP-FTRL accounting: one Gaussian mechanism over the whole run, no amplification.

No Flower imports. The model (`FtrlModel`) is what ran: T rounds, min-separation
b (each client at most once every b rounds, so at most k = ceil(T/b) times),
the banded square-root factorization C (matrix_factorization.py) and the noise.

Two releases depend on a client's data, each round it takes part:

* the sum of clipped updates, with correlated noise z_delta * C_t * (C^-1 z)_t:
  the Gaussian mechanism on C x with sensitivity sens_t (in units of the clip
  norm; Denisov et al. 2022 show this holds for adaptively chosen inputs, so
  the adaptive clip norm C_t is allowed);
* adaptive clipping's centred count sum (b_i - 1/2), with independent noise
  sigma_b each round (the identity factorization, no amplification): sensitivity
  1/2 per participation, so sqrt(k_t) / 2 over the first t rounds.

Together they are one Gaussian mechanism with
    mu_t^2 = sens_t^2 / z_delta^2 + k_t / (4 sigma_b^2),
i.e. `GaussianDpEvent(1 / mu_t)` under add-or-remove-one adjacency (one client's
every contribution), and epsilon is computed for that single event with
dp_accounting: the analytic Gaussian mechanism's exact epsilon (Balle & Wang 2018,
through dp_accounting's GaussianPrivacyLoss) is the headline; its PLD and RDP
accountants are cross-checks.
The noise multiplier z of the run is defined by mu_T = sens_T / z; the split
(`split_noise`) chooses z_delta and sigma_b so that it holds exactly, as
Andrew et al. (2021, Theorem 1) do for one round. With b = 1 and p = 1 band
this is DP-FedAvg with no amplification: mu_T^2 = T / z^2, the same as T
rounds of Gaussian(z).

Nothing here depends on a population N or a sampling probability.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import dp_accounting
from dp_accounting.pld import PLDAccountant, privacy_loss_mechanism
from dp_accounting.rdp import RdpAccountant

from dpfl_app.privacy import matrix_factorization as mf
from dpfl_app.privacy.accountants import RDP_ORDERS, quiet_absl
from dpfl_app.privacy.calibration import _next_up, round_up
from dpfl_app.privacy.mechanism import NoiseSplit, split_noise as split_one_round

PLD_DISCRETIZATION = 1e-4  # the PLD cross-check's finest value discretisation
ACCOUNTANTS = ("exact", "pld", "rdp")


@dataclass(frozen=True)
class FtrlModel:
    """What ran: the factorization, the participation bound and the noise."""

    noise_multiplier: float  # z: mu_T = sens_T / z
    update_noise_multiplier: float  # z_delta
    count_stddev: float  # sigma_b (0: no count release)
    rounds: int  # T, the run's planned rounds (the factorization's size)
    min_separation: int  # b
    bands: int  # p <= b
    momentum: float  # server momentum in the workload (0: prefix sums)
    clients_per_round: int  # m, the denominator (post-processing only)
    delta: float
    # dp-ftrl refuses secure aggregation, so no release is ever withheld (the
    # AccountingModel's W, read by the shared report and results code).
    withheld_inputs = 0

    def __post_init__(self):
        if not 1 <= self.bands <= min(self.min_separation, self.rounds):
            raise ValueError(f"bands must be in [1, min(min-separation, rounds)], got {self.bands}")

    @property
    def sampling(self) -> str:  # for code and files that name the sampling
        return "min-separation"

    @property
    def coefficients(self) -> tuple[float, ...]:
        return tuple(mf.banded_sqrt(self.rounds, self.bands, self.momentum))

    def participations(self, rounds: int | None = None) -> int:
        return mf.participations(self.rounds if rounds is None else rounds, self.min_separation)

    def sensitivity(self, rounds: int | None = None) -> float:
        t = self.rounds if rounds is None else rounds
        return mf.sensitivity(mf.banded_sqrt(self.rounds, self.bands, self.momentum), t,
                              self.min_separation) if t else 0.0

    def event_noise_multiplier(self, rounds: int | None = None) -> float:
        """1 / mu_t: the multiplier of the single Gaussian event after `rounds` rounds."""
        t = self.rounds if rounds is None else rounds
        if self.update_noise_multiplier == 0:
            return 0.0
        mu2 = (self.sensitivity(t) / self.update_noise_multiplier) ** 2
        if self.count_stddev > 0:
            mu2 += self.participations(t) / (4 * self.count_stddev ** 2)
        return 1 / math.sqrt(mu2)

    def to_dict(self) -> dict:
        return {**asdict(self), "sampling": self.sampling,
                "adjacency": "add-or-remove-one", "coefficients": list(self.coefficients),
                "participations": self.participations(), "sensitivity": self.sensitivity()}

    @classmethod
    def from_dict(cls, d: dict) -> "FtrlModel":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def split_noise(noise_multiplier: float, clients_per_round: int, sensitivity: float,
                participations: int, count_stddev: float | None = None) -> NoiseSplit:
    """z_delta and sigma_b with sens^2 / z_delta^2 + k / (4 sigma_b^2) = sens^2 / z^2.

    That is Andrew et al.'s one-round split with an effective count std
    sigma_b * sens / sqrt(k) (>= sigma_b: the count needs less noise than the
    update, whose correlated sensitivity is larger). Default sigma_b = m / 20,
    raised (with the same rule as DP-FedAvg) until z_delta <= 1.1 z.
    """
    scale = sensitivity / math.sqrt(participations)
    given = None if count_stddev is None else count_stddev * scale
    try:
        split = split_one_round(noise_multiplier, clients_per_round * scale, given)
    except ValueError:
        raise ValueError(
            f"clipped-count-stddev={count_stddev} is too small for noise={noise_multiplier} "
            f"under dp-ftrl: it must be > {noise_multiplier / (2 * scale):.4g}; "
            "leave it 'auto' to choose it") from None
    return NoiseSplit(split.noise_multiplier, split.update_noise_multiplier,
                      split.count_stddev / scale, split.default_count_stddev / scale,
                      split.raised)


def build_model(noise_multiplier: float, rounds: int, min_separation: int, clients_per_round: int,
                delta: float, momentum: float = 0.0, count_stddev: float | None = None,
                bands: int = 0) -> tuple[FtrlModel, NoiseSplit]:
    """The run's model: `bands`, or where 0 those chosen by error (`choose_bands`), and the
    noise split for it."""
    bands = bands or mf.choose_bands(rounds, min_separation, momentum)
    sens = mf.sensitivity(mf.banded_sqrt(rounds, bands, momentum), rounds, min_separation)
    split = split_noise(noise_multiplier, clients_per_round, sens,
                        mf.participations(rounds, min_separation), count_stddev)
    model = FtrlModel(split.noise_multiplier, split.update_noise_multiplier, split.count_stddev,
                      rounds, min_separation, bands, momentum, clients_per_round, delta)
    return model, split


def run_sensitivity(rounds: int, min_separation: int, momentum: float = 0.0,
                    bands: int = 0) -> float:
    """sens_T of the factorization `build_model` would choose (for calibration and planning)."""
    bands = bands or mf.choose_bands(rounds, min_separation, momentum)
    return mf.sensitivity(mf.banded_sqrt(rounds, bands, momentum), rounds, min_separation)


def _exact_delta(noise_multiplier: float, epsilon: float) -> float:
    """delta(epsilon) of one Gaussian mechanism, sensitivity 1 (Balle & Wang 2018), from
    dp_accounting's GaussianPrivacyLoss: exact, both adjacency directions alike."""
    loss = privacy_loss_mechanism.GaussianPrivacyLoss(noise_multiplier, sensitivity=1.0)
    return float(loss.get_delta_for_epsilon(epsilon))


def _smallest(ok, relative: float = 1e-10) -> float:
    """The smallest x > 0 with ok(x), for ok monotone (false, then true), to `relative`,
    from above: doubling finds a bracket, bisection narrows it."""
    lo, hi = 0.0, 1.0
    while not ok(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > relative * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def _exact_epsilon(noise_multiplier: float, delta: float) -> float:
    """The smallest epsilon (to 1e-10 relative, rounded up) with delta(epsilon) <= delta."""
    return _smallest(lambda eps: _exact_delta(noise_multiplier, eps) <= delta)


@functools.lru_cache(maxsize=4096)
def gaussian_epsilon(noise_multiplier: float, delta: float, accountant: str = "exact") -> float:
    """Epsilon of one Gaussian mechanism with this multiplier (sensitivity 1), at delta.

    "exact": the analytic Gaussian mechanism's epsilon (the headline); "pld":
    dp_accounting's PLD accountant (discretisation max(1e-4, eps / 2000), a
    pessimistic approximation); "rdp": its RDP accountant (a looser bound).
    """
    if noise_multiplier == 0:
        return math.inf
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if accountant == "exact":
        return _exact_epsilon(noise_multiplier, delta)
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    with quiet_absl():
        if accountant == "pld":
            interval = max(PLD_DISCRETIZATION, _exact_epsilon(noise_multiplier, delta) / 2000)
            acc = PLDAccountant(value_discretization_interval=interval)
        else:
            acc = RdpAccountant(list(RDP_ORDERS))
        return float(acc.compose(event).get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest z (4 significant digits, rounded up) with epsilon(Gaussian(z / sens)) <= target.

    Bisection on the multiplier s of the single Gaussian: delta(target) falls as s grows.
    """
    if not 0 < target_epsilon < math.inf:
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    multiplier = _smallest(lambda s: _exact_delta(s, target_epsilon) <= delta, 1e-9)
    z = round_up(multiplier * sensitivity)
    while gaussian_epsilon(z / sensitivity, delta) > target_epsilon:
        z = _next_up(z)
    return z


class FtrlLedger:
    """PrivacyLedger's interface for DP-FTRL: epsilon after each round, for the prefix.

    After t of T rounds the release is the first t rows of the factorization,
    a Gaussian mechanism with sensitivity sens_t (first t rounds, k_t =
    ceil(t / b) participations); at t = T it is the run's single Gaussian.
    """

    headline = "exact"

    def __init__(self, model: FtrlModel, *, noise_secret: bool = True):
        self.model = model
        self.noise_secret = bool(noise_secret)
        self._rounds = 0

    @property
    def rounds(self) -> int:
        return self._rounds

    def compose_round(self, count: int = 1) -> None:
        self._rounds += int(count)

    def _epsilon_at(self, rounds: int, accountant: str | None) -> float:
        if rounds == 0:
            return 0.0
        if rounds > self.model.rounds:  # the factorization covers T rounds only
            return math.inf
        return gaussian_epsilon(self.model.event_noise_multiplier(rounds), self.model.delta,
                                accountant or self.headline)

    def epsilon_if_secret(self, accountant: str | None = None) -> float:
        return self._epsilon_at(self._rounds, accountant)

    def epsilon(self, accountant: str | None = None) -> float:
        eps = self.epsilon_if_secret(accountant)
        return eps if self.noise_secret or self._rounds == 0 else math.inf

    def epsilons(self) -> dict:
        out = {"exact": self.epsilon(), "rdp": self.epsilon("rdp"), "pld": self.epsilon("pld"),
               "headline": self.headline}
        if not self.noise_secret:
            out["if_noise_secret"] = self.epsilon_if_secret()
        return out

    def would_exceed(self, max_epsilon: float, extra_rounds: int = 1) -> bool:
        return self._epsilon_at(self._rounds + extra_rounds, None) > max_epsilon

    def state_dict(self) -> dict:
        return {"version": 1, "mechanism": "dp-ftrl", "model": asdict(self.model),
                "rounds": self._rounds, "noise_secret": self.noise_secret}

    def load_state_dict(self, state: dict) -> None:
        if FtrlModel.from_dict(state["model"]) != self.model:
            raise ValueError("checkpoint was accounted under a different DP-FTRL model")
        self._rounds = int(state["rounds"])

    def to_dict(self) -> dict:
        return {**self.model.to_dict(), "accountant": self.headline, "rounds": self._rounds,
                "noise_secret": self.noise_secret}

    def accounting_record(self) -> dict:
        """results.json's `accounting`: enough to recompute epsilon with dp_accounting alone."""
        t = self._rounds
        return {
            **self.to_dict(),
            "mechanism": "dp-ftrl",
            "participations_so_far": self.model.participations(t) if t else 0,
            "sensitivity_so_far": self.model.sensitivity(t) if t else 0.0,
            "event": {"type": "GaussianDpEvent",
                      "noise_multiplier": self.model.event_noise_multiplier(t) if t else None},
            "event_rule": ("1/noise_multiplier^2 = sensitivity_so_far^2 / "
                           "update_noise_multiplier^2 + participations_so_far / "
                           "(4 clipped-count stddev^2), with sensitivity_so_far = sqrt(sum over "
                           "starts 0, b, 2b, ... < rounds of sum_{l < min(bands, rounds - start)} "
                           "coefficients[l]^2)"),
            "composition": "none: one Gaussian mechanism over the rounds so far",
            "neighboring_relation": "ADD_OR_REMOVE_ONE",
            "epsilon_rule": ("exact: the smallest epsilon with dp_accounting's "
                             "GaussianPrivacyLoss(event.noise_multiplier, sensitivity=1)"
                             ".get_delta_for_epsilon(epsilon) <= delta (the analytic Gaussian "
                             "mechanism, Balle & Wang 2018), by bisection to 1e-10"),
            "pld_value_discretization_interval": "max(1e-4, epsilon / 2000)",
            "rdp_orders": list(RDP_ORDERS),
            "epsilon": self.epsilon(),
            "epsilon_rdp": self.epsilon("rdp"),
            "epsilon_pld": self.epsilon("pld"),
        }


def no_amplification_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """DP-FedAvg's epsilon when sampling cannot be verified: T rounds of Gaussian(z)."""
    if noise_multiplier == 0:
        return math.inf
    return gaussian_epsilon(noise_multiplier / math.sqrt(rounds), delta)


def announced_epsilon(config: dict) -> float:
    """Epsilon after the announced T rounds, recomputed by a client from a dp-ftrl train
    message's announcement (dp-noise, dp-rounds, dp-min-separation, dp-bands,
    dp-momentum, dp-delta). z is the combined multiplier, so mu_T = sens_T / z."""
    rounds, b = int(config["dp-rounds"]), int(config["dp-min-separation"])
    bands, momentum = int(config["dp-bands"]), float(config["dp-momentum"])
    z = float(config["dp-noise"])
    if z == 0:
        return math.inf
    sens = mf.sensitivity(mf.banded_sqrt(rounds, bands, momentum), rounds, b)
    return gaussian_epsilon(z / sens, float(config["dp-delta"]))
