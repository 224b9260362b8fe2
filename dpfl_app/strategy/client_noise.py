"""noise-at=clients: SecAgg+ over noised integers modulo 2**b; the server adds no noise.

Distributed DP (Kairouz, Liu & Steinke, ICML 2021; Agarwal, Kairouz & Liu,
NeurIPS 2021). Each round the server draws a public rotation seed and sends it
with the train message, beside the announced parameters (scaled clip, bits,
share variances, threshold t: `privacy.distributed.announcement`). Each
client sends its clipped, rotated, scaled, rounded update and its centred norm
bit, each plus its own Skellam share, modulo 2**b, masked in that ring
(`client/client_noise.py`). The server:

- accepts only inputs of d' + 1 residues below 2**b, packed b bits each;
- releases a sum only when at least t clients' inputs are in it (the clients
  refuse to sign a smaller survivor set, so it could not unmask one anyway);
- reduces the unmasked sum modulo 2**b, takes the centred lift, divides by
  gamma, rotates back (`secagg.discrete.decode`): the noised sum of the clipped
  deltas, and the noised sum of (b_i - 1/2);
- divides by the fixed m and steps, with no noise of its own
  (`mechanism.dp_fedavg_release` with a zero split);
- charges the ledger with the survivors' noise (`DistributedLedger`), or, for a
  withheld sum, releases nothing: the model and the clip norm stay.

Nothing the server holds is an un-noised aggregate: every residue it sees is
masked, and the one sum it unmasks holds every survivor's share.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import replace

from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from dpfl_app.privacy import mechanism
from dpfl_app.privacy.distributed import DistributedDpParams
from dpfl_app.privacy import distributed_ledger
from dpfl_app.privacy.distributed_ledger import ClientNoisePlan, noise_std_on_mean
from dpfl_app.secagg import ROTATION_SEED, discrete, floors
from dpfl_app.strategy.dp_fedavg import ClippedSum
from dpfl_app.strategy.secure_aggregation import SecureDPFedAvgAdaptive

SEED_BYTES = 32


class ClientNoiseDPFedAvg(SecureDPFedAvgAdaptive):
    """`SecureDPFedAvgAdaptive` whose noise the clients add (see the module doc)."""

    def __init__(self, *args, client_noise: DistributedDpParams, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.client_noise = client_noise
        self._seed = b""
        self._released = False
        self._shares = 0

    def __repr__(self) -> str:
        return super().__repr__() + ", Skellam noise added by the clients (noise-at=clients)"

    def encoding(self, clip: float) -> discrete.Encoding:
        """This round's encoding: scale gamma C / C_t, so the integer grid does not move."""
        return discrete.round_encoding(self.client_noise, clip, self._seed,
                                       self._round.round_id if self._round else 0)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid):
        # Public, fresh each round, and drawn before any input exists (the wrap-around bound
        # needs the rotation's signs independent of the inputs).
        self._seed = secrets.token_bytes(SEED_BYTES)
        config[ROTATION_SEED] = self._seed
        self._released, self._shares = False, 0
        return super().configure_train(server_round, arrays, config, grid)

    def read_input(self, vector: np.ndarray, dim: int) -> np.ndarray | None:
        """d' + 1 residues below 2**b, packed b bits each (`discrete.pack`), or None."""
        try:
            return discrete.unpack(vector, self.client_noise.bits, self.client_noise.padded_dim + 1)
        except ValueError:
            return None

    def clipped_sum(self, replies: list[Message], reference: dict[str, np.ndarray],
                    clip: float) -> ClippedSum:
        rnd = self._round
        if rnd is not None:  # the withholding rule: fewer than t survivors, no sum
            rnd.min_survivors = max(rnd.min_survivors, self.client_noise.threshold)
        total = super().clipped_sum(replies, reference, clip)
        self._released = total.released and total.count > 0
        self._shares = total.count if self._released else 0
        return total

    def decode(self, total: np.ndarray, clip: float, dim: int, survivors: int):
        """The centred lift of the sum modulo 2**b, unscaled and rotated back; the noised
        count of unclipped updates as sum(b_i - 1/2) + n/2 (the release subtracts n/2)."""
        bits = self.client_noise.bits
        residues = total & np.uint64(2**bits - 1)
        flat, centred_count = discrete.decode(residues, self.encoding(clip), dim)
        # Operator only: how much of the modulus the noised sum used (near 1: wrap-around
        # likely), and what the decode produced.
        self._round_diagnostics["client_noise"] = {
            "largest_centred": int(np.abs(discrete.centred(residues, bits)).max()),
            "half_modulus": 2 ** (bits - 1), "decoded_values": int(flat.size)}
        return flat, centred_count + survivors / 2

    def release(self, global_nd: list[np.ndarray], deltas: list, unclipped, count: int,
                clip: float, m: int) -> tuple[list[np.ndarray], float | None, float]:
        return self.release_noised_sum(global_nd, deltas, unclipped, count, clip, m,
                                       released=self._released)

    def release_noised_sum(self, global_nd: list[np.ndarray], deltas: list, unclipped,
                           count: int, clip: float, m: int, *, released: bool = True
                           ) -> tuple[list[np.ndarray], float | None, float]:
        """(new model, noised unclipped fraction, next clip norm) from a decoded noised sum.

        `deltas`: the decoded noised sum of the clipped deltas (one entry), and `unclipped`
        the noised sum(b_i - 1/2) + count/2 (`decode`), over `count` contributors. The
        clients' shares are the noise: the server adds none, divides by the fixed m and
        takes its step (`server-optimizer`). A withheld round (`released` False) releases
        nothing: the model and the clip norm stay, and no fraction (None) is released.
        The ServerApp's rounds and the study engine's (tools/study/client_noise.py) both
        release through this method.
        """
        if not released:
            return [np.array(g, copy=True) for g in global_nd], None, clip
        no_server_noise = replace(self.split, noise_multiplier=0.0, update_noise_multiplier=0.0,
                                  count_stddev=0.0)
        return mechanism.dp_fedavg_release(
            global_nd, deltas, unclipped, count, clip, m, no_server_noise, self.rng,
            server_lr=self.server_lr, target_quantile=self.target_quantile,
            clip_lr=self.clip_norm_lr,
            step=self.server_optimizer.step if self.server_optimizer else None)

    def charge_round(self, total: ClippedSum) -> None:
        self.ledger.compose_round(shares=self._shares if self._released else None)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        out = super().aggregate_train(server_round, replies)
        record = self.records[-1]
        record["noise_std"] = noise_std_on_mean(self.client_noise, self._shares,
                                                record["clip_norm"], self.num_sampled_clients)
        record["sum_released"] = self._released
        eps = self.ledger.epsilons()
        record["epsilon_without_sampling"] = eps["without_sampling"]
        record["epsilon_client_bound"] = eps["client_bound"]
        return out


def model_dim(cfg: dict) -> int:
    """d, for a caller that holds no model: builds one (the ServerApp and the study engine
    take d from the model they start from instead: `build.start_strategy`)."""
    from dpfl_app.config import model_spec  # pylint: disable=import-outside-toplevel
    from dpfl_app.task import build_model  # pylint: disable=import-outside-toplevel

    return sum(int(v.numel()) for v in build_model(*model_spec(cfg)).state_dict().values())


def most_contributors(cfg: dict, population: int) -> int:
    """The most inputs a round's sum can hold: m (fixed), or the Poisson cohort's 1e-9 bound."""
    m = cfg["clients"]
    return m if cfg["sampling"] == "fixed" else min(population, floors.poisson_cohort_bound(m))


def plan_for(cfg: dict, population: int, dim: int, noise: float | None = None
             ) -> ClientNoisePlan:
    """The run's shares for a model of `dim` values (`distributed_ledger.run_plan`, the one
    calibration): for `noise`, or (None) calibrated to `target-epsilon` with t survivors
    every round."""
    return distributed_ledger.run_plan(cfg, population, dim, most_contributors(cfg, population),
                                       noise)


def client_noise_ledger(cfg: dict, model, plan: ClientNoisePlan | None = None
                        ) -> distributed_ledger.DistributedLedger:
    """The run's ledger for the clients' shares of `model.noise_multiplier`: `plan` (computed
    once at start-up), or planned here; logs the plan."""
    if plan is None:
        plan = plan_for(cfg, model.population, model_dim(cfg), model.noise_multiplier)
    if plan.split.noise_multiplier != model.noise_multiplier:
        raise ValueError(f"noise-at=clients: the plan's z={plan.split.noise_multiplier} is not "
                         f"the run's z={model.noise_multiplier}")
    p = plan.params
    log(INFO, "noise-at=clients: each client adds Skellam noise of variance %.4g per coordinate "
        "(count: %.4g) to its update, scaled to gamma*C = %.4g and rounded on %d coordinates, "
        "modulo 2^%d (%d bytes per client packed); calibrated for t = %d survivors of m = %d "
        "(noise on the sum: z_delta = %.4g at t, sqrt(m/t) = %.3g times more if all survive); "
        "wrap-around probability per round < 10^%.1f. The server adds no update noise.",
        p.share_variance, p.count_share_variance, p.scale * p.clip, p.padded_dim, p.bits,
        p.bytes_per_client, p.threshold, cfg["clients"], p.noise_multiplier(p.threshold),
        (cfg["clients"] / p.threshold) ** 0.5, plan.log10_wrap_probability)
    return distributed_ledger.DistributedLedger(model, p)
