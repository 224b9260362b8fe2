"""The server's side of SecAgg+: who talks to whom, which shares to ask for, the sum.

`ServerRound` keeps the sets of Bonawitz et al. (2017): U1 (committed keys for
the round: `round_keys.Directory`, filled by the enrolments), U2 (shared keys), U3 (sent a masked input), U4 (signed U3 in the consistency
round), U5 (answered the unmasking). The round yields the sum of U3's inputs
only when at least `min_survivors` sent one and every needed secret can be
rebuilt from t shares: the self-mask seed of each client in U3 and the masking
key of each client in U2 minus U3 (checked against its signed public key).
Otherwise `unmasked_sum` returns None and the caller releases noise only,
never a partial sum.

The server relays, and cannot forge, the clients' signatures: on their round
keys (committed at enrolment, checked by their neighbours before sharing) and on
U3 as a set of the survivors' round keys (checked before unmasking). An honest server shows every client the same U3, so every client's
check passes; `tests/secagg/test_malicious_server.py` scripts the lies.
Secrets are rebuilt with `shamir.combine_many`: one Lagrange product per set
of share holders, for all the secrets that set holds.
"""

from __future__ import annotations

import random

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from dpfl_app.secagg import floors, graph, masks, shamir


class ServerRound:
    """One round's bookkeeping. Clients are named by their index 1..n (or `indices`)."""

    def __init__(self, round_id: int, cohort_size: int, requested_neighbours: int,
                 rng: random.Random | None = None, indices: list[int] | None = None) -> None:
        self.round_id = round_id
        self.indices = list(indices) if indices is not None else list(range(1, cohort_size + 1))
        cohort_size = len(self.indices)
        k = graph.neighbours_per_client(requested_neighbours, cohort_size)
        self.threshold = graph.threshold(k)
        # The withholding rule: fewer survivors than this, and no sum is released.
        self.min_survivors = floors.min_survivors(self.threshold)
        self.neighbours = graph.neighbourhoods(self.indices, k, rng or random.SystemRandom())
        self.public_keys: dict[int, tuple[bytes, bytes]] = {}  # U1: (c_pk, s_pk)
        self.identities: dict[int, tuple[str, bytes, bytes]] = {}  # U1: (name, id_pk, sig)
        self.inbox: dict[int, dict[int, bytes]] = {}  # dst -> {src: ciphertext}, from U2
        self.shared: set[int] = set()  # U2
        self.inputs: dict[int, np.ndarray] = {}  # U3
        self.signatures: dict[int, bytes] = {}  # U4: each one's signature on U3
        self.seed_shares: dict[int, list[bytes]] = {}
        self.key_shares: dict[int, list[bytes]] = {}

    # --- the committed keys (`round_keys.Directory.round_keys`) ----------------------
    def add_keys(self, index: int, keys: dict) -> None:
        self.public_keys[index] = (keys["c_pk"], keys["s_pk"])
        self.identities[index] = (keys["name"], keys["id_pk"], keys["sig"])

    # --- share keys: the round's first message ------------------------------------
    def share_keys_request(self, index: int) -> dict:
        """The round, this client's index, threshold and neighbours with their keys."""
        peers = [j for j in self.neighbours[index] if j in self.public_keys]
        return {"round": self.round_id, "index": index, "threshold": self.threshold,
                "indices": peers,
                "c_pks": [self.public_keys[j][0] for j in peers],
                "s_pks": [self.public_keys[j][1] for j in peers],
                "names": [self.identities[j][0] for j in peers],
                "id_pks": [self.identities[j][1] for j in peers],
                "signatures": [self.identities[j][2] for j in peers]}

    def receive_share_keys(self, index: int, reply: dict) -> None:
        expected = [j for j in self.neighbours[index] if j in self.public_keys]
        if index not in self.public_keys or sorted(reply["dst"]) != sorted(expected):
            return  # not a participant, or shares missing for some neighbour: a dropout
        self.shared.add(index)
        for dst, ciphertext in zip(reply["dst"], reply["ciphertexts"]):
            self.inbox.setdefault(dst, {})[index] = ciphertext

    # --- masked input -------------------------------------------------------------
    def shares_for(self, index: int) -> dict:
        """The ciphertexts for `index` from neighbours that completed stage 2."""
        held = {src: ct for src, ct in self.inbox.get(index, {}).items() if src in self.shared}
        return {"round": self.round_id, "src": list(held), "ciphertexts": list(held.values())}

    def receive_input(self, index: int, vector: np.ndarray) -> None:
        if index in self.shared:
            self.inputs[index] = np.asarray(vector, dtype=np.uint64)

    # --- consistency ---------------------------------------------------------------
    def consistency_request(self, index: int) -> dict:
        """The same U3 for every client, as the survivors' masking public keys of this round
        (the clients check that they were shown one set)."""
        return {"round": self.round_id,
                "survivors": sorted(self.public_keys[i][1] for i in self.inputs)}

    def receive_consistency(self, index: int, reply: dict) -> None:
        if index in self.inputs:
            self.signatures[index] = reply["signature"]

    # --- unmasking ------------------------------------------------------------------
    def held_by(self, index: int) -> list[int]:
        """The neighbours whose shares `index` holds (those it masked with)."""
        if index not in self.shared:
            return []
        return [j for j in self.neighbours[index] if j in self.shared]

    def unmask_request(self, index: int) -> dict:
        signers = [j for j in self.neighbours[index] if j in self.signatures]
        return {"round": self.round_id, "signers": signers,
                "signatures": [self.signatures[j] for j in signers]}

    def receive_unmask(self, index: int, reply: dict) -> None:
        held = self.held_by(index)
        if (list(reply["seed_src"]) != [j for j in held if j in self.inputs]
                or list(reply["key_src"]) != [j for j in held if j not in self.inputs]):
            return  # an answer to a different question: ignored, a dropout
        for src, share in zip(reply["seed_src"], reply["seed_shares"]):
            self.seed_shares.setdefault(src, []).append(share)
        for src, share in zip(reply["key_src"], reply["key_shares"]):
            self.key_shares.setdefault(src, []).append(share)

    def _rebuild(self, shares: dict[int, list[bytes]], owners: list[int]) -> list[bytes] | None:
        """Each owner's secret from its first t shares, or None if any has fewer."""
        if any(len(shares.get(i, [])) < self.threshold for i in owners):
            return None
        try:
            return shamir.combine_many([shares[i][: self.threshold] for i in owners])
        except ValueError:  # a malformed share: nothing safe to release
            return None

    def unmasked_sum(self) -> np.ndarray | None:
        """Sum of U3's encoded inputs modulo 2**64, or None when the round must not release it."""
        survivors = sorted(self.inputs)
        if len(survivors) < self.min_survivors:
            return None
        dropped = sorted(self.shared - set(survivors))
        seeds = self._rebuild(self.seed_shares, survivors)
        keys = self._rebuild(self.key_shares, dropped)
        if seeds is None or keys is None:
            return None
        total = np.zeros_like(self.inputs[survivors[0]])
        for i, seed in zip(survivors, seeds):
            np.add(total, self.inputs[i], out=total)
            masks.add_mask(total, seed, -1)
        for j, raw in zip(dropped, keys):
            s_sk = X25519PrivateKey.from_private_bytes(raw)
            if masks.public_raw(s_sk) != self.public_keys[j][1]:
                return None  # the shares do not rebuild the key j signed: corrupted
            for i in self.neighbours[j]:
                if i in self.inputs:  # i is in U2, so it held j's shares and masked with j
                    key = masks.pairwise_key(s_sk, self.public_keys[i][1])
                    masks.add_mask(total, key, -masks.pairwise_sign(i, j))
        return total
