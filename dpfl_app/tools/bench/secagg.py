"""Cost of secure aggregation: the SecAgg+ protocol in one process, at several cohort sizes.

    python -m dpfl_app.tools.bench.secagg [--cohorts 6,50,200] [--dim 2410]
                                          [--neighbours 0,16] [--dropout 0.1]

For each cohort size m and neighbourhood size k (0 = every other client: the
complete graph of SecAgg), it runs one round of the real protocol functions
(`dpfl_app.secagg.client` and `.server`, the code the Flower handlers call)
on random clipped updates of `dim` coordinates (2410: the default digits-mlp),
with no dropout and with a fraction `dropout` of the clients vanishing after
sharing their keys (the server then rebuilds their keys and recomputes their
pairwise masks: the expensive case). The clients enrolled before the timed round
(their pre-committed round keys, `secagg.round_keys`): the round is the steady
state, four stages, as every round after a run's first. It prints, per client, the mean seconds
of protocol work and the payload bytes sent and received, and the server's
seconds; the plain (secure-aggregation=false) upload is 4 bytes per float32
coordinate plus the norm bit. Training time is not included: it is the same
with and without secure aggregation.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import numpy as np

from dpfl_app.secagg import graph, inprocess, quantize


def measure(cohort: int, neighbours: int, dim: int, dropout: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    deltas = [rng.normal(size=dim) * 0.1 / np.sqrt(dim) for _ in range(cohort)]
    encoded = inprocess.encode_all(deltas, [1] * cohort, 0.1, seed)
    count = max(1, round(dropout * cohort)) if dropout > 0 else 0
    dropped = set(random.Random(seed).sample(range(1, cohort + 1), count))
    identities = inprocess.relayed_identities(cohort)
    announced = inprocess.default_announcement(cohort)
    federation = inprocess.enrolled(identities, announced)
    start = time.perf_counter()
    out = inprocess.run_round(encoded, neighbours, drop={"masked_input": dropped},
                              rng=random.Random(seed + 1),  # not the dropout RNG
                              identities=identities, announced=announced,
                              federation=federation)
    wall = time.perf_counter() - start
    assert out.total is not None, "the round should complete"
    k = graph.neighbours_per_client(neighbours, cohort)
    survivors = out.survivors
    return {"m": cohort, "k": k, "t": graph.threshold(k), "dim": dim, "dropped": len(dropped),
            "wall_s": wall, "server_s": out.server_seconds,
            "client_s_mean": float(np.mean([out.client_seconds[i] for i in survivors])),
            "bytes_up_mean": float(np.mean([out.bytes_up[i] for i in survivors])),
            "bytes_down_mean": float(np.mean([out.bytes_down[i] for i in survivors])),
            "plain_bytes_up": 4 * dim + 8,
            "sum_error_bound": quantize.sum_error_bound(len(survivors), dim, 0.1)}


def table(rows: list[dict]) -> str:
    lines = ["| m | k | t | dropped | client s (mean) | server s | client bytes up | "
             "client bytes down | plain bytes up |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['m']} | {r['k']} | {r['t']} | {r['dropped']} | "
                     f"{r['client_s_mean']:.3f} | {r['server_s']:.2f} | "
                     f"{r['bytes_up_mean']:,.0f} | {r['bytes_down_mean']:,.0f} | "
                     f"{r['plain_bytes_up']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpfl_app.tools.bench.secagg",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohorts", default="6,50,200")
    parser.add_argument("--neighbours", default="0,16", help="k values; 0 = all others")
    parser.add_argument("--dim", type=int, default=2410)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--output", default="")
    args = parser.parse_args(argv)
    rows = []
    for cohort in (int(c) for c in args.cohorts.split(",")):
        for k in sorted({graph.neighbours_per_client(int(v), cohort)
                         for v in args.neighbours.split(",")}):
            for dropout in (0.0, args.dropout):
                rows.append(measure(cohort, k, args.dim, dropout))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
