"""noise-at=clients in the study engine: the clients' discrete pipeline, over a whole cohort.

What each surviving client does in the protocol (`secagg.discrete.encode`),
done here for every row of the cohort's matrix at once: clip the update to
C_t, rotate it (the round's public seed), scale by gamma_t and round under the
norm bound B, by the clients' own `discrete.integer_updates` given the cohort;
add its Skellam share (`privacy.skellam.noise_share`); reduce mod 2**b. The
unmasked sum is the modular sum of those residues; the server's `decode`
(centred lift, unscale, inverse rotation) follows, and the strategy's own release
(`ClientNoiseDPFedAvg.release_noised_sum`: no server noise, the fixed denominator
m, the `server-optimizer` step; a withheld round releases nothing).

Two shortcuts, both exact in distribution and checked by
tests/tools/test_study_client_noise.py: the n survivors' shares are drawn as
one Skellam(n v) vector (Skellam is closed under sums), and the sum of the
residues mod 2**b is taken as the residue of the integer sum (reduction mod
2**b is a ring homomorphism). `shares="each"` draws every client's share, as
the protocol does, for that test.

The noise is the protocol's own: the run config's `noise-at = "clients"`,
`noise-bits` and `noise-threshold` go through the strategy that `build_strategy`
makes for a Flower run, whose `DistributedLedger` holds the parameters the
server announces (`distributed_ledger.run_plan`: each share has variance
v = (z B)^2 / t, z meeting `target-epsilon` with only t survivors every round)
and accounts the rounds. A round with n >= t survivors carries n v, and is
accounted with it; a round with n < t survivors releases nothing.
`remove_excess=True` simulates what Dordis (Jiang et al., EuroSys 2024)
achieves and the protocol does not implement: the survivors' excess noise
removed, so every sum carries exactly t v, accounted as such. It measures what
calibrating for the threshold costs in accuracy.

Adaptive clipping: the grid is fixed in units of the clip, gamma_t = gamma / C_t,
so B, the shares and the modulus stay the same every round.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dpfl_app.privacy import skellam
from dpfl_app.privacy.distributed import DistributedDpParams
from dpfl_app.secagg import discrete

if TYPE_CHECKING:  # the strategy (flwr) is built by the engine
    from dpfl_app.strategy.client_noise import ClientNoiseDPFedAvg

SHARES = ("sum", "each")


@dataclass(frozen=True)
class ClientNoiseOptions:
    """What only a study simulates of noise-at=clients (b and t are run-config keys).

    survival: each cohort member survives to the unmasking with this probability,
    independently of its data; remove_excess: the Dordis-style ideal (module doc);
    shares: "sum" or "each" (module doc).
    """

    survival: float = 1.0
    remove_excess: bool = False
    shares: str = "sum"

    def __post_init__(self):
        checks = [("survival", 0 < self.survival <= 1), ("shares", self.shares in SHARES)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"client noise: {name}={getattr(self, name)!r} is out of range")


def round_seed(seed: int) -> bytes:
    """The public rotation seed of a study run (the protocol's server announces one)."""
    return hashlib.sha256(b"dpfl_app study rotation seed" + int(seed).to_bytes(8, "big")).digest()


def _skellam(size: int, variance: float, rng: np.random.Generator) -> np.ndarray:
    """Skellam of `variance` as a sum of draws the sampler takes (it is closed under sums):
    n shares each within `skellam.MAX_POISSON_MEAN` may sum beyond it."""
    parts = max(1, math.ceil(variance / (2 * skellam.MAX_POISSON_MEAN)))
    return sum(skellam.noise_share(size, variance / parts, rng) for _ in range(parts))


def noised_integer_sum(rounded: np.ndarray, bits_unclipped, params: DistributedDpParams,
                       options: ClientNoiseOptions, noise_rng: np.random.Generator,
                       total_variance: float | None = None) -> np.ndarray:
    """sum_i (q_i + N_i, c_i + n_i) over the survivors, as signed integers (int64, d' + 1).

    Its residue mod 2**b is what the server unmasks (`discrete.to_residues`).
    `total_variance` (per update coordinate) replaces n v for the excess-removal
    ideal; the count's noise is scaled alike.
    """
    n = len(rounded)
    counts = 2 * np.asarray(bits_unclipped, dtype=np.int64) - 1
    if options.shares == "each":  # every client's own share, as in the protocol
        return sum(np.concatenate([
            q + skellam.noise_share(q.size, params.share_variance, noise_rng),
            [c + skellam.noise_share(1, params.count_share_variance, noise_rng)[0]]])
            for q, c in zip(rounded, counts))
    shares = n if total_variance is None else total_variance / params.share_variance
    return np.concatenate([
        rounded.sum(axis=0) + _skellam(rounded.shape[1], shares * params.share_variance,
                                       noise_rng),
        [counts.sum() + _skellam(1, shares * params.count_share_variance, noise_rng)[0]]])


class ClientNoiseRound:
    """Runs a study's rounds with noise-at=clients: the clients' pipeline simulated here,
    the release and the accounting by the strategy the ServerApp builds
    (`ClientNoiseDPFedAvg.release_noised_sum`, its `DistributedLedger`)."""

    def __init__(self, cfg: dict, strategy: ClientNoiseDPFedAvg, dim: int,
                 options: ClientNoiseOptions):
        self.cfg, self.strategy, self.options, self.dim = cfg, strategy, options, dim
        self.ledger, self.rng = strategy.ledger, strategy.rng
        self.params = self.ledger.params  # what the server announces: clip 1, scale gamma C
        self.seed = round_seed(cfg["seed"])
        self.wraps = 0  # coordinates of a released sum that left the modulus

    def step(self, global_flat: np.ndarray, models: np.ndarray, bits: list[int], clip: float,
             server_round: int) -> tuple[np.ndarray, float | None, float, int]:
        """(new model, noised unclipped fraction (None: withheld), next clip, survivors) of
        one round."""
        params = self.params
        alive = self.rng.random(len(models)) < self.options.survival
        survivors = int(alive.sum())
        t = params.threshold
        if survivors < t:  # the protocol releases no sum below the threshold
            (new_model,), fraction, next_clip = self.strategy.release_noised_sum(
                [global_flat], [], 0, 0, clip, self.cfg["clients"], released=False)
            self.ledger.compose_round(shares=None)
            return new_model, fraction, next_clip, survivors
        enc = discrete.round_encoding(params, clip, self.seed, server_round)  # as the clients
        rounded = discrete.integer_updates(
            np.asarray(models, dtype=np.float64)[alive] - global_flat, enc, self.rng)
        total = t * params.share_variance if self.options.remove_excess else None
        signed = noised_integer_sum(rounded, np.asarray(bits)[alive], params, self.options,
                                    self.rng, total)
        residues = discrete.to_residues(signed, params.bits)  # what the server unmasks
        self.wraps += int(np.count_nonzero(discrete.centred(residues, params.bits) != signed))
        noised, centred_count = discrete.decode(residues, enc, self.dim)
        (new_model,), fraction, next_clip = self.strategy.release_noised_sum(
            [global_flat], [[noised]], centred_count + survivors / 2, survivors, clip,
            self.cfg["clients"])
        self.ledger.compose_round(shares=t if self.options.remove_excess else survivors)
        return new_model, fraction, next_clip, survivors

    def summary(self) -> dict:
        """results.json's accounting block (the ledger's, as a Flower run writes it), plus
        the study's own counts."""
        return {**self.ledger.to_dict(),
                "noise_multiplier_at_threshold": self.params.noise_multiplier(self.params.threshold),
                "remove_excess": self.options.remove_excess, "survival": self.options.survival,
                "wrapped_coordinates": self.wraps}
