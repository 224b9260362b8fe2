"""DP-FedAvg with adaptive clipping, built on Flower's client-side wrapper.

`DPFedAvgAdaptive` subclasses Flower's
`DifferentialPrivacyClientSideAdaptiveClipping` and keeps its protocol (the
`clipping_norm` config key, `adaptiveclipping_mod` on the clients, the
`norm_bit` metric), but fixes what flwr 1.42 gets wrong (see docs/privacy.md, "What we fix in Flower"):

1. the clip norm moves *toward* the target quantile (Flower's runs backwards);
2. the noise is scaled with C_t, the norm the clients clipped with this round;
3. the mean is unweighted with the fixed denominator m, so dropouts and
   rejected replies never lower the noise below the sensitivity;
4. sigma_b is chosen so that z < 2 sigma_b (no bare ValueError);
and it samples the cohort the way the accountant assumes (Poisson or fixed, over
the N population slots of `sampling.SlotSampler`).

Every round is released, even one with no accepted reply (pure noise): a
skipped round would reveal the un-noised participation. The round is charged
to the ledger, and the ledger stored (`on_round_charged`), before the new
model leaves `aggregate_train`. Exact counts and rejection reasons go to
`diagnostics`, which only the operator may see; `records` hold only what the
DP guarantee covers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO

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
from dpfl_app.strategy.sampling import SlotSampler


@dataclass
class ClippedSum:
    """What the mechanism needs from a round's replies, however they were summed."""

    deltas: list[list[np.ndarray]]  # clipped deltas (or one entry: their sum)
    unclipped: int  # sum of b_i
    count: int  # n, the clients in the sum
    rejected: int  # replies refused by screening, or dropouts of the secure protocol
    # operator-only: {"node_id", "reason"} per refused reply; never in shared files
    reasons: list[dict] = field(default_factory=list)
    # False when a secure sum was withheld: the round releases noise only, and the
    # audit's canaries, which join this sum, are withheld with it
    released: bool = True


def clipped_deltas(models: list, global_nd: list[np.ndarray], clip: float | None) -> list:
    """clip(w_i - w_t, C_t) for each model, as `mechanism.dp_fedavg_step` computes them;
    with `clip` None (no user-level clip: record-level DP alone) the deltas as they are."""
    deltas = [[a - g for a, g in zip(model, global_nd)] for model in models]
    return deltas if clip is None else [mechanism.clip_to_norm(d, clip) for d in deltas]

if TYPE_CHECKING:  # torch.optim: imported only when a run builds one
    from dpfl_app.strategy.server_optimizer import ServerOptimizer


# The `extra` attribute that marks our lines of Flower's start banner: the
# console filter (run/console.py, which strategy/ may not import) keys on it.
BANNER = "flower_banner"


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
        sampling_rng: np.random.Generator,
        initial_clip: float = 0.1,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        sampling: str = "poisson",
        node_wait_timeout: float = 60.0,
        max_epsilon: float = 0.0,
        server_lr: float = 1.0,
        server_optimizer: ServerOptimizer | None = None,
        noise_scale: float = 1.0,
        sampling_population: int | None = None,
        canaries: CanaryAudit | None = None,
        user_level_clip: bool = True,
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
        self.rng = rng  # noise
        self.sampling_rng = sampling_rng  # cohorts; separate, so neither predicts the other
        self.sampling = sampling
        # The nodes sampled from: the accountant's N, unless a larger
        # deployment is simulated (large_deployment.py), with its noise_scale.
        self.population = sampling_population or ledger.model.population
        self.sampler = SlotSampler(self.population, clients_per_round, sampling)
        self.noise_scale = noise_scale
        self.node_wait_timeout = node_wait_timeout
        self.max_epsilon = max_epsilon
        self.server_lr = server_lr
        self.server_optimizer = server_optimizer  # None: the plain server-lr step
        # The mechanism announced in every train message, for the clients' privacy
        # policy (dpfl_app.client.policy); set by the ServerApp.
        self.announcement: dict = {}
        self.canaries = canaries  # the privacy audit's canary clients, or None
        # False (config.user_level_clip_on): record-level DP alone. No C_t is sent, the
        # replies are summed unclipped, and no count of unclipped updates is released.
        self.user_level_clip = user_level_clip
        if not user_level_clip:
            self.clipping_norm = None
        self.round_offset = 0  # rounds already run before a resume
        self.records: list[dict] = []  # one per round, only released quantities
        self.diagnostics: list[dict] = []  # one per round, exact counts: operator only
        self.client_eval: list[dict] = []  # client-side metrics, not DP: not shareable
        # Called after a round is charged and before its model is returned:
        # must store the ledger durably (the server's crash safety).
        self.on_round_charged: Callable[[], None] | None = None
        self.current_arrays: ArrayRecord | None = None
        self._round_clip = self.clipping_norm
        self._cohort: set[int] = set()
        self._round_diagnostics: dict = {}

    def __repr__(self) -> str:
        return "DP-FedAvg, adaptive clipping (Andrew et al. 2021), fixed denominator"

    def summary(self) -> None:
        """Flower's start banner, with what this strategy really does.

        Flower's wrapper prints z_delta unrounded and its FedAvg's "Weighted by:
        'num-examples'"; our mean is unweighted, with the fixed denominator m.
        Shown with Flower's banner, i.e. only with `verbose=true` (run/console.py);
        the ServerApp's config line says the same by default.
        """
        banner = {"extra": {BANNER: True}}
        log(INFO, "\t├──> DP-FedAvg with adaptive clipping (Andrew et al. 2021):", **banner)
        log(INFO, "\t│\t├── noise multiplier z=%.4g (update z_delta=%.4g, clipped count "
            "sigma_b=%.4g)", self.split.noise_multiplier, self.split.update_noise_multiplier,
            self.split.count_stddev, **banner)
        if self.user_level_clip:
            log(INFO, "\t│\t├── initial clip norm %.4g, target unclipped quantile %.4g, "
                "clip learning rate %.4g", self._round_clip, self.target_quantile,
                self.clip_norm_lr, **banner)
        else:
            log(INFO, "\t│\t├── no user-level clip (record-level DP alone)", **banner)
        log(INFO, "\t│\t└── %s sampling of m=%d of N=%d clients; unweighted mean of the "
            "clipped updates divided by m (not weighted by num-examples)", self.sampling,
            self.num_sampled_clients, self.population, **banner)

    # --- sampling -----------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check the budget, then sample the cohort and send it w_t and C_t."""
        if self.max_epsilon > 0 and self.ledger.would_exceed(self.max_epsilon):
            raise BudgetExhausted(
                f"round {self.round_offset + server_round} would take epsilon from "
                f"{self.ledger.epsilon_if_secret():.3f} over max-epsilon={self.max_epsilon}"
            )
        self.current_arrays = arrays
        self._round_clip = self.clipping_norm
        server_round += self.round_offset  # clients see the run's round, also after a resume
        if self.user_level_clip:
            config[KEY_CLIPPING_NORM] = self._round_clip
        for key, value in self.announcement.items():
            config[key] = value
        wait_for_nodes(grid, 1, self.node_wait_timeout)
        # FedAvg (fraction_train=1) addresses every online node; we keep those
        # in the slots drawn this round. The draw never depends on who is online.
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        online = [msg.metadata.dst_node_id for msg in messages]
        self._cohort, slots = self.sampler.sample(online, self.sampling_rng)
        self._round_diagnostics = {
            "round": server_round, "online": len(online), "slots_drawn": slots,
            "num_sampled": len(self._cohort),
            "online_without_slot": sorted(self.sampler.unslotted & set(online)),
        }
        return [msg for msg in messages if msg.metadata.dst_node_id in self._cohort]

    # --- aggregation ----------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Noised, unweighted mean of clipped updates with the fixed denominator m."""
        assert self.current_arrays is not None, "configure_train must run first"
        replies = list(replies)
        reference = {k: v.numpy() for k, v in self.current_arrays.items()}
        clip, m = self._round_clip, self.num_sampled_clients
        total = self.clipped_sum(replies, reference, clip)
        # Always release, also with no accepted reply (pure noise): whether a
        # round moved the model must not depend on un-noised participation.
        global_nd = list(reference.values())
        deltas, unclipped, count = total.deltas, total.unclipped, total.count
        if self.canaries is not None:  # audit: sampled canaries join the sum before the noise
            extra, bits = self.canaries.join([], [], global_nd, clip, self.sampling_rng)
            if not total.released:  # a withheld secure sum withholds theirs too
                extra, bits = [], []
            deltas = deltas + clipped_deltas(extra, global_nd, clip)
            unclipped, count = unclipped + sum(bits), count + len(bits)
        new_model, unclipped_fraction, self.clipping_norm = self.release(
            global_nd, deltas, unclipped, count, clip, m)
        if self.canaries is not None:  # no fraction: no count released (a withheld sum)
            self.canaries.observe(global_nd, new_model, None if unclipped_fraction is None
                                  else (unclipped_fraction - 0.5) * m)
        new_arrays = ArrayRecord({k: Array(v) for k, v in zip(reference, new_model)})
        self.current_arrays = new_arrays
        # Charge the round, durably, before its model leaves this method: a
        # crash after the release must not let a resumed run release it uncounted.
        self.charge_round(total)
        if self.on_round_charged is not None:
            self.on_round_charged()
        eps = self.ledger.epsilons()
        record = {
            "round": self.round_offset + server_round,
            "rounds_accounted": self.ledger.rounds,  # > round after a crash lost a release
            "clip_norm": clip,
            "next_clip_norm": self.clipping_norm,
            "noise_std": 0.0 if clip is None else
                         self.noise_scale * mechanism.update_noise_stddev(self.split, clip) / m,
            "noisy_unclipped_fraction": unclipped_fraction,
            "epsilon": eps[eps["headline"]],
            "epsilon_rdp": eps["rdp"],
            "epsilon_pld": eps["pld"],
        }
        if "if_noise_secret" in eps:  # deterministic-noise: the guarantee above is inf
            record["epsilon_if_noise_secret"] = eps["if_noise_secret"]
        self.records.append(record)
        self.diagnostics.append({
            **self._round_diagnostics, "round": record["round"],
            "num_replies": total.count, "num_rejected": total.rejected,
            "rejected": total.reasons,
        })
        # No MetricRecord: Flower would list these server-side values under
        # "ClientApp-side Train Metrics". The recorder logs and saves them.
        return new_arrays, None

    def charge_round(self, total: ClippedSum) -> None:
        """Compose the round in the ledger (noise-at=clients charges the survivors' noise)."""
        self.ledger.compose_round()

    def release(self, global_nd: list[np.ndarray], deltas: list, unclipped: int, count: int,
                clip: float, m: int) -> tuple[list[np.ndarray], float, float]:
        """The round's noised release and model step (dp-ftrl overrides the noise).

        Without a user-level clip (`clip` None): the plain mean with the fixed denominator
        m, no noise, no count released (fraction and next clip None).
        """
        if clip is None:
            mean = mechanism.noised_mean_update(deltas, m, 0.0, self.rng, global_nd)
            return mechanism.server_step(global_nd, mean, self.server_lr, self.server_optimizer.step
                                         if self.server_optimizer else None), None, None
        return mechanism.dp_fedavg_release(
            global_nd, deltas, unclipped, count,
            clip, m, self.split, self.rng, server_lr=self.server_lr,
            target_quantile=self.target_quantile, clip_lr=self.clip_norm_lr,
            step=self.server_optimizer.step if self.server_optimizer else None,
            noise_scale=self.noise_scale,
        )

    def clipped_sum(self, replies: list[Message], reference: dict[str, np.ndarray],
                    clip: float | None) -> ClippedSum:
        """Sum of clip(delta_i, C_t) and of b_i over the accepted plain replies (no clip
        and no b_i with `clip` None).

        The secure-aggregation strategy overrides this with the unmasked sum.
        """
        accepted, rejected = screen_replies(replies, reference, self._cohort,
                                            norm_bit=clip is not None)
        deltas = clipped_deltas([r.arrays for r in accepted], list(reference.values()), clip)
        return ClippedSum(deltas, sum(r.unclipped for r in accepted), len(accepted),
                          len(rejected),
                          [{"node_id": bad.node_id, "reason": bad.reason} for bad in rejected])

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        """Client-side evaluation: available, but *not* covered by the DP guarantee.

        The metrics are computed on the clients' private data without noise, so
        they go to `client_eval` alone (the run folder's CLIENT_EVAL_FILE, not
        shareable), never to results.json or the log. Returning None keeps
        Flower from logging them too.
        """
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.client_eval.append({"round": self.round_offset + server_round,
                                     **{k: float(v) for k, v in metrics.items()}})
            log(INFO, "client-side evaluation metrics (NOT covered by DP) written to the "
                "run folder's non-shareable client-eval file")
        return None
