"""Cost of one pass of Flower's simulation engine over its message store.

    python -m dpfl_app.tools.bench.extractor [--scales 100:50,1000:200,1000:0]

In a local simulation, Flower 1.42's engine hands messages to the ClientApp
actors from a thread (`add_messages_to_queue` in
`flwr/server/superlink/fleet/vce/vce_api.py`) that calls
`state.get_message_ins(node_id, limit=1)` for *every* registered node, then
waits 0.1 s, for as long as the run lasts. `InMemoryLinkState.get_message_ins`
walks the whole message store for each node, checking each stored message's
expiry and federation under the state's lock. Messages stay in the store
until their replies are pulled, so while one exchange of m messages is in
flight, a pass costs O(N·m) checks: it grows with the population times the
cohort, and every message exchange of a round pays it for its whole duration.

This builds Flower's real in-memory LinkState with N registered nodes and
`inflight` stored (already delivered) messages, and times one such pass:
wall seconds and this process's CPU seconds. Nothing here is the app's code;
it is the floor under every exchange of `flwr run` in simulation.
"""

from __future__ import annotations

import argparse
import secrets
import time
from types import SimpleNamespace

from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.date import now
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.federation.noop_federation_manager import NOOP_FEDERATION_ID


def one_pass(population: int, inflight: int) -> dict:
    """Seconds (wall, CPU) of one extractor pass over `population` nodes."""
    state = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                             ObjectStoreFactory()).state()
    nodes = []
    for _ in range(population):  # as vce_api._register_nodes does
        node = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32),
                                 heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        nodes.append(node)
    # The fields get_message_ins reads, for a run and messages already handed out:
    # delivered messages stay in the store (and in every scan) until their reply is pulled.
    state.run_ids[1] = SimpleNamespace(run=SimpleNamespace(federation_id=NOOP_FEDERATION_ID))
    created = now().timestamp()
    for i, node in enumerate(nodes[:inflight]):
        state.message_ins_store[str(i)] = SimpleNamespace(metadata=SimpleNamespace(
            created_at=created, ttl=1e9, src_node_id=0, dst_node_id=node, run_id=1,
            delivered_at="delivered"))
    wall, cpu = time.perf_counter(), time.process_time()
    for node in nodes:
        state.get_message_ins(node_id=node, limit=1)
    return {"population": population, "inflight": inflight,
            "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpfl_app.tools.bench.extractor",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="100:50,1000:200,1000:0",
                        help="N:in-flight pairs (default: 100:50,1000:200,1000:0)")
    args = parser.parse_args(argv)
    print("| N | messages in flight | one pass: wall s | CPU s |\n|---:|---:|---:|---:|")
    for scale in args.scales.split(","):
        population, inflight = (int(v) for v in scale.split(":"))
        row = one_pass(population, min(inflight, population))
        print(f"| {population} | {row['inflight']} | {row['wall_s']:.3f} | {row['cpu_s']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
