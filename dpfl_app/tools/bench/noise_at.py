"""Round wall time with noise-at=clients against secure aggregation with server noise.

    python -m dpfl_app.tools.bench.noise_at [--population 100] [--clients 50]
                                            [--rounds 2] [--reps 3] [--model digits-mlp]
                                            [--protocol-only --dim 2410]

Runs the real ServerApp and ClientApp in one process (`tools/inprocess.py`: every
stage message is delivered to the ClientApp, which trains, encodes and masks;
the server runs every stage and the release) with `secure-aggregation=true`,
alternating noise-at=server and noise-at=clients (interleaved, so that load
from other jobs hits both alike). A round's seconds come from the operator's
diagnostics; round 1 pays the start-up and is left out. Prints the mean per
mode, the ratio clients/server, and the load average before and after.
With --protocol-only it times one round of the protocol alone (no training, no
ServerApp; `secagg/inprocess.py`): every client's encoding (fixed point, or
rotation + rounding + Skellam shares mod 2^20), all five stages and the server's
decoding, for m clients of `dim` coordinates. Training adds the same time to both
modes, so that ratio bounds the round's ratio from above.
Message transport is not included: it is the same for both modes (the
messages have the same number and nearly the same size: the clients' masked
vectors hold d' + 1 = 2^ceil(log2 d) + 1 words instead of d + 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dpfl_app.run.outputs import read_diagnostics
from dpfl_app.tools.bench import default_run_config
from dpfl_app.tools.inprocess import run_server


def round_seconds(population: int, clients: int, rounds: int, noise_at: str, model: str,
                  work: Path) -> list[float]:
    out = work / f"{noise_at}-{len(list(work.iterdir()))}"
    run_server(default_run_config(**{
        "output-dir": str(out), "rounds": rounds, "clients": clients, "sampling": "fixed",
        "population": population, "secure-aggregation": True, "noise-at": noise_at,
        "noise": 1.0, "model": model}), num_nodes=population)
    (run_dir,) = list(out.iterdir())
    return [d["seconds"] for d in read_diagnostics(run_dir)][1:]


def protocol_seconds(clients: int, dim: int, noise_at: str, seed: int) -> float:
    """One round of the protocol alone, encoding and decoding included (see above)."""
    from dpfl_app.privacy import skellam
    from dpfl_app.privacy.distributed_ledger import noise_threshold, plan
    from dpfl_app.secagg import discrete, inprocess, quantize

    rng = np.random.default_rng(seed)
    deltas = [rng.normal(size=dim) * 0.1 / np.sqrt(dim) for _ in range(clients)]
    start = time.perf_counter()
    if noise_at == "server":
        encoded = inprocess.encode_all(deltas, [1] * clients, 0.1, seed)
        out = inprocess.run_round(encoded)
        quantize.decode_sum(out.total, 0.1)
    else:
        p = plan(1.0, None, dim, 20, noise_threshold(0.8, clients), clients, clients).params
        enc = discrete.round_encoding(p, 0.1, b"s" * 32, 1)  # C_t = 0.1, as the clients
        encoded = [discrete.encode(d, 1, enc, rng, skellam.noise_share(p.padded_dim,
                                                                       p.share_variance),
                                   int(skellam.noise_share(1, p.count_share_variance)[0]))
                   for d in deltas]
        out = inprocess.run_round(encoded, bits=p.bits)
        discrete.decode(out.total & np.uint64(2**p.bits - 1), enc, dim)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", type=int, default=100)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="per run; round 1 is left out")
    parser.add_argument("--reps", type=int, default=3, help="runs per mode, interleaved")
    parser.add_argument("--model", default="digits-mlp")
    parser.add_argument("--protocol-only", action="store_true")
    parser.add_argument("--dim", type=int, default=2410, help="--protocol-only: coordinates")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"server": [], "clients": []}
    with tempfile.TemporaryDirectory(prefix="bench-noise-at-") as tmp:
        for rep in range(args.reps):
            for mode in (("server", "clients") if rep % 2 == 0 else ("clients", "server")):
                if args.protocol_only:
                    times[mode].append(protocol_seconds(args.clients, args.dim, mode, rep))
                else:
                    times[mode] += round_seconds(args.population, args.clients, args.rounds,
                                                 mode, args.model, Path(tmp))
    mean = {mode: statistics.mean(values) for mode, values in times.items()}
    result = {"population": args.population, "clients": args.clients,
              "model": f"protocol only, d={args.dim}" if args.protocol_only else args.model,
              "round_seconds": times, "mean": mean, "ratio": mean["clients"] / mean["server"],
              "load_before": load_before, "load_after": os.getloadavg()}
    print(json.dumps(result, indent=1))
    print(f"(N, m) = ({args.population}, {args.clients}), {result['model']}: secure aggregation "
          f"round {mean['server']:.2f} s with server noise, {mean['clients']:.2f} s with "
          f"noise-at=clients: ratio {result['ratio']:.3f} (load {load_before[0]:.1f} -> "
          f"{result['load_after'][0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
