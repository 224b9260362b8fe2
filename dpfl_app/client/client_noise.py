"""noise-at=clients on the client: the integer update with this client's Skellam shares.

After Flower's mod clipped w_local - w_global to C_t (and set the norm bit), the
train message's announcement (`privacy.distributed.announcement`) gives
the scaled clip gamma C, the bits b, this client's share variances and the
threshold t; the round's public rotation seed comes with the round. The client
checks that the model has the announced dimension, then (`secagg.discrete.encode`):
clip to C_t, rotate, scale by gamma C / C_t, round under the norm bound B it
computes itself, add its Skellam shares (drawn here from a fresh OS-keyed
ChaCha20 generator: `skellam.noise_share`), and reduce modulo 2**b. The caller
masks the result in the same ring (`secagg.client.masked_input(..., bits)`).

A client's own guarantee (`own_epsilon`): from the announcement alone, t shares
in every announced round and no amplification by sampling
(`distributed_accounting.client_epsilon`). The node logs it once per run.
"""

from __future__ import annotations

import numpy as np

from dpfl_app.client.node_log import node_log
from dpfl_app.privacy import skellam
from dpfl_app.privacy.distributed import announced_params
from dpfl_app.secagg import ROTATION_SEED, discrete

LOGGED_KEY = "client-noise-bound-logged"  # in context.state: the node logged its bound


def requested(config: dict) -> bool:
    return config.get("dp-noise-at") == "clients"


def encode(config: dict, delta: np.ndarray, unclipped: int, clip: float,
           round_number: int) -> tuple[np.ndarray, int]:
    """(residues modulo 2**b of the noised integer update and count, b). ValueError on a
    malformed announcement."""
    params = announced_params(config)
    if delta.size != params.dim:
        raise ValueError(f"the server announced dp-dim={params.dim}, but the model has "
                         f"{delta.size} parameters")
    seed = config.get(ROTATION_SEED)
    if not isinstance(seed, bytes) or len(seed) < 16:
        raise ValueError("the server sent no rotation seed of at least 16 bytes")
    enc = discrete.round_encoding(params, clip, seed, round_number)
    noise = skellam.noise_share(params.padded_dim, params.share_variance)
    count_noise = int(skellam.noise_share(1, params.count_share_variance)[0])
    residues = discrete.encode(delta, unclipped, enc, np.random.default_rng(), noise,
                               count_noise)
    return residues, params.bits


def own_epsilon(config: dict) -> float:
    """This client's epsilon from the announcement alone: t shares, every round, no sampling."""
    from dpfl_app.privacy.distributed_accounting import client_epsilon  # scipy: here only

    return client_epsilon(announced_params(config), int(config["dp-rounds"]),
                          float(config["dp-delta"]), str(config["dp-sampling"]))


def log_own_bound(config: dict, state) -> None:
    """Log this node's own bound once per run (the announcement is the same every round)."""
    if LOGGED_KEY in state.config_records:
        return
    from flwr.app import ConfigRecord  # pylint: disable=import-outside-toplevel

    params = announced_params(config)
    node_log("noise-at=clients: this node adds Skellam noise of variance %.4g per coordinate "
        "(b=%d bits, scaled clip %.4g); with at least t=%d survivors it computes its own "
        "epsilon=%.4g at delta=%g after %s rounds, without amplification by sampling",
        params.share_variance, params.bits, params.scale * params.clip, params.threshold,
        own_epsilon(config), float(config["dp-delta"]), config["dp-rounds"])
    state[LOGGED_KEY] = ConfigRecord({"logged": True})
