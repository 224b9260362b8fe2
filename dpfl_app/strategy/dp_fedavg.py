"""DP-FedAvg with adaptive clipping, built on Flower's client-side wrapper.

`DPFedAvgAdaptive` subclasses Flower's
`DifferentialPrivacyClientSideAdaptiveClipping` and keeps its protocol (the
`clipping_norm` config key, `adaptiveclipping_mod` on the clients, the
`norm_bit` metric), but fixes what flwr 1.41 gets wrong (see the README, "What we fix in Flower"):

1. the clip norm moves *toward* the target quantile (Flower's runs backwards);
2. the noise is scaled with C_t, the norm the clients clipped with this round;
3. the mean is unweighted with the fixed denominator m, so dropouts and
   rejected replies never lower the noise below the sensitivity;
4. sigma_b is chosen so that z < 2 sigma_b (no bare ValueError);
and it samples the cohort the way the accountant assumes (Poisson or fixed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import random
import time
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideAdaptiveClipping, FedAvg
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from dpfl_app.privacy import mechanism
from dpfl_app.privacy.accounting import PrivacyLedger
from dpfl_app.strategy.canaries import CanaryAudit
from dpfl_app.strategy.replies import screen_replies

if TYPE_CHECKING:  # torch.optim: imported only when a run builds one
    from dpfl_app.strategy.server_optimizer import ServerOptimizer


class BudgetExhausted(Exception):
    """The next round would take epsilon over `max-epsilon`."""


class NotEnoughNodes(RuntimeError):
    """Fewer SuperNodes connected than the run needs, after a bounded wait."""


def wait_for_nodes(grid: Grid, needed: int, timeout: float) -> list[int]:
    """Connected node ids once at least `needed` are there; never waits forever."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() >= deadline:
            raise NotEnoughNodes(
                f"only {len(nodes)} SuperNode(s) connected after {timeout:.0f}s, but "
                f"clients={needed} are needed per round. Start more SuperNodes, or lower "
                "`clients` (and `node-wait-timeout` to fail sooner)."
            )
        time.sleep(0.5)
    return nodes


class DPFedAvgAdaptive(DifferentialPrivacyClientSideAdaptiveClipping):
    """Correct DP-FedAvg with client-side adaptive clipping (Andrew et al. 2021)."""

    # pylint: disable=too-many-arguments,too-many-instance-attributes
    def __init__(
        self,
        strategy: FedAvg,
        split: mechanism.NoiseSplit,
        clients_per_round: int,
        ledger: PrivacyLedger,
        rng: np.random.Generator,
        *,
        initial_clip: float = 0.1,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        sampling: str = "poisson",
        min_replies: int = 1,
        node_wait_timeout: float = 60.0,
        max_epsilon: float = 0.0,
        server_lr: float = 1.0,
        server_optimizer: ServerOptimizer | None = None,
        noise_scale: float = 1.0,
        sampling_population: int | None = None,
        canaries: CanaryAudit | None = None,
    ) -> None:
        # Flower's base stores the *clipped* target; ours is the unclipped
        # quantile gamma of Andrew et al. The pair is kept consistent.
        super().__init__(
            strategy, split.noise_multiplier, clients_per_round, initial_clip,
            1.0 - target_quantile, clip_lr, split.count_stddev,
        )
        self.split = split
        self.noise_multiplier = split.update_noise_multiplier  # z_delta, as Flower's
        self.target_quantile = target_quantile
        self.ledger = ledger
        self.rng = rng
        self.sampling = sampling
        # The nodes Poisson samples from: the accountant's N, unless a larger
        # deployment is simulated (large_deployment.py), with its noise_scale.
        self.population = sampling_population or ledger.model.population
        self.noise_scale = noise_scale
        self.min_replies = min_replies
        self.node_wait_timeout = node_wait_timeout
        self.max_epsilon = max_epsilon
        self.server_lr = server_lr
        self.server_optimizer = server_optimizer  # None: the plain server-lr step
        self.canaries = canaries  # the privacy audit's canary clients, or None
        self.round_offset = 0  # rounds already run before a resume
        self.records: list[dict] = []  # one per round, only released quantities
        self.current_arrays: ArrayRecord | None = None
        self._round_clip = initial_clip
        self._num_sampled = 0

    def __repr__(self) -> str:
        return "DP-FedAvg, adaptive clipping (Andrew et al. 2021), fixed denominator"

    def summary(self) -> None:
        """Flower's start banner, with what this strategy really does.

        Flower's wrapper prints z_delta unrounded and its FedAvg's "Weighted by:
        'num-examples'"; our mean is unweighted, with the fixed denominator m.
        """
        log(INFO, "\t├──> DP-FedAvg with adaptive clipping (Andrew et al. 2021):")
        log(INFO, "\t│\t├── noise multiplier z=%.4g (update z_delta=%.4g, clipped count "
            "sigma_b=%.4g)", self.split.noise_multiplier, self.split.update_noise_multiplier,
            self.split.count_stddev)
        log(INFO, "\t│\t├── initial clip norm %.4g, target unclipped quantile %.4g, "
            "clip learning rate %.4g", self._round_clip, self.target_quantile,
            self.clip_norm_lr)
        log(INFO, "\t│\t└── %s sampling of m=%d of N=%d clients; unweighted mean of the "
            "clipped updates divided by m (not weighted by num-examples)", self.sampling,
            self.num_sampled_clients, self.population)

    # --- sampling -----------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check the budget, then sample the cohort and send it w_t and C_t."""
        if self.max_epsilon > 0 and self.ledger.would_exceed(self.max_epsilon):
            raise BudgetExhausted(
                f"round {self.round_offset + server_round} would take epsilon from "
                f"{self.ledger.epsilon():.3f} over max-epsilon={self.max_epsilon}"
            )
        self.current_arrays = arrays
        self._round_clip = self.clipping_norm
        server_round += self.round_offset  # clients see the run's round, also after a resume
        config[KEY_CLIPPING_NORM] = self._round_clip
        if self.sampling == "fixed":
            wait_for_nodes(grid, self.num_sampled_clients, self.node_wait_timeout)
            # FedAvg's own sampler (random.sample), seeded from our private RNG.
            random.seed(int(self.rng.integers(2**63)))
            cohort = list(self.strategy.configure_train(server_round, arrays, config, grid))
            self._num_sampled = len(cohort)
            return cohort
        wait_for_nodes(grid, 1, self.node_wait_timeout)
        # Poisson: FedAvg addresses every node; each is kept independently w.p. q.
        q = self.num_sampled_clients / self.population
        messages = sorted(self.strategy.configure_train(server_round, arrays, config, grid),
                          key=lambda msg: msg.metadata.dst_node_id)  # FedAvg shuffles them
        cohort = [msg for msg in messages if self.rng.random() < q]
        log(INFO, "configure_train: Poisson sampling (q=%.3f) kept %d of %d nodes",
            q, len(cohort), len(messages))
        self._num_sampled = len(cohort)
        return cohort

    # --- aggregation ----------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Noised, unweighted mean of clipped updates with the fixed denominator m."""
        assert self.current_arrays is not None, "configure_train must run first"
        replies = list(replies)
        reference = {k: v.numpy() for k, v in self.current_arrays.items()}
        accepted, rejected = screen_replies(replies, reference)
        for bad in rejected:
            log(WARNING, "aggregate_train: rejected reply from node %s: %s",
                bad.node_id, bad.reason)

        clip, m = self._round_clip, self.num_sampled_clients
        global_nd = list(reference.values())
        skipped = len(accepted) < self.min_replies
        new_arrays, unclipped_fraction = None, None
        if skipped:
            log(WARNING, "aggregate_train: %d accepted replies < min-replies=%d; round "
                "skipped, model unchanged (the round is still counted by the accountant)",
                len(accepted), self.min_replies)
        else:
            models, bits = [r.arrays for r in accepted], [r.unclipped for r in accepted]
            if self.canaries is not None:  # audit: sampled canaries join the sum before the noise
                models, bits = self.canaries.join(models, bits, global_nd, clip, self.rng)
            new_model, unclipped_fraction, self.clipping_norm = mechanism.dp_fedavg_step(
                global_nd, models, bits,
                clip, m, self.split, self.rng, server_lr=self.server_lr,
                target_quantile=self.target_quantile, clip_lr=self.clip_norm_lr,
                step=self.server_optimizer.step if self.server_optimizer else None,
                noise_scale=self.noise_scale,
            )
            if self.canaries is not None:
                self.canaries.observe(global_nd, new_model)
            new_arrays = ArrayRecord({k: Array(v) for k, v in zip(reference, new_model)})
            self.current_arrays = new_arrays
        # The noise was calibrated before replies came in: count the round regardless.
        self.ledger.compose_round()
        eps = self.ledger.epsilons()
        record = {
            "round": self.round_offset + server_round,
            "clip_norm": clip,
            "next_clip_norm": self.clipping_norm,
            "noise_std": self.noise_scale * mechanism.update_noise_stddev(self.split, clip) / m,
            "noisy_unclipped_fraction": unclipped_fraction,
            "num_sampled": self._num_sampled,  # the cohort; replies may be fewer
            "num_replies": len(accepted),
            "num_rejected": len(rejected),
            "skipped": skipped,
            "epsilon": eps[eps["headline"]],
            "epsilon_rdp": eps["rdp"],
            "epsilon_pld": eps["pld"],
        }
        self.records.append(record)
        # No MetricRecord: Flower would list these server-side values under
        # "ClientApp-side Train Metrics". The recorder logs and saves them.
        return new_arrays, None

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        """Client-side evaluation: available, but *not* covered by the DP guarantee."""
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            log(INFO, "client-side evaluation (NOT covered by DP): %s", dict(metrics))
            if self.records:
                self.records[-1]["client_eval_not_dp"] = {k: float(v) for k, v in metrics.items()}
        return metrics
