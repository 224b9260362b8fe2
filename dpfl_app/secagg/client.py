"""One client's side of SecAgg+, stage by stage, as pure functions.

Every stage takes the client's state (a dict of ints, bytes and lists of them,
so that it fits a Flower `ConfigRecord` in `context.state`: in deployment each
message may arrive in a fresh process), the server's request and the client's
`identity.Identity`, and returns the new state and the reply. Stages (Bell et
al. 2020, Fig. 2; Bonawitz et al. 2017, Fig. 4 and its actively secure variant):

0. `round_keys.enrol` (once per run, not per round): commit signed public keys
   (c: share encryption, s: masking) for a window of rounds, derived from a
   per-run secret.
1. `share_keys`, the first message of a round: check the round (once, forward,
   not past T), the index, neighbours and threshold against the client's floors
   (`floors`) and the announced mechanism; re-derive this round's committed key
   pairs; check every neighbour's signature on its keys *for this round* and its
   identity name; draw the self-mask seed b; Shamir-share b and the masking secret
   key among the neighbours (`shamir`), each share pair encrypted (Fernet: AES-CBC
   + HMAC) under the X25519+HKDF key of the encryption key pairs.
2. `masked_input`: decrypt the shares received; mask the encoded update with
   the self-mask and one pairwise mask per neighbour that shared keys.
3. `consistency`: sign the survivor set U3 the server shows, as the survivors'
   masking public keys of this round (each bound to one identity by its signature);
   at least this client and t of its neighbours must be in it.
4. `unmask`: check that at least t neighbours signed the *same* set of keys;
   then, for each neighbour, the share of its self-mask seed (if its key is in the
   signed set) or of its masking key (if not), never both, and only once.

Why the signatures close the attack of a server that shows clients different
survivor sets: to unmask client X without X's own key, the server needs X's
seed from t of X's neighbours (who see X as a survivor) and the masking key of
a neighbour A that X masked with, from t of A's neighbours (who see A as
dropped). X masks with at least t neighbours and at least t hold X's seed:
with t > k/2 some A is in both groups. A released X's seed only after t of
A's neighbours signed A's set; A's key needs t more of A's neighbours that
signed another set. An honest client signs one set per round, so A would need
2t > k neighbours. "X", "A" and "the same set" are identities and sets of
round keys, each signed by one identity for this run and round (and every neighbour
that gets past the masked input holds the same key for A: a share made with any other
fails authentication); the per-round indices the server assigns are not signed (keys are
committed before the indices exist), so they decide nothing here
(`round_keys` says why a remapped index gains the server nothing). The argument
needs every signature to come from a key the server cannot forge: `identity`
says where those keys come from.

A request that breaks the protocol raises `SecAggRefusal`; the handler turns
it into an error reply, which the server counts as a dropout.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat, share_keys_plaintext_separate)

from dpfl_app.secagg import floors, masks, round_keys, shamir
from dpfl_app.secagg.identity import Identity, IdentityError, round_keys_message, \
    survivors_message

State = dict


class SecAggRefusal(Exception):
    """The request breaks the protocol; an honest client does not answer it."""


def _expect(state: State, stage: str, round_id: int) -> None:
    if state.get("stage") != stage or state.get("round") != round_id:
        raise SecAggRefusal(f"out of order: got a request for round {round_id} after stage "
                            f"{state.get('stage')!r} of round {state.get('round')}, "
                            f"expected stage {stage!r} to have run")


def _check_round(state: State, request: dict) -> None:
    """One round's protocol once, rounds only move forward, and never past the announced T."""
    round_id = int(request["round"])
    if state.get("round") is not None and round_id <= int(state["round"]):
        raise SecAggRefusal(f"a second share-keys request for round {round_id} (this node "
                            f"already took part in round {state['round']}): one per round")
    rounds = request.get("dp-rounds")
    if rounds is not None and round_id > int(rounds):
        raise SecAggRefusal(f"round {round_id} is past the {rounds} rounds the server announced")


def _check_floors(request: dict, k: int, t: int) -> None:
    """The neighbourhood and threshold against the floors and the announced cohort."""
    if "dp-clients" not in request:
        raise SecAggRefusal("the server did not announce dp-clients, from which this client's "
                            "floors follow")
    m = int(request["dp-clients"])
    if k < floors.neighbour_floor(m):
        raise SecAggRefusal(f"{k} neighbours, fewer than the floor "
                            f"{floors.neighbour_floor(m)} for the announced m={m} clients "
                            "per round")
    if not floors.min_threshold(k) <= t <= k:
        raise SecAggRefusal(f"threshold {t} must be a majority of the {k} neighbours "
                            "(otherwise the server could rebuild both secrets of a client)")
    # The cohort holds this client and its k neighbours. With fixed-size sampling it is at
    # most m; a bigger one means m (and with it the sampling rate, and epsilon) was
    # understated. A Poisson cohort is Binomial(N, m/N): above floors.poisson_cohort_bound(m)
    # with probability below 1e-9.
    if request.get("dp-sampling") == "fixed":
        most = m
    else:
        most = floors.poisson_cohort_bound(m)
        if "dp-population" in request:
            most = min(most, int(request["dp-population"]))
    if k + 1 > most:
        raise SecAggRefusal(f"{k} neighbours, more than a cohort of the announced m={m} "
                            f"({request.get('dp-sampling', 'poisson')} sampling) can hold: the "
                            "cohort is understated")


def _verified_peers(session: int, round_id: int, request: dict,
                    identity: Identity) -> list[bytes]:
    """The neighbours' verification keys, after checking each one's signature on its keys
    for this run and round, under its name."""
    names, keys = [], []
    for peer, c_pk, s_pk, name, id_pk, sig in zip(
            request["indices"], request["c_pks"], request["s_pks"], request["names"],
            request["id_pks"], request["signatures"]):
        try:
            key = identity.verification_key(name, id_pk)
        except IdentityError as error:
            raise SecAggRefusal(f"neighbour {peer}: {error}") from None
        if not Identity.valid(key, sig, round_keys_message(session, round_id, name, c_pk, s_pk)):
            raise SecAggRefusal(f"the keys of neighbour {peer} ({name}) are not signed by its "
                                f"identity key for round {round_id}: refusing a substituted or "
                                "replayed key")
        names.append(name)
        keys.append(key)
    if len(set(names)) != len(names) or identity.name in names:
        raise SecAggRefusal("one identity holds two positions in this neighbourhood")
    return keys


def share_keys(state: State, request: dict, identity: Identity) -> tuple[State, dict]:
    """The first message of a round: check the round, the floors and the neighbours' signed
    keys, then share the two secrets among the neighbours."""
    index, peers, t = request["index"], list(request["indices"]), request["threshold"]
    if index in peers or len(set(peers)) != len(peers) or len(peers) != len(request["names"]):
        raise SecAggRefusal(f"malformed neighbourhood for client {index}: {peers}")
    _check_round(state, request)
    _check_floors(request, len(peers), t)
    session, round_id = int(request["session"]), int(request["round"])
    try:
        c_sk, s_sk = round_keys.own_keys(state, session, round_id)
        s_pk = masks.public_raw(X25519PrivateKey.from_private_bytes(s_sk))
    except round_keys.NotEnrolled as error:
        raise SecAggRefusal(str(error)) from None
    if len({*request["c_pks"], *request["s_pks"]}) != 2 * len(peers):
        raise SecAggRefusal("neighbours' public keys are not all distinct")
    verification_keys = _verified_peers(session, round_id, request, identity)
    seed = os.urandom(masks.KEY_BYTES)
    seed_shares = shamir.create_shares(seed, t, peers)
    key_shares = shamir.create_shares(s_sk, t, peers)
    own_c = X25519PrivateKey.from_private_bytes(c_sk)
    # One agreement per neighbour: the same key decrypts its shares at the masked input.
    fernet_keys = [masks.encryption_key(own_c, c_pk) for c_pk in request["c_pks"]]
    ciphertexts = [encrypt(key, share_keys_plaintext_concat(index, peer, seed_share, key_share))
                   for peer, key, seed_share, key_share in zip(peers, fernet_keys, seed_shares,
                                                               key_shares)]
    state = {**round_keys.persistent(state), "stage": "share_keys", "round": round_id,
             "session": session, "index": index, "threshold": t, "s_sk": s_sk, "s_pk": s_pk,
             "seed": seed,
             # noise-at=clients: the fewest survivors the noise shares are calibrated for
             "noise_threshold": int(request.get("dp-noise-threshold", 0)),
             "peers": peers, "peer_share_keys": fernet_keys,
             "peer_s_pks": list(request["s_pks"]), "peer_id_keys": verification_keys}
    return state, {"dst": peers, "ciphertexts": ciphertexts}


def receive_shares(state: State, request: dict) -> State:
    """The masked input, first half: decrypt and keep the neighbours' shares (before training)."""
    _expect(state, "share_keys", request["round"])
    index, known = state["index"], dict(zip(state["peers"], state["peer_share_keys"]))
    if not set(request["src"]) <= set(known) or len(set(request["src"])) != len(request["src"]):
        raise SecAggRefusal(f"shares from clients that did not share keys: {request['src']}")
    if len(request["src"]) < state["threshold"]:
        raise SecAggRefusal(f"only {len(request['src'])} neighbours shared keys, fewer than "
                            f"threshold {state['threshold']}")
    seed_shares, key_shares = [], []
    for src, ciphertext in zip(request["src"], request["ciphertexts"]):
        try:
            plaintext = decrypt(known[src], ciphertext)
        except InvalidToken:
            raise SecAggRefusal(f"the share from client {src} failed authentication") from None
        sender, receiver, seed_share, key_share = share_keys_plaintext_separate(plaintext)
        if (sender, receiver) != (src, index):
            raise SecAggRefusal(f"share routed from {src} claims {sender} -> {receiver}")
        seed_shares.append(seed_share)
        key_shares.append(key_share)
    return {**state, "stage": "shares", "held_src": list(request["src"]),
            "held_seed_shares": seed_shares, "held_key_shares": key_shares}


def masked_input(state: State, encoded: np.ndarray, bits: int = 64) -> tuple[State, np.ndarray]:
    """The masked input, second half: y = x + PRG(b) + sum_j +/- PRG(s_ij) modulo 2**64, then modulo
    2**bits (distributed DP's ring; 2**bits divides 2**64, so the server's sum modulo 2**64
    reduced modulo 2**bits is the sum modulo 2**bits, and each y is uniform there)."""
    if state.get("stage") != "shares":
        raise SecAggRefusal(f"masked input requested at stage {state.get('stage')!r}")
    vector = np.array(encoded, dtype=np.uint64)
    masks.add_mask(vector, state["seed"])
    s_sk = X25519PrivateKey.from_private_bytes(state["s_sk"])
    s_pks = dict(zip(state["peers"], state["peer_s_pks"]))
    for peer in state["held_src"]:
        masks.add_mask(vector, masks.pairwise_key(s_sk, s_pks[peer]),
                       masks.pairwise_sign(state["index"], peer))
    if bits < 64:
        vector &= np.uint64(2**bits - 1)
    return {**state, "stage": "masked"}, vector


def consistency(state: State, request: dict, identity: Identity) -> tuple[State, dict]:
    """Sign the survivor set shown (the survivors' masking public keys of this round), if it
    holds this client and t of its neighbours. Keys, not names: a client learns no other
    client's identity beyond its neighbours'."""
    _expect(state, "masked", request["round"])
    survivors = sorted({bytes(key) for key in request["survivors"]})
    if state["s_pk"] not in survivors:
        raise SecAggRefusal("server claims this client dropped out, but it sent its input")
    alive = len(set(survivors) & set(state["peer_s_pks"]))
    if alive < state["threshold"] or len(survivors) < floors.min_survivors(state["threshold"]):
        raise SecAggRefusal(f"only {alive} neighbours survived, fewer than threshold "
                            f"{state['threshold']}: too few inputs to hide this one")
    if len(survivors) < state.get("noise_threshold", 0):  # noise-at=clients: too little noise
        raise SecAggRefusal(f"only {len(survivors)} survivors, fewer than the "
                            f"{state['noise_threshold']} whose noise shares this client's "
                            "guarantee counts on")
    signature = identity.sign(survivors_message(state["session"], state["round"], survivors))
    return {**state, "stage": "signed", "survivors": survivors}, {"signature": signature}


def _check_signers(state: State, request: dict) -> None:
    """At least t neighbours signed the very survivor set (of keys) this client signed."""
    survivors, t = set(state["survivors"]), state["threshold"]
    keys = dict(zip(state["peers"], state["peer_id_keys"]))
    alive = {i for i, key in zip(state["peers"], state["peer_s_pks"]) if key in survivors}
    signers = list(request["signers"])
    if len(set(signers)) != len(signers) or not set(signers) <= alive:
        raise SecAggRefusal(f"signatures from clients that are not surviving neighbours: "
                            f"{sorted(set(signers) - alive)}")
    if len(signers) < t:
        raise SecAggRefusal(f"only {len(signers)} neighbours confirmed the survivor set, fewer "
                            f"than threshold {t}")
    # t valid signatures are what the argument needs; checking more only costs time.
    message = survivors_message(state["session"], state["round"], state["survivors"])
    for signer, signature in list(zip(signers, request["signatures"]))[:t]:
        if not Identity.valid(keys[signer], signature, message):
            raise SecAggRefusal(f"neighbour {signer} did not sign the survivor set this client "
                                "was shown: the server shows clients different sets")


def unmask(state: State, request: dict) -> tuple[State, dict]:
    """Seed shares of signed survivors, key shares of the others; never both. Whether a
    share's sender survived is read off its signed round key, never off its index."""
    _expect(state, "signed", request["round"])
    _check_signers(state, request)
    survivors = set(state["survivors"])
    keys = dict(zip(state["peers"], state["peer_s_pks"]))
    held = dict(zip(state["held_src"], zip(state["held_seed_shares"], state["held_key_shares"])))
    alive = sorted(i for i in held if keys[i] in survivors)
    dropped = sorted(i for i in held if keys[i] not in survivors)
    reply = {"seed_src": alive, "seed_shares": [held[i][0] for i in alive],
             "key_src": dropped, "key_shares": [held[i][1] for i in dropped]}
    # Once only: a second request could ask for the other kind of share.
    return {**state, "stage": "unmasked"}, reply
