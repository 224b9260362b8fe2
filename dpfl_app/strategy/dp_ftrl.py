"""DP-FTRL: DP-FedAvg's protocol with correlated noise and a participation bound.

Kairouz et al. 2021, "Practical and Private (Deep) Learning without Sampling or
Shuffling", as run in production by Xu et al. 2023 (Gboard). Everything of
`DPFedAvgAdaptive` stays (Flower's clipping mod and clip-norm protocol, reply
screening, the fixed denominator m, the noised count, budget stops, records and
diagnostics); two things change:

* **participation** (`MinSeparationCohorts`): each round's cohort is up to m of
  the online clients that were not asked in the last b - 1 rounds, chosen at
  random among them. No population N and no sampling probability enter the
  accounting: any cohort that respects b is covered. The server counts a
  client as having taken part as soon as it is asked; each client also keeps
  its own record and refuses a request within b rounds (client/participation.py),
  so the bound holds even against a server that breaks this rule;
* **noise** (`privacy.ftrl_release`): round t's clipped sum gets
  z_delta * C_t * (C^-1 z)_t from the banded square-root factorization
  (privacy/matrix_factorization.py), whose last p - 1 noise vectors the server
  keeps in memory.

The accounting is `privacy.ftrl_accounting.FtrlLedger`: one Gaussian mechanism
over the run, with the factorization's sensitivity for k = ceil(T/b) participations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from dpfl_app.privacy import ftrl_accounting, matrix_factorization as mf
from dpfl_app.privacy.ftrl_release import ftrl_release
from dpfl_app.strategy.dp_fedavg import DPFedAvgAdaptive


class MinSeparationCohorts:
    """Cohorts of up to m online clients, none asked within the last b - 1 rounds.

    The same interface as `sampling.SlotSampler` (`sample`, `unslotted`), so the
    strategy and the study engine use either. Each call is the next round.
    """

    def __init__(self, clients_per_round: int, min_separation: int) -> None:
        self.clients_per_round = clients_per_round
        self.min_separation = min_separation
        self.last_round: dict[int, int] = {}  # node id -> the last round it was asked
        self.round = 0
        self.unslotted: set[int] = set()  # nobody is left out for want of a slot

    def eligible(self, online: Iterable[int]) -> list[int]:
        """Online clients allowed in the coming round, in id order."""
        coming = self.round + 1
        return sorted(n for n in set(online)
                      if coming - self.last_round.get(n, -self.min_separation) >= self.min_separation)

    def sample(self, online: Iterable[int], rng: np.random.Generator) -> tuple[set[int], int]:
        """(this round's cohort, number of eligible clients); records the cohort."""
        eligible = self.eligible(online)
        self.round += 1
        take = min(self.clients_per_round, len(eligible))
        chosen = ({eligible[i] for i in rng.choice(len(eligible), size=take, replace=False)}
                  if take else set())
        for node in chosen:
            self.last_round[node] = self.round
        return chosen, len(eligible)


class DPFTRL(DPFedAvgAdaptive):
    """DP-FedAvg's client protocol with DP-FTRL's participation rule and correlated noise."""

    def __init__(self, strategy, split, clients_per_round: int,
                 ledger: ftrl_accounting.FtrlLedger, rng: np.random.Generator, *,
                 noise: mf.CorrelatedNoise, min_separation: int, **kwargs) -> None:
        # The base's slot sampler is replaced: no population, no sampling probability.
        super().__init__(strategy, split, clients_per_round, ledger, rng, sampling="fixed",
                         sampling_population=clients_per_round, **kwargs)
        self.sampler = MinSeparationCohorts(clients_per_round, min_separation)
        self.population = 0  # not part of the guarantee
        self.noise = noise
        self.min_separation = min_separation
        rounds = ledger.model.rounds
        # Std of (C^-1 z)_t per coordinate: the records' noise_std is the real one.
        self._marginal = np.sqrt(np.cumsum(mf.toeplitz_inverse(noise.coefficients, rounds) ** 2))

    def __repr__(self) -> str:
        return "DP-FTRL (banded square-root correlated noise, min-separation), adaptive clipping"

    def summary(self) -> None:
        model = self.ledger.model
        log(INFO, "\t├──> DP-FTRL with adaptive clipping (Kairouz et al. 2021; banded square "
            "root, Kalinin & Lampert 2024):")
        log(INFO, "\t│\t├── noise multiplier z=%.4g (update z_delta=%.4g, clipped count "
            "sigma_b=%.4g), %d band(s), sensitivity %.4g for k=%d participations",
            model.noise_multiplier, model.update_noise_multiplier, model.count_stddev,
            model.bands, model.sensitivity(), model.participations())
        log(INFO, "\t│\t└── cohorts of up to m=%d online clients not asked in the last %d "
            "round(s); no sampling assumption", self.num_sampled_clients,
            self.min_separation - 1)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        diag = self._round_diagnostics
        diag.pop("online_without_slot", None)
        diag["eligible"] = diag.pop("slots_drawn")
        # operator only: who was asked, so anyone can check the min-separation afterwards
        diag["cohort"] = sorted(self._cohort)
        return messages

    def release(self, global_nd, deltas, unclipped, count, clip, m):
        return ftrl_release(global_nd, deltas, unclipped, count, clip, m, self.split,
                            self.noise, self.rng, server_lr=self.server_lr,
                            target_quantile=self.target_quantile, clip_lr=self.clip_norm_lr,
                            step=self.server_optimizer.step if self.server_optimizer else None)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        out = super().aggregate_train(server_round, replies)
        record = self.records[-1]
        t = min(record["round"], len(self._marginal)) - 1
        record["noise_std"] *= float(self._marginal[t])
        return out


def workload_momentum(cfg: dict) -> float:
    """Server momentum is part of the workload (Kalinin & Lampert 2024); Adam is not linear,
    so it gets the prefix-sum factorization."""
    return cfg["server-momentum"] if cfg["server-optimizer"] == "momentum" else 0.0


def choose_ftrl_noise(cfg: dict) -> float:
    """`noise`, or the z that meets `target-epsilon` after `rounds` (one Gaussian, no amplification)."""
    if cfg["target-epsilon"] <= 0:
        return cfg["noise"]
    sens = ftrl_accounting.run_sensitivity(cfg["rounds"], cfg["min-separation"],
                                           workload_momentum(cfg), cfg["ftrl-bands"])
    z = ftrl_accounting.calibrate_noise(cfg["target-epsilon"], cfg["target-delta"], sens)
    log(INFO, "target-epsilon=%s (dp-ftrl): calibrated noise multiplier z=%.6g (replaces "
        "noise=%s)", cfg["target-epsilon"], z, cfg["noise"])
    return z


def build_ftrl_strategy(cfg: dict, noise: float, fedavg, generators,
                        server_optimizer) -> DPFTRL:
    """The DP-FTRL strategy for a validated run config, with its ledger and noise buffer."""
    stddev = cfg["clipped-count-stddev"]
    model, split = ftrl_accounting.build_model(
        noise, cfg["rounds"], cfg["min-separation"], cfg["clients"], cfg["target-delta"],
        workload_momentum(cfg), None if stddev == "auto" else float(stddev), cfg["ftrl-bands"])
    if split.raised:
        log(WARNING, "clipped-count-stddev raised from m/20=%.3f to %.3f so that z_delta <= "
            "1.1 z", split.default_count_stddev, split.count_stddev)
    ledger = ftrl_accounting.FtrlLedger(model, noise_secret=generators.secret)
    strategy = DPFTRL(
        fedavg, split, cfg["clients"], ledger, generators.noise,
        noise=mf.CorrelatedNoise(model.coefficients), min_separation=cfg["min-separation"],
        sampling_rng=generators.sampling, initial_clip=cfg["initial-clip"],
        target_quantile=cfg["target-quantile"], clip_lr=cfg["clip-lr"],
        node_wait_timeout=cfg["node-wait-timeout"], max_epsilon=cfg["max-epsilon"],
        server_lr=cfg["server-lr"], server_optimizer=server_optimizer,
    )
    strategy.announcement = ftrl_announcement(model, cfg["deterministic-noise"])
    return strategy


def ftrl_announcement(model: ftrl_accounting.FtrlModel, deterministic: bool = False) -> dict:
    """What each train message tells the clients: enough to enforce b and recompute epsilon
    (and whether the noise is reproducible from a seed: then the node's epsilon is inf)."""
    return {"dp-mechanism": "dp-ftrl", "dp-sampling": model.sampling, "dp-population": 0,
            "dp-noise": model.noise_multiplier, "dp-rounds": model.rounds,
            "dp-min-separation": model.min_separation, "dp-bands": model.bands,
            "dp-momentum": model.momentum, "dp-clients": model.clients_per_round,
            "dp-delta": model.delta, "dp-secure-aggregation": False,
            "dp-deterministic-noise": bool(deterministic)}


def participation_assumption(model: ftrl_accounting.FtrlModel, online: int) -> str:
    """The participation rule, in words, for the log and privacy.md (and a warning if N is short)."""
    b, m = model.min_separation, model.clients_per_round
    words = (f"Each client takes part at most once every b = {b} round(s), so at most "
             f"k = {model.participations()} times in T = {model.rounds} rounds; the server "
             f"enforces it and every client refuses a request within b rounds of its last. "
             f"No population size N and no random sampling are assumed.")
    if online < m * b:
        log(WARNING, "dp-ftrl: %d clients online at the start, fewer than m*b = %d: cohorts will "
            "be smaller than m=%d once the recent participants are excluded (the noise is "
            "calibrated to the fixed m, so privacy holds; the mean gets noisier)",
            online, m * b, m)
    return words


def epsilon_summary(model: ftrl_accounting.FtrlModel) -> str:
    """One line for the log: epsilon with and without the participation bound."""
    eps = ftrl_accounting.gaussian_epsilon(model.event_noise_multiplier(), model.delta)
    return (f"dp-ftrl: epsilon {eps:.4g} at delta {model.delta:g} after {model.rounds} rounds "
            f"(sensitivity {model.sensitivity():.4g} over k={model.participations()}; "
            f"{model.bands} band(s), server memory {model.bands - 1} model-sized noise vector(s))"
            if math.isfinite(eps) else "dp-ftrl: no noise, epsilon = inf")
