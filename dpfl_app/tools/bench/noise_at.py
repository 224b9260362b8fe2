"""Round wall time with noise-at=clients against secure aggregation with server noise.

    python -m dpfl_app.tools.bench.noise_at [--population 100] [--clients 50]
                                            [--rounds 2] [--reps 3] [--model digits-mlp]

Runs the real ServerApp and ClientApp in one process (`tools/inprocess.py`: every
stage message is delivered to the ClientApp, which trains, encodes and masks;
the server runs every stage and the release) with `secure-aggregation=true`,
alternating noise-at=server and noise-at=clients (interleaved, so that load
from other jobs hits both alike). A round's seconds come from the operator's
diagnostics; round 1 pays the start-up and is left out. Prints the mean per
mode, the ratio clients/server, and the load average before and after.
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
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", type=int, default=100)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="per run; round 1 is left out")
    parser.add_argument("--reps", type=int, default=3, help="runs per mode, interleaved")
    parser.add_argument("--model", default="digits-mlp")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"server": [], "clients": []}
    with tempfile.TemporaryDirectory(prefix="bench-noise-at-") as tmp:
        for rep in range(args.reps):
            for mode in (("server", "clients") if rep % 2 == 0 else ("clients", "server")):
                times[mode] += round_seconds(args.population, args.clients, args.rounds, mode,
                                             args.model, Path(tmp))
    mean = {mode: statistics.mean(values) for mode, values in times.items()}
    result = {"population": args.population, "clients": args.clients, "model": args.model,
              "round_seconds": times, "mean": mean, "ratio": mean["clients"] / mean["server"],
              "load_before": load_before, "load_after": os.getloadavg()}
    print(json.dumps(result, indent=1))
    print(f"(N, m) = ({args.population}, {args.clients}), {args.model}: secure aggregation "
          f"round {mean['server']:.2f} s with server noise, {mean['clients']:.2f} s with "
          f"noise-at=clients: ratio {result['ratio']:.3f} (load {load_before[0]:.1f} -> "
          f"{result['load_after'][0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
