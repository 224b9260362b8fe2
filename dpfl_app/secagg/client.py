"""One client's side of SecAgg+, stage by stage, as pure functions.

Every stage takes the client's state (a dict of ints, bytes and lists of them,
so that it fits a Flower `ConfigRecord` in `context.state`: in deployment each
message may arrive in a fresh process) and the server's request, and returns
the new state and the reply. Stages (Bell et al. 2020, Fig. 2; Bonawitz et
al. 2017, Fig. 4):

1. `setup`: take the round's index, neighbours and threshold; make two key
   pairs (c: encryption, s: masking); reply with both public keys.
2. `share_keys`: draw the self-mask seed b; Shamir-share b and the masking
   secret key among the neighbours, each share pair encrypted (Fernet:
   AES-CBC + HMAC) under the ECDH+HKDF key of the encryption key pairs.
3. `masked_input`: decrypt the shares received; mask the encoded update with
   the self-mask and one pairwise mask per neighbour that shared keys.
4. `unmask`: for each neighbour, the share of its self-mask seed (if it
   survived) or of its secret key (if it dropped), never both, and only once.

A request that breaks the protocol raises `SecAggRefusal`; the handler turns
it into an error reply, which the server counts as a dropout.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt, encrypt, generate_shared_key)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat, share_keys_plaintext_separate)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key, bytes_to_public_key, generate_key_pairs, private_key_to_bytes,
    public_key_to_bytes)

from dpfl_app.secagg import masks

State = dict
CURVE = ec.SECP384R1()
SECRET_KEY_BYTES = 48  # a P-384 private scalar


class SecAggRefusal(Exception):
    """The request breaks the protocol; an honest client does not answer it."""


def secret_key_to_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The raw private scalar (48 bytes): what is Shamir-shared."""
    return key.private_numbers().private_value.to_bytes(SECRET_KEY_BYTES, "big")


def secret_key_from_bytes(raw: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(raw, "big"), CURVE)


def _expect(state: State, stage: str, round_id: int) -> None:
    if state.get("stage") != stage or state.get("round") != round_id:
        raise SecAggRefusal(f"out of order: got a request for round {round_id} after stage "
                            f"{state.get('stage')!r} of round {state.get('round')}, "
                            f"expected stage {stage!r} to have run")


def setup(request: dict) -> tuple[State, dict]:
    """Stage 1: check the round's parameters and make this round's two key pairs."""
    index, peers, t = request["index"], list(request["neighbours"]), request["threshold"]
    if index in peers or len(set(peers)) != len(peers):
        raise SecAggRefusal(f"malformed neighbourhood for client {index}: {peers}")
    if not 1 <= t <= len(peers) or 2 * t <= len(peers):
        raise SecAggRefusal(f"threshold {t} must be a majority of the {len(peers)} neighbours "
                            "(otherwise the server could rebuild both secrets of a client)")
    c_sk, c_pk = generate_key_pairs()
    s_sk = ec.generate_private_key(CURVE)
    state = {"stage": "setup", "round": request["round"], "index": index, "neighbours": peers,
             "threshold": t, "c_sk": private_key_to_bytes(c_sk),
             "s_sk": secret_key_to_bytes(s_sk)}
    return state, {"c_pk": public_key_to_bytes(c_pk),
                   "s_pk": public_key_to_bytes(s_sk.public_key())}


def share_keys(state: State, request: dict) -> tuple[State, dict]:
    """Stage 2: Shamir-share the self-mask seed and the masking key, encrypted per neighbour."""
    _expect(state, "setup", request["round"])
    peers, t = request["indices"], state["threshold"]
    if not set(peers) <= set(state["neighbours"]) or len(set(peers)) != len(peers):
        raise SecAggRefusal(f"keys offered for non-neighbours: {sorted(set(peers))}")
    if len(peers) < t:
        raise SecAggRefusal(f"only {len(peers)} neighbours left, fewer than threshold {t}")
    if len(set(request["c_pks"]) | set(request["s_pks"])) != 2 * len(peers):
        raise SecAggRefusal("neighbours' public keys are not all distinct")
    seed = os.urandom(masks.KEY_BYTES)
    seed_shares = create_shares(seed, t, len(peers))
    key_shares = create_shares(state["s_sk"], t, len(peers))
    c_sk = bytes_to_private_key(state["c_sk"])
    ciphertexts = []
    for peer, c_pk, seed_share, key_share in zip(peers, request["c_pks"], seed_shares,
                                                 key_shares):
        key = generate_shared_key(c_sk, bytes_to_public_key(c_pk))
        plaintext = share_keys_plaintext_concat(state["index"], peer, seed_share, key_share)
        ciphertexts.append(encrypt(key, plaintext))
    state = {**state, "stage": "share_keys", "seed": seed, "peers": list(peers),
             "peer_c_pks": list(request["c_pks"]), "peer_s_pks": list(request["s_pks"])}
    return state, {"dst": list(peers), "ciphertexts": ciphertexts}


def receive_shares(state: State, request: dict) -> State:
    """Stage 3, first half: decrypt and keep the neighbours' shares (before training)."""
    _expect(state, "share_keys", request["round"])
    index, known = state["index"], dict(zip(state["peers"], state["peer_c_pks"]))
    if not set(request["src"]) <= set(known) or len(set(request["src"])) != len(request["src"]):
        raise SecAggRefusal(f"shares from clients that did not share keys: {request['src']}")
    if len(request["src"]) < state["threshold"]:
        raise SecAggRefusal(f"only {len(request['src'])} neighbours shared keys, fewer than "
                            f"threshold {state['threshold']}")
    c_sk = bytes_to_private_key(state["c_sk"])
    seed_shares, key_shares = [], []
    for src, ciphertext in zip(request["src"], request["ciphertexts"]):
        key = generate_shared_key(c_sk, bytes_to_public_key(known[src]))
        try:
            plaintext = decrypt(key, ciphertext)
        except InvalidToken:
            raise SecAggRefusal(f"the share from client {src} failed authentication") from None
        sender, receiver, seed_share, key_share = share_keys_plaintext_separate(plaintext)
        if (sender, receiver) != (src, index):
            raise SecAggRefusal(f"share routed from {src} claims {sender} -> {receiver}")
        seed_shares.append(seed_share)
        key_shares.append(key_share)
    return {**state, "stage": "shares", "held_src": list(request["src"]),
            "held_seed_shares": seed_shares, "held_key_shares": key_shares}


def masked_input(state: State, encoded: np.ndarray) -> tuple[State, np.ndarray]:
    """Stage 3, second half: y = x + PRG(b) + sum_j +/- PRG(s_ij) modulo 2**64."""
    if state.get("stage") != "shares":
        raise SecAggRefusal(f"masked input requested at stage {state.get('stage')!r}")
    vector = np.array(encoded, dtype=np.uint64)
    masks.add_mask(vector, state["seed"])
    s_sk = secret_key_from_bytes(state["s_sk"])
    s_pks = dict(zip(state["peers"], state["peer_s_pks"]))
    for peer in state["held_src"]:
        key = masks.pairwise_key(s_sk, bytes_to_public_key(s_pks[peer]))
        masks.add_mask(vector, key, masks.pairwise_sign(state["index"], peer))
    return {**state, "stage": "masked"}, vector


def unmask(state: State, request: dict) -> tuple[State, dict]:
    """Stage 4: seed shares of survivors, key shares of dropouts; never both for one client."""
    _expect(state, "masked", request["round"])
    survivors, dropped = set(request["survivors"]), set(request["dropped"])
    if survivors & dropped:
        raise SecAggRefusal(
            "server asked for both the self-mask share and the secret-key share of client(s) "
            f"{sorted(survivors & dropped)}: that would reveal their update")
    if state["index"] in dropped:
        raise SecAggRefusal("server claims this client dropped out, but it sent its input")
    held = dict(zip(state["held_src"], zip(state["held_seed_shares"], state["held_key_shares"])))
    if not (survivors | dropped) <= set(held):
        raise SecAggRefusal(f"shares asked for clients it holds none of: "
                            f"{sorted((survivors | dropped) - set(held))}")
    survivors, dropped = sorted(survivors), sorted(dropped)
    reply = {"seed_src": survivors, "seed_shares": [held[i][0] for i in survivors],
             "key_src": dropped, "key_shares": [held[i][1] for i in dropped]}
    # Once only: a second request could ask for the other kind of share.
    return {**state, "stage": "unmasked"}, reply
