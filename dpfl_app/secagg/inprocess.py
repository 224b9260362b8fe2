"""The whole protocol in one process: every client and the server, with dropouts.

Used by the tests and by the benchmark at cohort sizes a 2-core simulation
cannot reach. It runs exactly the functions the Flower handlers run, minus the
messages; `drop` names the clients that vanish before each stage. Clients
sign with `identities` (default: a fresh relayed identity each) and see the
announcement `announced` (default: m = the cohort, fixed-size sampling, T = this
round). A `Federation` keeps the clients' states and the server's key directory
between rounds: clients without committed keys for the round are enrolled first
(stage "enrol"; in steady state there is none), as the strategy does.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dpfl_app.secagg import client, quantize, round_keys
from dpfl_app.secagg.identity import Identity
from dpfl_app.secagg.server import ServerRound

STAGES = ("enrol", "share_keys", "masked_input", "consistency", "unmask")
SESSION = 7  # the run id every client sees


@dataclass
class Outcome:
    total: np.ndarray | None  # the unmasked sum modulo 2**64, or None: noise only
    survivors: list[int]  # U3, the clients whose inputs are in the sum
    refusals: dict[int, str] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)  # per client, payload bytes sent
    bytes_down: dict[int, int] = field(default_factory=dict)  # per client, payload received
    client_seconds: dict[int, float] = field(default_factory=dict)  # per client, CPU in stages
    server_seconds: float = 0.0  # bookkeeping, routing and unmasking
    server: ServerRound | None = None  # the round's server state (tests read the shares)


def _size(reply) -> int:
    if isinstance(reply, np.ndarray):
        return reply.nbytes
    return sum(len(v) if isinstance(v, (bytes, str)) else
               sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in v)
               if isinstance(v, list) else 8 for v in reply.values())


def relayed_identities(n: int) -> dict[int, Identity]:
    """A fresh identity per client 1..n, verified by relayed keys (simulation's default)."""
    return {i: Identity(Ed25519PrivateKey.generate()) for i in range(1, n + 1)}


@dataclass
class Federation:
    """What outlives a round: each client's state (its per-run secret) and the server's
    directory of committed keys. Client i is node i."""

    states: dict[int, dict] = field(default_factory=dict)
    directory: round_keys.Directory = field(default_factory=round_keys.Directory)


def enrolled(identities: dict[int, Identity], announced: dict, round_id: int = 1) -> Federation:
    """Every client enrolled from `round_id` on (what round 1 of a run does first): the
    rounds after it are the steady state, with no enrolment exchange."""
    federation = Federation()
    for i, ident in identities.items():
        federation.states[i], reply = round_keys.enrol(
            {}, {"round": round_id, "session": SESSION, **announced}, ident)
        federation.directory.receive(i, reply)
    return federation


def default_announcement(n: int, round_id: int = 1) -> dict:
    """m = the cohort, fixed-size sampling, T = this round."""
    return {"dp-clients": n, "dp-sampling": "fixed", "dp-rounds": round_id}


def run_round(encoded: list[np.ndarray], neighbours: int = 0,
              drop: dict[str, set[int]] | None = None, round_id: int = 1,
              rng: random.Random | None = None, identities: dict[int, Identity] | None = None,
              announced: dict | None = None, bits: int = 64,
              federation: Federation | None = None) -> Outcome:
    """One round over clients 1..n holding `encoded` (uint64 vectors of equal length),
    masked modulo 2**bits (noise-at=clients: `encoded` are residues modulo 2**bits)."""
    drop = drop or {}
    identities = identities or relayed_identities(len(encoded))
    announced = announced or default_announcement(len(encoded), round_id)
    federation = federation or Federation()
    states, directory = federation.states, federation.directory
    out = Outcome(None, [])
    everyone = list(range(1, len(encoded) + 1))
    alive = set(everyone)

    def step(stage, request_for, answer, receive, among=None):
        alive.difference_update(drop.get(stage, set()))
        for i in sorted(alive if among is None else alive & among):
            start = time.perf_counter()
            request = request_for(i)
            middle = time.perf_counter()
            try:
                reply = answer(i, request)
            except client.SecAggRefusal as refusal:
                out.refusals[i] = str(refusal)
                alive.discard(i)
                continue
            end = time.perf_counter()
            receive(i, reply)
            out.server_seconds += middle - start + time.perf_counter() - end
            out.client_seconds[i] = out.client_seconds.get(i, 0.0) + end - middle
            out.bytes_up[i] = out.bytes_up.get(i, 0) + _size(reply)
            out.bytes_down[i] = out.bytes_down.get(i, 0) + _size(request)

    def do_enrol(i, request):
        states[i], reply = round_keys.enrol(states.get(i, {}), request, identities[i])
        return reply

    def do_share(i, request):
        request = {**request, **announced, "session": SESSION}
        states[i], reply = client.share_keys(states.get(i, {}), request, identities[i])
        return reply

    def do_consistency(i, request):
        states[i], reply = client.consistency(states[i], request, identities[i])
        return reply

    def do_mask(i, request):
        states[i] = client.receive_shares(states[i], request)
        states[i], vector = client.masked_input(states[i], encoded[i - 1], bits)
        return vector

    def do_unmask(i, request):
        states[i], reply = client.unmask(states[i], request)
        return reply

    unenrolled = {i for i in everyone if not directory.has(i, round_id)}
    step("enrol", lambda i: {"round": round_id, "session": SESSION, **announced},
         do_enrol, directory.receive, among=unenrolled)
    cohort = [i for i in sorted(alive) if directory.has(i, round_id)]
    server = ServerRound(round_id, len(cohort), neighbours, rng, indices=cohort)
    for i in cohort:
        server.add_keys(i, directory.round_keys(i, round_id))
    alive.intersection_update(cohort)
    step("share_keys", server.share_keys_request, do_share, server.receive_share_keys)
    step("masked_input", server.shares_for, do_mask, server.receive_input)
    step("consistency", server.consistency_request, do_consistency, server.receive_consistency)
    step("unmask", server.unmask_request, do_unmask, server.receive_unmask)
    start = time.perf_counter()
    out.total = server.unmasked_sum()
    out.server_seconds += time.perf_counter() - start
    out.survivors = sorted(server.inputs)
    out.server = server
    return out


def encode_all(deltas: list[np.ndarray], bits: list[int], clip_norm: float,
               seed: int = 0) -> list[np.ndarray]:
    """Each client's encoded update, with a seeded rounding RNG (tests and benchmarks)."""
    rng = np.random.default_rng(seed)
    return [quantize.encode_update(d, b, clip_norm, rng) for d, b in zip(deltas, bits)]
