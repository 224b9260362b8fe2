"""Canary clients for the one-run privacy audit (Andrew et al., ICLR 2024).

With `audit-canaries` = k > 0 the server simulates k canary clients next to
the real ones. The math (directions, sampling, statistic, the two-Gaussian
epsilon) is in `privacy/audit.py`; this module is the strategy's hook:

* `join` samples this round's canaries exactly as real clients are sampled
  (the same rate m/N, from the same private sampling RNG) and hands each as one
  more client model w_t + C_t u_j, with a norm bit, to `mechanism.dp_fedavg_step`,
  so it is clipped, summed and counted before the noise by the same code
  (its bit: a coin per round, `audit.canary_bits`);
* `observe` takes the released model delta w_{t+1} - w_t and keeps, per canary,
  the largest cosine seen so far; and the released centred count, summed per
  canary with the sign of its coin (the count channel's statistic).

The canaries are drawn by the real clients' sampler (`privacy.sampling.draw`).
Under secure aggregation they join the sum after it is unmasked, and only
when it is released: a withheld round withholds them too. They are not
protocol participants, so they never change whether a sum is withheld.

Canaries do not enlarge N. The accountant's N and q = m/N describe the real
clients, whose sampling is unchanged: their draw still happens exactly as
accounted, and the canaries are drawn from their own k slots at the same rate,
independently (for `fixed`, a fixed-size draw over the canary slots). A real
client's guarantee holds whatever the other members contribute, and canaries
depend on no client's data, so the accounted epsilon is unchanged. The
denominator stays m as well. Sampled canaries therefore move the model by about
k/N more clients' worth of random directions: the audit costs some accuracy.

The directions come from a seed stored in results.json, so anyone can recompute
the statistic; they reveal nothing about real clients. Which canaries joined
which round is drawn from the server's private sampling RNG, like real cohorts,
and is never written.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np

from dpfl_app.privacy import audit


def canary_seed(deterministic_from: int | None) -> int:
    """A fresh OS-random seed, or one derived from the run's seed for experiments."""
    if deterministic_from is None:
        return secrets.randbits(63)
    return int(np.random.SeedSequence([deterministic_from, 2024]).generate_state(1, np.uint64)[0])


def _flat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


class CanaryAudit:
    """k inserted and k unseen canaries, and each one's running maximum cosine."""

    def __init__(self, count: int, seed: int, sampling: str, rate: float) -> None:
        self.count, self.seed, self.sampling, self.rate = count, seed, sampling, rate
        self.max_cosines: np.ndarray | None = None  # 2k values: inserted, then unseen
        self.count_sums: np.ndarray | None = None  # 2k count statistics, the same order
        self.rounds = 0  # released updates observed
        self.joined = 0  # canary contributions summed, over all rounds
        self._directions: audit.CanaryDirections | None = None

    def directions(self, like: Sequence[np.ndarray]) -> audit.CanaryDirections:
        """Directions in the update space of `like` (every array, as the clip sees it)."""
        if self._directions is None:
            dim = sum(int(np.asarray(a).size) for a in like)
            self._directions = audit.CanaryDirections(self.seed, 2 * self.count, dim)
        return self._directions

    def join(self, models: list, bits: list, global_nd: Sequence[np.ndarray], clip: float,
             rng: np.random.Generator) -> tuple[list, list]:
        """The round's client models and norm bits, with the sampled canaries added.

        A canary's update is C_t u_j: norm exactly C_t, on the clip boundary.
        Only the first k directions are ever inserted; the other k stay unseen.
        """
        chosen = audit.sample_canaries(rng, self.count, self.rate, self.sampling)
        coins = audit.canary_bits(self.seed, self.rounds, 2 * self.count)
        bits = list(bits) + [int(coins[j]) for j in chosen]
        self.joined += len(chosen)
        bounds = np.cumsum([0] + [int(np.asarray(g).size) for g in global_nd])
        extra = []
        for u in self.directions(global_nd).rows(chosen):
            step = clip * u
            extra.append([np.asarray(g, dtype=np.float64) + step[lo:hi].reshape(np.shape(g))
                          for g, lo, hi in zip(global_nd, bounds[:-1], bounds[1:])])
        return list(models) + extra, bits

    def observe(self, old: Sequence[np.ndarray], new: Sequence[np.ndarray],
                centred_count: float | None = None) -> None:
        """Update each canary's maximum cosine with the released delta new - old, and,
        given the round's released centred count (b_bar - 1/2) m, its count statistic."""
        cosines = self.directions(old).cosines(_flat(new) - _flat(old))
        self.max_cosines = cosines if self.max_cosines is None else np.maximum(
            self.max_cosines, cosines)
        if centred_count is not None:
            signs = 2.0 * audit.canary_bits(self.seed, self.rounds, 2 * self.count) - 1.0
            self.count_sums = (0.0 if self.count_sums is None else self.count_sums) + (
                signs * centred_count)
        self.rounds += 1

    def summary(self, delta: float, accounted: float, population: int) -> dict:
        """The results.json `audit` block."""
        block = {
            "paper": "Andrew et al., One-shot Empirical Privacy Estimation for Federated "
                     "Learning, ICLR 2024 (arXiv 2302.03098)",
            "canaries": self.count, "unseen_canaries": self.count, "canary_seed": self.seed,
            "sampling": f"{self.sampling}, each canary joins a round with probability "
                        f"{self.rate:.4g} (the real clients' m/N), independently of them",
            "rounds_observed": self.rounds,
            "canaries_per_round": self.joined / self.rounds if self.rounds else 0.0,
            "population_warning": audit.population_warning(self.count, population, self.rate),
            "epsilon": None, "accounted_epsilon": accounted, "verdict": "no round released",
        }
        if self.max_cosines is not None:
            inserted, unseen = self.max_cosines[:self.count], self.max_cosines[self.count:]
            block.update(audit.estimate(inserted, unseen, delta, accounted))
            block["max_cosines"] = {"inserted": [round(float(v), 7) for v in inserted],
                                    "unseen": [round(float(v), 7) for v in unseen]}
        if self.count_sums is not None:  # the clipped-count release, audited on its own
            block["count_channel"] = audit.estimate(
                self.count_sums[:self.count], self.count_sums[self.count:], delta, accounted,
                audit.COUNT_STATISTIC)
        return block

    def state_dict(self) -> dict:
        return {"count": self.count, "seed": self.seed, "rounds": self.rounds,
                "joined": self.joined,
                "max_cosines": None if self.max_cosines is None else self.max_cosines.tolist(),
                "count_sums": None if self.count_sums is None else self.count_sums.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if state["count"] != self.count:
            raise ValueError(f"checkpoint has {state['count']} canaries, run has {self.count}")
        self.seed, self.rounds, self.joined = state["seed"], state["rounds"], state["joined"]
        self._directions = None
        cosines = state["max_cosines"]
        self.max_cosines = None if cosines is None else np.asarray(cosines, dtype=np.float64)
        sums = state.get("count_sums")
        self.count_sums = None if sums is None else np.asarray(sums, dtype=np.float64)
