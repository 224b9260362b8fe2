"""noise-at=clients: the run's Skellam parameters, and a ledger of the survivors' noise.

`run_plan` turns the run's config into the parameters every client gets in the
announcement: the one calibration that the server and the study engine share
(`calibrate` for a target epsilon, `plan` for a given noise multiplier). The
parameters (`distributed.DistributedDpParams`) have clip 1: the scale is the
scaled clip gamma C, so the integer grid, the shares and the accounting are the
same whatever clip norm C_t adaptive clipping reaches; a round encodes with
scale gamma / C_t. The noise multiplier z means what it means with
noise-at=server: Andrew et al.'s split into the update's z_delta and the count's
sigma_b (`mechanism.split_noise`), here reached with t = the threshold survivors
and exceeded by sqrt(n / t) when n > t survive.

`DistributedLedger` is a `PrivacyLedger` for the strategy, the recorder and
the checkpoints; its epsilons come from `distributed_accounting`: each released
round with the noise its n survivors really added, never more. A round whose
sum is withheld (fewer than t survivors, or secrets lost) releases nothing: the
model and the clip norm stay as they were, and under the accountant's adjacency,
which keeps the participants fixed, whether it is withheld depends on
participation only, so it costs nothing (the clients' own bound still counts it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dpfl_app.privacy import distributed_accounting as dacc
from dpfl_app.privacy.accounting import AccountingModel, PrivacyLedger
from dpfl_app.privacy.distributed import (
    DistributedDpParams, ModulusTooSmall, choose_scale, log_wrap_probability)
from dpfl_app.privacy.mechanism import NoiseSplit, split_noise


@dataclass(frozen=True)
class ClientNoisePlan:
    params: DistributedDpParams  # clip 1: scale = gamma C
    split: NoiseSplit  # z, z_delta and sigma_b at the threshold
    contributors: int  # the most clients whose inputs can share a round's sum (wrap bound)

    @property
    def log10_wrap_probability(self) -> float:
        return log_wrap_probability(self.params, self.contributors) / math.log(10)


def noise_threshold(fraction: float, clients_per_round: int) -> int:
    """t = ceil(fraction * m): the fewest survivors whose sum is released (at least 2)."""
    return max(2, math.ceil(fraction * clients_per_round - 1e-9))


def plan(noise: float, count_stddev: float | None, dim: int, bits: int, threshold: int,
         clients_per_round: int, contributors: int) -> ClientNoisePlan:
    """Shares for the combined multiplier `noise` at t survivors, and the largest scale
    whose wrap-around probability stays below 1e-9 per round with `contributors`."""
    split = split_noise(noise, clients_per_round, count_stddev)
    template = DistributedDpParams(clip=1.0, dim=dim, scale=1.0, bits=bits, share_variance=0.0,
                                   count_share_variance=0.0, threshold=threshold)
    params = choose_scale(template, split.update_noise_multiplier, split.count_stddev,
                          contributors)
    return ClientNoisePlan(params, split, contributors)


CALIBRATION_RANGE = (1e-3, 1e4)  # combined z searched


def calibrate(target_epsilon: float, delta: float, rounds: int, sampling: str,
              sampling_probability: float | None, count_stddev: float | None, dim: int,
              bits: int, threshold: int, clients_per_round: int,
              contributors: int) -> ClientNoisePlan:
    """The smallest combined z (1e-4 relative) whose epsilon at t survivors in every round
    meets the target (`distributed_accounting.client_epsilon` at `sampling_probability`),
    with the scale chosen for that z (`plan`).

    epsilon falls as z grows, and a larger z needs a smaller scale to stay in the
    modulus; past some z no scale fits (`choose_scale` raises). So bracket upwards
    from z = 1 by doubling until the target holds, then bisect; every plan returned
    was built, and its epsilon computed, with exactly the z it carries.
    """
    common = (count_stddev, dim, bits, threshold, clients_per_round, contributors)

    def meets(z: float) -> ClientNoisePlan | None:
        trial = plan(z, *common)
        eps = dacc.client_epsilon(trial.params, rounds, delta, sampling, sampling_probability)
        return trial if eps <= target_epsilon else None

    lo, hi = CALIBRATION_RANGE
    z, best = 1.0, None
    while best is None:
        if z > hi:
            raise ValueError(f"noise-at=clients: no noise multiplier up to {hi:g} reaches "
                             f"target-epsilon={target_epsilon}")
        try:
            best = meets(z)
        except ModulusTooSmall as error:  # no scale fits this much noise in 2**bits
            raise ValueError(f"noise-at=clients: target-epsilon={target_epsilon} needs a noise "
                             f"multiplier above {z / 2:.4g}, which {bits} bits cannot hold: "
                             f"raise noise-bits ({error})") from None
        if best is None:
            lo, z = z, 2 * z
    hi = z  # lo: the last z that missed the target (or the range's floor)
    while hi / lo > 1 + 1e-4:
        mid = math.sqrt(lo * hi)
        trial = meets(mid)
        if trial is not None:
            hi, best = mid, trial
        else:
            lo = mid
    return best


def run_plan(cfg: dict, population: int, dim: int, contributors: int,
             noise: float | None = None) -> ClientNoisePlan:
    """A run's shares from its validated run config: the one calibration that the server
    (`strategy.client_noise.plan_for`), and through it the clients' announcement and the
    study engine, use.

    `noise` given: the shares for that combined z; None: calibrated to `target-epsilon`
    with t = `noise_threshold(noise-threshold, m)` survivors every round, amplified by
    the server's sampling at q = m / N (the headline figure), or, with no target
    (`target-epsilon` = 0), for the config's `noise`. The count's sigma_b is
    `clipped-count-stddev`, or ("auto") Andrew et al.'s m/20, raised with z as
    `mechanism.split_noise` does. `contributors`: the most clients whose inputs can
    share a round's sum (the wrap-around bound holds there).
    """
    m = cfg["clients"]
    stddev = cfg["clipped-count-stddev"]
    common = {"count_stddev": None if stddev == "auto" else float(stddev), "dim": dim,
              "bits": cfg["noise-bits"], "threshold": noise_threshold(cfg["noise-threshold"], m),
              "clients_per_round": m, "contributors": contributors}
    if noise is None and cfg["target-epsilon"] <= 0:
        noise = cfg["noise"]
    if noise is not None:
        return plan(noise, **common)
    return calibrate(cfg["target-epsilon"], cfg["target-delta"], cfg["rounds"], cfg["sampling"],
                     m / population, **common)


class DistributedLedger(PrivacyLedger):
    """The survivors' Skellam noise, composed round by round (see the module doc).

    `model` is the run's AccountingModel (sampling, N, m, delta, z): the strategy,
    the recorder and the budget check read it as they do with noise-at=server.
    The headline figure is `with_sampling`; `epsilons` also gives `without_sampling`
    and `client_bound`.
    """

    def __init__(self, model: AccountingModel, params: DistributedDpParams):
        super().__init__(model, "rdp")
        self.params = params
        self.accountant = dacc.DistributedAccountant(params, model.delta, model.sampling,
                                                     model.sampling_probability)
        self.withheld_rounds = 0

    def compose_round(self, count: int = 1, shares: int | None = None) -> None:
        """One round: released with `shares` survivors' noise, or withheld (None)."""
        for _ in range(count):
            if shares is None:
                self.withheld_rounds += 1
            else:
                self.accountant.compose_round(shares)
        self._rounds = len(self.accountant.survivors) + self.withheld_rounds

    def epsilon_if_secret(self, accountant: str | None = None) -> float | None:
        return None if accountant == "pld" else self.accountant.epsilon_with_sampling()

    def epsilon(self, accountant: str | None = None) -> float | None:
        return self.epsilon_if_secret(accountant)

    def epsilons(self) -> dict:
        """The headline (with sampling) and the other two figures; the clients' own bound
        counts every round, withheld ones too."""
        figures = self.accountant.epsilons(client_rounds=self._rounds)
        return {"rdp": figures["with_sampling"], "pld": None, "headline": "rdp",
                "without_sampling": figures["without_sampling"],
                "client_bound": figures["client_bound"]}

    def would_exceed(self, max_epsilon: float, extra_rounds: int = 1) -> bool:
        """With `extra_rounds` more at the threshold (the fewest survivors a sum can hold)."""
        return self.accountant.epsilon_with_sampling(extra_rounds) > max_epsilon

    def state_dict(self) -> dict:
        return {**super().state_dict(), "distributed": {
            "params": self.params.to_dict(), "survivors": list(self.accountant.survivors),
            "withheld_rounds": self.withheld_rounds}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        saved = state.get("distributed")
        if saved is None or saved["params"] != self.params.to_dict():
            raise ValueError("checkpoint was accounted under different client-noise parameters")
        self.accountant.load_state_dict({"survivors": saved["survivors"]})
        self.withheld_rounds = int(saved["withheld_rounds"])
        self._rounds = len(self.accountant.survivors) + self.withheld_rounds

    def to_dict(self) -> dict:
        """results.json's accounting block: the central model's fields, then noise_at and
        the mechanism's parameters (noise per client, bits, scale, the threshold)."""
        block = self.accountant.to_dict(client_rounds=self._rounds)
        return {**super().to_dict(), **block, "withheld_rounds": self.withheld_rounds,
                "noise_per_client": {"share_variance": self.params.share_variance,
                                     "count_share_variance": self.params.count_share_variance},
                "bits": self.params.bits, "scaled_clip": self.params.scale * self.params.clip,
                "threshold": self.params.threshold}

    def accounting_record(self) -> dict:
        """results.json's `accounting` (what `privacy.record` writes for the central ledgers)."""
        return {**self.to_dict(), "mechanism": "skellam, added by the clients",
                "composition": "RDP at integer orders over the released rounds, each with its "
                               "survivors' shares (Agarwal, Kairouz & Liu 2021, Thm 3.5)",
                "headline_figure": "with_sampling"}


def noise_std_on_mean(params: DistributedDpParams, shares: int, clip: float,
                      clients_per_round: int) -> float:
    """The standard deviation of the noise on one coordinate of the released mean."""
    return float(np.sqrt(shares * params.share_variance)) * clip / (
        params.scale * params.clip) / clients_per_round
