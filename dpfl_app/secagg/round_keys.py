"""Pre-committed round keys: a client's signed public keys for many rounds, sent once.

SecAgg+ needs, each round, two fresh X25519 key pairs per client (c: share
encryption, s: masking) and its neighbours' public keys, authenticated by its
identity key. Sending them in a setup exchange of their own costs one message
exchange per round, and in Flower's simulation an exchange has a floor of its own
(the dispatcher and one Ray call per message), so the keys are committed in advance:

- **Enrolment** (`query.secagg_enrol`, `enrol`): once per run (and again after
  `WINDOW` rounds), a client draws a per-run secret of 32 bytes from the OS
  (`os.urandom`), kept in its `context.state` so that a fresh process re-derives
  the same keys, and replies with its public keys for rounds r .. min(T, r + W - 1)
  (T = the announced `dp-rounds`), each round's pair signed with its identity key
  over (domain, run, round, identity name, c_pk, s_pk)
  (`identity.round_keys_message`). The server keeps them (`Directory`).
- **Each round** then starts with the share-keys exchange: the client re-derives its
  own pair for that round from the secret (`own_keys`), and refuses a round it has
  no committed keys for, or a run other than the one it enrolled in.

Why the keys stay fresh and independent per round. Round r's private keys are
HKDF-SHA256(secret, info = domain, run, r, kind): HKDF is a pseudorandom function of
the secret (RFC 5869; Krawczyk, CRYPTO 2010), so the outputs for different (run,
round, kind) are computationally independent, and seeing some of them (the masking
key of a dropout, which the server rebuilds from its neighbours' shares, is exactly
that) reveals nothing about the secret or any other round's keys. X25519 accepts
any 32 bytes as a private key (RFC 7748 clamps them), so the derived bytes are the
key. Each round's keys are still used for one round only, as with fresh key pairs.

Why a key cannot be moved to another round, run or identity. A neighbour accepts
a public key only with its owner's signature on (run, round, name, keys), checked
against the owner's pinned identity key (`identity`): a key committed for round r
offered in round r' != r, or under another identity's name, fails the check. What
the signature does not bind is the per-round *index* the server assigns: it is a
routing label and a Shamir x coordinate, which the server chooses each round after
the keys were committed. Every decision that matters for privacy is taken on
identities (names, and the round keys signed under them) instead: a client checks that its neighbours' names (and indices)
are distinct and not its own; a share's sender is authenticated by the Fernet key
agreed with the sender's signed key, and the plaintext names (sender index,
receiver index) as the sender saw them, so a share relabelled or rerouted by the
server fails authentication or the routing check; the consistency round signs the
survivor set as a set of round keys (`client.consistency`), and the unmasking decides
"seed share or key share" by the round key of the share's sender. A round key is
signed by exactly one identity for this run and round (an honest client commits one
pair per round), and every neighbour that gets past the masked input holds the same key
for a given client (a share made with another fails authentication). So one signed
survivor set names the same clients for every verifier, whatever indices each was
shown, and the consistency argument of `client` holds with identities in place of
indices. Keys rather than names: a client learns the identities of its neighbours only,
not who else took part in the round
(tests/secagg/test_round_keys.py scripts the index-remapping attacks).

The replay rule (one round's protocol once, rounds only forward, none past T) is
enforced at the share-keys exchange, the first message of a round (`client`).
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dpfl_app.secagg import masks
from dpfl_app.secagg.identity import DOMAIN, Identity, round_keys_message

WINDOW = 100  # rounds committed per enrolment: about 130 bytes of reply per round
SECRET_BYTES = 32
# The client's state that outlives a round (the rest is one round's protocol state).
PERSISTENT = ("run-secret", "run-session", "enrolled-from", "enrolled-to")
KINDS = (b"c", b"s")  # c: share encryption, s: masking


NOT_ENROLLED = "committed no keys"  # in a refusal's reason: the server enrols the node again


class NotEnrolled(Exception):
    """This client committed no keys for the round (or run) it is asked to take part in."""


def derive(secret: bytes, session: int, round_id: int, kind: bytes) -> bytes:
    """Round `round_id`'s raw X25519 private key of `kind` (b"c" or b"s")."""
    info = b"|".join([DOMAIN, b"round-key", int(session).to_bytes(16, "big", signed=True),
                      int(round_id).to_bytes(8, "big", signed=True), kind])
    return HKDF(hashes.SHA256(), SECRET_BYTES, None, info).derive(secret)


def key_pairs(secret: bytes, session: int, round_id: int) -> tuple[bytes, bytes, bytes, bytes]:
    """(c_sk, c_pk, s_sk, s_pk) of one round, raw 32 bytes each."""
    out = []
    for kind in KINDS:
        private = derive(secret, session, round_id, kind)
        out += [private, masks.public_raw(X25519PrivateKey.from_private_bytes(private))]
    return tuple(out)


def persistent(state: dict) -> dict:
    """The part of the client's state that every round keeps."""
    return {key: state[key] for key in PERSISTENT if key in state}


def window(round_id: int, announced_rounds: int | None) -> list[int]:
    """The rounds one enrolment commits: r .. min(T, r + WINDOW - 1)."""
    last = round_id + WINDOW - 1
    if announced_rounds is not None:
        last = min(last, int(announced_rounds))
    return list(range(round_id, last + 1))


def enrol(state: dict, request: dict, identity: Identity) -> tuple[dict, dict]:
    """Commit signed public keys for a window of rounds from `request["round"]` on."""
    session, first = int(request["session"]), int(request["round"])
    if state.get("run-session") != session or "run-secret" not in state:
        state = {"run-secret": os.urandom(SECRET_BYTES), "run-session": session}
    rounds = window(first, request.get("dp-rounds"))
    c_pks, s_pks, signatures = [], [], []
    for round_id in rounds:
        _, c_pk, _, s_pk = key_pairs(state["run-secret"], session, round_id)
        c_pks.append(c_pk)
        s_pks.append(s_pk)
        signatures.append(identity.sign(round_keys_message(session, round_id, identity.name,
                                                           c_pk, s_pk)))
    if rounds:
        state = {**state, "enrolled-from": min(rounds[0], state.get("enrolled-from", rounds[0])),
                 "enrolled-to": max(rounds[-1], state.get("enrolled-to", rounds[-1]))}
    return state, {"rounds": rounds, "c_pks": c_pks, "s_pks": s_pks, "signatures": signatures,
                   "id_name": identity.name, "id_pk": identity.public}


def own_keys(state: dict, session: int, round_id: int) -> tuple[bytes, bytes]:
    """This client's committed private keys (c_sk, s_sk) for the round; `NotEnrolled` when
    it committed none."""
    if state.get("run-session") != session or "run-secret" not in state:
        raise NotEnrolled(f"this node {NOT_ENROLLED} for this run (round {round_id})")
    if not state["enrolled-from"] <= round_id <= state["enrolled-to"]:
        raise NotEnrolled(f"this node {NOT_ENROLLED} for round {round_id}")
    return tuple(derive(state["run-secret"], session, round_id, kind) for kind in KINDS)


class Directory:
    """The server's store of committed keys, by node: who still needs an enrolment."""

    def __init__(self) -> None:
        self.names: dict[int, tuple[str, bytes]] = {}  # node -> (identity name, relayed key)
        self.keys: dict[int, dict[int, tuple[bytes, bytes, bytes]]] = {}  # node -> round -> keys

    def has(self, node: int, round_id: int) -> bool:
        return round_id in self.keys.get(node, {})

    def receive(self, node: int, reply: dict) -> None:
        """Store a node's enrolment; a malformed one, or a name another node holds, is
        ignored (the node then has no keys and sits the round out)."""
        try:
            name, id_pk = str(reply["id_name"]), reply["id_pk"]
            columns = [list(reply[key]) for key in ("rounds", "c_pks", "s_pks", "signatures")]
        except (KeyError, TypeError):
            return
        if len({len(c) for c in columns}) != 1 or any(
                other != node and held[0] == name for other, held in self.names.items()):
            return
        self.names[node] = (name, id_pk)
        rounds = self.keys.setdefault(node, {})
        for round_id, c_pk, s_pk, signature in zip(*columns):
            rounds[int(round_id)] = (c_pk, s_pk, signature)

    def forget(self, node: int) -> None:
        """Drop a node's keys (it no longer holds them: a refusal with `NOT_ENROLLED`, say
        after losing its state): it is enrolled again when next sampled."""
        self.keys.pop(node, None)

    def round_keys(self, node: int, round_id: int) -> dict:
        """What `ServerRound.add_keys` takes for this node and round."""
        name, id_pk = self.names[node]
        c_pk, s_pk, signature = self.keys[node][round_id]
        return {"name": name, "id_pk": id_pk, "c_pk": c_pk, "s_pk": s_pk, "sig": signature}

    def prune(self, before: int) -> None:
        """Forget the keys of rounds before `before` (they are never offered again)."""
        for rounds in self.keys.values():
            for round_id in [r for r in rounds if r < before]:
                del rounds[round_id]
