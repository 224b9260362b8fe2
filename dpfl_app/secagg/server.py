"""The server's side of SecAgg+: who talks to whom, which shares to ask for, the sum.

`ServerRound` keeps the sets of Bonawitz et al. (2017): U1 (sent keys), U2
(shared keys), U3 (sent a masked input), U4 (answered the unmasking). The
round yields the sum of U3's inputs only when at least `min_survivors` sent
one and every needed secret can be rebuilt from >= t shares: the self-mask
seed of each client in U3 and the masking key of each client in U2 minus U3.
Otherwise `unmasked_sum` returns None and the caller releases noise only,
never a partial sum.

The server never asks one client for both shares of another, and asks for a
client's seed shares only if it is in U3 and for its key shares only if it is
not: `unmask_requests` builds the two lists from disjoint sets by construction.
"""

from __future__ import annotations

import random

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from dpfl_app.secagg import graph, masks
from dpfl_app.secagg.client import secret_key_from_bytes


class ServerRound:
    """One round's bookkeeping. Clients are named by their index 1..n."""

    def __init__(self, round_id: int, cohort_size: int, requested_neighbours: int,
                 rng: random.Random | None = None) -> None:
        self.round_id = round_id
        self.indices = list(range(1, cohort_size + 1))
        k = graph.neighbours_per_client(requested_neighbours, cohort_size)
        self.threshold = graph.threshold(k)
        # A sum of one input is that input: at least two, and at least t, must survive.
        self.min_survivors = max(2, self.threshold)
        self.neighbours = graph.neighbourhoods(self.indices, k, rng or random.SystemRandom())
        self.public_keys: dict[int, tuple[bytes, bytes]] = {}  # U1: (c_pk, s_pk)
        self.inbox: dict[int, dict[int, bytes]] = {}  # dst -> {src: ciphertext}, from U2
        self.shared: set[int] = set()  # U2
        self.inputs: dict[int, np.ndarray] = {}  # U3
        self.seed_shares: dict[int, list[bytes]] = {}
        self.key_shares: dict[int, list[bytes]] = {}

    # --- stage 1 ----------------------------------------------------------------
    def setup_request(self, index: int) -> dict:
        return {"round": self.round_id, "index": index, "neighbours": self.neighbours[index],
                "threshold": self.threshold}

    def receive_setup(self, index: int, reply: dict) -> None:
        self.public_keys[index] = (reply["c_pk"], reply["s_pk"])

    # --- stage 2 ----------------------------------------------------------------
    def share_keys_request(self, index: int) -> dict:
        peers = [j for j in self.neighbours[index] if j in self.public_keys]
        return {"round": self.round_id, "indices": peers,
                "c_pks": [self.public_keys[j][0] for j in peers],
                "s_pks": [self.public_keys[j][1] for j in peers]}

    def receive_share_keys(self, index: int, reply: dict) -> None:
        expected = self.share_keys_request(index)["indices"]
        if index not in self.public_keys or sorted(reply["dst"]) != sorted(expected):
            return  # not a participant, or shares missing for some neighbour: a dropout
        self.shared.add(index)
        for dst, ciphertext in zip(reply["dst"], reply["ciphertexts"]):
            self.inbox.setdefault(dst, {})[index] = ciphertext

    # --- stage 3 ----------------------------------------------------------------
    def shares_for(self, index: int) -> dict:
        """The ciphertexts for `index` from neighbours that completed stage 2."""
        held = {src: ct for src, ct in self.inbox.get(index, {}).items() if src in self.shared}
        return {"round": self.round_id, "src": list(held), "ciphertexts": list(held.values())}

    def receive_input(self, index: int, vector: np.ndarray) -> None:
        if index in self.shared:
            self.inputs[index] = np.asarray(vector, dtype=np.uint64)

    # --- stage 4 ----------------------------------------------------------------
    def held_by(self, index: int) -> list[int]:
        """The neighbours whose shares `index` holds (those it masked with)."""
        return [j for j in self.neighbours[index] if j in self.shared and index in self.shared]

    def unmask_request(self, index: int) -> dict:
        held = self.held_by(index)
        return {"round": self.round_id,
                "survivors": [j for j in held if j in self.inputs],
                "dropped": [j for j in held if j not in self.inputs]}

    def receive_unmask(self, index: int, reply: dict) -> None:
        request = self.unmask_request(index)
        if (list(reply["seed_src"]) != request["survivors"]
                or list(reply["key_src"]) != request["dropped"]):
            return  # an answer to a different question: ignored, a dropout
        for src, share in zip(reply["seed_src"], reply["seed_shares"]):
            self.seed_shares.setdefault(src, []).append(share)
        for src, share in zip(reply["key_src"], reply["key_shares"]):
            self.key_shares.setdefault(src, []).append(share)

    def unmasked_sum(self) -> np.ndarray | None:
        """Sum of U3's encoded inputs modulo 2**64, or None when the round must not release it."""
        survivors = sorted(self.inputs)
        if len(survivors) < self.min_survivors:
            return None
        dropped = sorted(self.shared - set(survivors))
        if any(len(self.seed_shares.get(i, [])) < self.threshold for i in survivors):
            return None
        if any(len(self.key_shares.get(j, [])) < self.threshold for j in dropped):
            return None
        try:
            seeds = {i: combine_shares(self.seed_shares[i][: self.threshold]) for i in survivors}
            keys = {j: secret_key_from_bytes(combine_shares(self.key_shares[j][: self.threshold]))
                    for j in dropped}
        except ValueError:  # a corrupted share: nothing safe to release
            return None
        total = np.zeros_like(self.inputs[survivors[0]])
        for i in survivors:
            np.add(total, self.inputs[i], out=total)
            masks.add_mask(total, seeds[i], -1)
        for j, s_sk in keys.items():
            for i in self.neighbours[j]:
                if i in self.inputs and j in self.held_by(i):
                    # i added sign(i, j) * PRG(s_ij); remove it.
                    key = masks.pairwise_key(s_sk, bytes_to_public_key(self.public_keys[i][1]))
                    masks.add_mask(total, key, -masks.pairwise_sign(i, j))
        return total
