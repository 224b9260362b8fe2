"""The whole protocol in one process: every client and the server, with dropouts.

Used by the tests and by the benchmark at cohort sizes a 2-core simulation
cannot reach. It runs exactly the functions the Flower handlers run, minus the
messages; `drop` names the clients that vanish before each stage. Clients
sign with `identities` (default: a fresh relayed identity each) and see the
announcement `announced` (default: m = the cohort, fixed-size sampling).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dpfl_app.secagg import client, quantize
from dpfl_app.secagg.identity import Identity
from dpfl_app.secagg.server import ServerRound

STAGES = ("setup", "share_keys", "masked_input", "consistency", "unmask")


@dataclass
class Outcome:
    total: np.ndarray | None  # the unmasked sum modulo 2**64, or None: noise only
    survivors: list[int]  # U3, the clients whose inputs are in the sum
    refusals: dict[int, str] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)  # per client, payload bytes sent
    bytes_down: dict[int, int] = field(default_factory=dict)  # per client, payload received
    client_seconds: dict[int, float] = field(default_factory=dict)  # per client, CPU in stages
    server_seconds: float = 0.0  # bookkeeping, routing and unmasking


def _size(reply) -> int:
    if isinstance(reply, np.ndarray):
        return reply.nbytes
    return sum(len(v) if isinstance(v, (bytes, str)) else
               sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in v)
               if isinstance(v, list) else 8 for v in reply.values())


def relayed_identities(n: int) -> dict[int, Identity]:
    """A fresh identity per client 1..n, verified by relayed keys (simulation's default)."""
    return {i: Identity(Ed25519PrivateKey.generate()) for i in range(1, n + 1)}


def run_round(encoded: list[np.ndarray], neighbours: int = 0,
              drop: dict[str, set[int]] | None = None, round_id: int = 1,
              rng: random.Random | None = None, identities: dict[int, Identity] | None = None,
              announced: dict | None = None, bits: int = 64) -> Outcome:
    """One round over clients 1..n holding `encoded` (uint64 vectors of equal length),
    masked modulo 2**bits (noise-at=clients: `encoded` are residues modulo 2**bits)."""
    drop = drop or {}
    identities = identities or relayed_identities(len(encoded))
    announced = announced or {"dp-clients": len(encoded), "dp-sampling": "fixed"}
    server = ServerRound(round_id, len(encoded), neighbours, rng)
    states: dict[int, dict] = {}
    out = Outcome(None, [])
    alive = set(server.indices)

    def step(stage, request_for, answer, receive):
        alive.difference_update(drop.get(stage, set()))
        for i in sorted(alive):
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

    def do_setup(i, request):
        states[i], reply = client.setup({}, {**request, **announced}, identities[i])
        return reply

    def do_share(i, request):
        states[i], reply = client.share_keys(states[i], request, identities[i])
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

    step("setup", server.setup_request, do_setup, server.receive_setup)
    step("share_keys", server.share_keys_request, do_share, server.receive_share_keys)
    step("masked_input", server.shares_for, do_mask, server.receive_input)
    step("consistency", server.consistency_request, do_consistency, server.receive_consistency)
    step("unmask", server.unmask_request, do_unmask, server.receive_unmask)
    start = time.perf_counter()
    out.total = server.unmasked_sum()
    out.server_seconds += time.perf_counter() - start
    out.survivors = sorted(server.inputs)
    return out


def encode_all(deltas: list[np.ndarray], bits: list[int], clip_norm: float,
               seed: int = 0) -> list[np.ndarray]:
    """Each client's encoded update, with a seeded rounding RNG (tests and benchmarks)."""
    rng = np.random.default_rng(seed)
    return [quantize.encode_update(d, b, clip_norm, rng) for d, b in zip(deltas, bits)]
