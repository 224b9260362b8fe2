"""A server that lies, scripted against honest clients: it learns nothing, and they refuse.

Two attacks on one target client X:

- inconsistent views (Bonawitz et al. 2017, actively secure variant): the server
  shows each client its own survivor set, so that X's neighbours hand over X's
  self-mask seed while, for every neighbour j that X masked with, j's other
  neighbours hand over j's masking key. With both, y_X minus every mask is x_X,
  without ever asking for X's own key.
- key substitution: the server replaces X's neighbours' public keys by its own,
  decrypts the shares X sends them, and recomputes X's pairwise masks.

Each test also runs the same script against clients with the defence switched
off and checks that it then recovers X's encoded input exactly: the script is a
real attack, and the defence is what stops it.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat, share_keys_plaintext_separate)

from dpfl_app.secagg import client, identity, inprocess, masks, round_keys, shamir
from dpfl_app.secagg.server import ServerRound

X, DIM = 1, 64
SESSION = inprocess.SESSION


def _inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 2**40, size=DIM, dtype=np.uint64) for _ in range(n)]


def _pinned(n: int) -> dict[int, identity.Identity]:
    """Every client's identity, verified against one pinned list the server cannot change."""
    keys = {i: Ed25519PrivateKey.generate() for i in range(1, n + 1)}
    pinned = {f"member-{i}": identity.public_bytes(k) for i, k in keys.items()}
    return {i: identity.Identity(k, pinned) for i, k in keys.items()}


def _announce(n: int) -> dict:
    return {"dp-clients": n, "dp-sampling": "fixed", "session": SESSION}


def enrol(server: ServerRound, ids, states) -> None:
    """Every client commits its round keys; the server puts them into its round."""
    directory = round_keys.Directory()
    for i in server.indices:
        states[i], reply = round_keys.enrol({}, {"round": server.round_id, "session": SESSION,
                                                 "dp-rounds": server.round_id}, ids[i])
        directory.receive(i, reply)
        server.add_keys(i, directory.round_keys(i, server.round_id))


def round_keys_of(server: ServerRound, indices) -> list[bytes]:
    """A survivor set as the clients sign it: the members' masking keys of the round."""
    return sorted(server.public_keys[i][1] for i in indices)


def _honest_until_masking(server: ServerRound, ids, inputs, states, refusals, liar=None):
    """Enrolment, share keys and the masked input as an honest server runs them, except
    that `liar` may rewrite each client's requests and the replies it routes on."""
    enrol(server, ids, states)
    for i in server.indices:
        request = {**server.share_keys_request(i), **_announce(len(server.indices))}
        if liar is not None:
            request = liar.keys_request(i, request)
        try:
            states[i], reply = client.share_keys(states[i], request, ids[i])
        except client.SecAggRefusal as refusal:
            refusals[i] = str(refusal)
            continue
        server.receive_share_keys(i, reply if liar is None else liar.capture(i, reply))
    for i in sorted(server.shared):
        request = server.shares_for(i)
        if liar is not None:
            request = liar.shares_request(i, request)
        try:
            states[i] = client.receive_shares(states[i], request)
        except client.SecAggRefusal as refusal:
            refusals[i] = str(refusal)
            continue
        states[i], vector = client.masked_input(states[i], inputs[i - 1])
        server.receive_input(i, vector)


def show_views_and_unmask(server: ServerRound, ids, states, refusals, views,
                          label=lambda i, j: j) -> tuple[dict, dict]:
    """The consistency round with survivor set `views[i]` (indices) shown to client i, as
    round keys, then the unmasking: the best a liar can do is hand i the signatures of i's
    neighbours on i's own set, or if too few, every one it holds from neighbours in that
    set. `label(i, j)` is the index client i knows client j by. The shares, by owner."""
    signatures: dict[int, tuple[list[int], bytes]] = {}
    for i in sorted(server.inputs):
        try:
            states[i], reply = client.consistency(
                states[i], {"round": 1, "survivors": round_keys_of(server, views[i])}, ids[i])
        except client.SecAggRefusal as refusal:
            refusals[i] = str(refusal)
            continue
        signatures[i] = (sorted(views[i]), reply["signature"])
    seed_shares, key_shares = {}, {}
    for i in signatures:
        alive = [j for j in server.neighbours[i] if j in signatures and j in views[i]]
        same = [j for j in alive if signatures[j][0] == sorted(views[i])]
        signers = same if len(same) >= server.threshold else alive
        request = {"round": 1, "signers": [label(i, j) for j in signers],
                   "signatures": [signatures[j][1] for j in signers]}
        try:
            states[i], reply = client.unmask(states[i], request)
        except client.SecAggRefusal as refusal:
            refusals[i] = str(refusal)
            continue
        owner = {label(i, j): j for j in server.neighbours[i]}
        for src, share in zip(reply["seed_src"], reply["seed_shares"]):
            seed_shares.setdefault(owner[src], []).append(share)
        for src, share in zip(reply["key_src"], reply["key_shares"]):
            key_shares.setdefault(owner[src], []).append(share)
    return seed_shares, key_shares


# --- inconsistent views ----------------------------------------------------------------

def _views(server: ServerRound) -> dict[int, list[int]]:
    """A survivor set per client that passes every client's floors (itself and t of its
    neighbours), shows X as alive to X's neighbours, and shows each neighbour j of X as
    dropped to t of j's neighbours: exclusions placed greedily within each client's slack."""
    t, everyone = server.threshold, set(server.indices)
    slack = len(server.neighbours[X]) - t
    excluded: dict[int, set[int]] = {i: set() for i in everyone}
    for j in server.neighbours[X]:
        candidates = sorted((i for i in server.neighbours[j] if len(excluded[i]) < slack),
                            key=lambda i: (i in server.neighbours[X] or i == X, len(excluded[i])))
        for i in candidates[:t]:
            excluded[i].add(j)
    return {i: sorted(everyone - excluded[i]) for i in everyone}


def _recover(server: ServerRound, seed_shares, key_shares, y_x) -> np.ndarray | None:
    """x_X from y_X, X's seed and the masking keys of X's neighbours; None if short."""
    t = server.threshold
    if len(seed_shares.get(X, [])) < t:
        return None
    peers = server.held_by(X)
    if any(len(key_shares.get(j, [])) < t for j in peers):
        return None
    total = np.array(y_x, dtype=np.uint64)
    masks.add_mask(total, shamir.combine(seed_shares[X][:t]), -1)
    for j in peers:
        s_sk = X25519PrivateKey.from_private_bytes(shamir.combine(key_shares[j][:t]))
        masks.add_mask(total, masks.pairwise_key(s_sk, server.public_keys[X][1]),
                       -masks.pairwise_sign(X, j))
    return total


def _inconsistent_views_attack(n: int, k: int, views=None):
    ids, inputs = _pinned(n), _inputs(n)
    server, states, refusals = ServerRound(1, n, k, random.Random(3)), {}, {}
    _honest_until_masking(server, ids, inputs, states, refusals)
    views = views or _views(server)
    seed_shares, key_shares = show_views_and_unmask(server, ids, states, refusals, views)
    recovered = _recover(server, seed_shares, key_shares, server.inputs[X])
    return recovered, inputs[X - 1], refusals


def _without_consistency_checks(monkeypatch):
    """Clients that sign any set and unmask without checking their neighbours' signatures."""
    monkeypatch.setattr(client, "_check_signers", lambda state, request: None)
    monkeypatch.setattr(client.floors, "min_survivors", lambda t: 1)
    original = client.consistency

    def no_floor(state, request, ident):
        return original({**state, "threshold": 0}, request, ident)

    monkeypatch.setattr(client, "consistency", no_floor)


# The issue's case: a complete graph of 5, views of one or two clients; and a sparse
# graph (n = 16, k = 8, t = 5) whose views pass every client's own survivor floor.
ISSUE_VIEWS = {1: [1], 2: [1, 2], 3: [1, 3], 4: [1, 4], 5: [1, 5]}
SCENARIOS = [(5, 0, ISSUE_VIEWS), (16, 8, None)]


@pytest.mark.parametrize("n,k,views", SCENARIOS)
def test_inconsistent_views_recover_nothing_and_honest_clients_refuse(n, k, views):
    recovered, _, refusals = _inconsistent_views_attack(n, k, views)
    assert recovered is None
    assert refusals and all(
        "did not sign the survivor set" in r or "fewer than threshold" in r
        for r in refusals.values()), refusals


@pytest.mark.parametrize("n,k,views", SCENARIOS)
def test_the_views_attack_is_real_without_the_consistency_round(n, k, views, monkeypatch):
    _without_consistency_checks(monkeypatch)
    recovered, truth, refusals = _inconsistent_views_attack(n, k, views)
    assert not refusals
    assert recovered is not None and np.array_equal(recovered, truth)


def test_the_sparse_views_pass_every_survivor_floor_so_only_signatures_stop_them():
    """Floors alone do not stop the attack: every view holds its client and t neighbours."""
    server = ServerRound(1, 16, 8, random.Random(3))
    for i, view in _views(server).items():
        assert i in view and len(set(view) & set(server.neighbours[i])) >= server.threshold


# --- key substitution ------------------------------------------------------------------

class KeySubstitution:
    """Replaces X's neighbours' keys by the server's own and reads what X sends them."""

    def __init__(self, threshold: int, sign_with: dict[int, Ed25519PrivateKey] | None) -> None:
        self.t = threshold
        self.sign_with = sign_with  # the server's identity keys, or None: keep the real ones
        self.fakes: dict[int, tuple[X25519PrivateKey, X25519PrivateKey]] = {}
        self.seed_shares: list[bytes] = []
        self.x_pks: tuple[bytes, bytes] | None = None

    def keys_request(self, i: int, request: dict) -> dict:
        if i != X:
            return request
        request = {key: list(value) if isinstance(value, list) else value
                   for key, value in request.items()}
        for pos, j in enumerate(request["indices"]):
            c_sk, s_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
            self.fakes[j] = (c_sk, s_sk)
            request["c_pks"][pos], request["s_pks"][pos] = masks.public_raw(c_sk), \
                masks.public_raw(s_sk)
            if self.sign_with is not None:  # relayed identities: substitute those too
                key = self.sign_with[j]
                request["id_pks"][pos] = identity.public_bytes(key)
                request["signatures"][pos] = key.sign(identity.round_keys_message(
                    SESSION, 1, request["names"][pos], request["c_pks"][pos],
                    request["s_pks"][pos]))
        return request

    def capture(self, i: int, reply: dict) -> dict:
        """Decrypt X's shares with the fake encryption keys: X's seed shares."""
        for j, ciphertext in zip(reply["dst"], reply["ciphertexts"]):
            if i != X:
                break
            key = masks.encryption_key(self.fakes[j][0], self.x_pks[0])
            _, _, seed_share, _ = share_keys_plaintext_separate(decrypt(key, ciphertext))
            self.seed_shares.append(seed_share)
        return reply

    def shares_request(self, i: int, request: dict) -> dict:
        """Shares 'from' the fake neighbours, so that X masks with the fake keys."""
        if i != X:
            return request
        src, ciphertexts = sorted(self.fakes), []
        for j in src:
            shares = [shamir.create_shares(bytes(32), 1, [X])[0]] * 2
            plaintext = share_keys_plaintext_concat(j, X, *shares)
            ciphertexts.append(encrypt(masks.encryption_key(self.fakes[j][0], self.x_pks[0]),
                                       plaintext))
        return {"round": request["round"], "src": src, "ciphertexts": ciphertexts}

    def recover(self, y_x: np.ndarray) -> np.ndarray:
        total = np.array(y_x, dtype=np.uint64)
        masks.add_mask(total, shamir.combine(self.seed_shares[: self.t]), -1)
        for j, (_, s_sk) in self.fakes.items():
            masks.add_mask(total, masks.pairwise_key(s_sk, self.x_pks[1]),
                           -masks.pairwise_sign(X, j))
        return total


def _key_substitution_attack(ids, server_identities):
    n = len(ids)
    inputs = _inputs(n)
    server, states, refusals = ServerRound(1, n, 0, random.Random(3)), {}, {}
    attack = KeySubstitution(server.threshold, server_identities)
    original_add_keys = server.add_keys

    def remember_x(index, keys):
        if index == X:
            attack.x_pks = (keys["c_pk"], keys["s_pk"])
        original_add_keys(index, keys)

    server.add_keys = remember_x
    _honest_until_masking(server, ids, inputs, states, refusals, liar=attack)
    recovered = attack.recover(server.inputs[X]) if X in server.inputs else None
    return recovered, inputs[X - 1], refusals


def test_substituted_keys_are_refused_against_pinned_identities():
    """The server cannot sign for a pinned member: X refuses before sending any share."""
    n = 6
    recovered, _, refusals = _key_substitution_attack(_pinned(n), None)
    assert recovered is None
    assert "not signed by its identity key" in refusals[X]
    # It may also re-sign with identities of its own: not in the pinned list.
    own = {j: Ed25519PrivateKey.generate() for j in range(1, n + 1)}
    recovered, _, refusals = _key_substitution_attack(_pinned(n), own)
    assert recovered is None and "not signed by its identity key" in refusals[X]


def test_key_substitution_is_real_against_relayed_identities():
    """Without a pinned list (simulation's default) a lying server re-signs with keys of
    its own and recovers X's input: the documented limit of relayed identities."""
    n = 6
    relayed = {i: identity.Identity(Ed25519PrivateKey.generate()) for i in range(1, n + 1)}
    own = {j: Ed25519PrivateKey.generate() for j in range(1, n + 1)}
    recovered, truth, refusals = _key_substitution_attack(relayed, own)
    assert X not in refusals
    assert recovered is not None and np.array_equal(recovered, truth)
