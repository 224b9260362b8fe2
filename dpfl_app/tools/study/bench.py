"""Benchmark the study engine against `flwr run` and pfl-research on one workload.

    dpfl bench-study [--population 1437 --clients 718 --rounds 50]
                     [--flwr-rounds 3] [--pfl-python pflvenv/bin/python]

The workload: digits, N one-image users, m per round (Poisson), the app's MLP,
target epsilon 2 at delta 1e-5. Each engine's cost per client update is its
training-loop wall time over the client updates it made (rounds x cohort):

* inprocess: the study engine (`engine.run_study`); the loop's rounds, without
  the one-off start (imports, reading the partitions);
* flwr: a real `flwr run .` on N SuperNodes (`bench.simulation.run_app`), its
  steady-state round time over m. At N=1437, m=718 a run of 50 rounds takes
  long on a small machine: `--flwr-rounds` runs fewer and the cost per update
  is extrapolated to the 50 rounds (said in the output);
* pfl: pfl-research 0.6.0 in its own environment (`pfl_workload.py`), its whole
  training loop over its client updates.

It prints numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpfl_app.tools.bench import default_run_config
from dpfl_app.tools.cli import HelpFormatter

WORKLOAD = Path(__file__).with_name("pfl_workload.py")


def engine_cost(config: dict, population: int) -> dict:
    from dpfl_app.tools.study.engine import run_study

    start = time.perf_counter()
    result = run_study(config, population)
    rounds = result["rounds"]
    loop = sum(r["round_s"] for r in rounds)
    updates = sum(d["num_sampled"] for d in result["diagnostics"])
    client = sum(r["train_s"] + r["dp_s"] for r in rounds)
    return {"engine": "inprocess", "rounds": len(rounds), "updates": updates,
            "loop_s": loop, "total_s": time.perf_counter() - start,
            "ms_per_client_update": 1000 * loop / updates,
            "ms_per_client_update_train_and_dp": 1000 * client / updates,
            "account_s_per_round": sum(r["account_s"] for r in rounds) / len(rounds),
            "test_accuracy": result["final"]["test_accuracy"],
            "epsilon": result["final"]["epsilon"]}


def flwr_cost(run_config: str, population: int, clients: int, rounds: int,
              timeout: float) -> dict:
    from dpfl_app.tools.bench.simulation import run_app

    with tempfile.TemporaryDirectory(prefix="dpfl-bench-study-") as home:
        result = run_app(Path(home), population, run_config, rounds, timeout=timeout,
                         env={"DPFL_CACHE_DIR": str(Path(home) / "cache")})
    # Steady-state round time (median after the first) over the expected cohort.
    per_update = (1000 * result["round_s"] / clients) if result["round_s"] else None
    return {"engine": "flwr", "status": result["status"], "rounds": rounds,
            "round_s": result["round_s"], "first_round_s": result["first_round_s"],
            "total_s": result["total_s"], "ms_per_client_update": per_update}


def pfl_cost(python: str, args) -> dict:
    command = [python, str(WORKLOAD), "--population", str(args.population), "--clients",
               str(args.clients), "--rounds", str(args.pfl_rounds or args.rounds),
               "--epsilon", str(args.epsilon), "--lr", str(args.lr),
               "--server-lr", str(args.server_lr)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                          check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"engine": "pfl", "error": (done.stderr or done.stdout)[-500:]}
    return json.loads(lines[-1])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dpfl bench-study", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--population", type=int, default=1437, help="N: one-image users")
    parser.add_argument("--clients", type=int, default=718, help="m: expected cohort")
    parser.add_argument("--rounds", type=int, default=50, help="rounds of the workload")
    parser.add_argument("--epsilon", type=float, default=2.0, help="target epsilon")
    parser.add_argument("--lr", type=float, default=0.1, help="client learning rate")
    parser.add_argument("--server-lr", type=float, default=4.0, help="server step")
    parser.add_argument("--flwr-rounds", type=int, default=0,
                        help="rounds of the flwr run (0: skip it; fewer than --rounds: "
                             "extrapolate its steady-state cost per update)")
    parser.add_argument("--pfl-python", default="",
                        help="python of an environment with pfl==0.6.0 (empty: skip pfl)")
    parser.add_argument("--pfl-rounds", type=int, default=0, help="pfl rounds (0: as --rounds)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per flwr or pfl run")
    parser.add_argument("--output", type=Path, default=Path("bench-study.json"),
                        help="JSON file of every number")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    keys = (f"clients={args.clients} target-epsilon={args.epsilon} lr={args.lr} "
            f"server-lr={args.server_lr} deterministic-noise=true")
    config = default_run_config(**{"clients": args.clients, "target-epsilon": args.epsilon,
                                   "lr": args.lr, "server-lr": args.server_lr,
                                   "deterministic-noise": True, "rounds": args.rounds})
    report = {"workload": keys, "population": args.population, "rounds": args.rounds,
              "load_average": os.getloadavg(), "cores": os.cpu_count(), "engines": []}
    report["engines"].append(engine_cost(config, args.population))
    if args.flwr_rounds:
        report["engines"].append(flwr_cost(keys, args.population, args.clients,
                                           args.flwr_rounds, args.timeout))
    if args.pfl_python:
        report["engines"].append(pfl_cost(args.pfl_python, args))
    report["load_average_end"] = os.getloadavg()
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


def table(report: dict) -> str:
    ours = report["engines"][0]["ms_per_client_update"]
    rows = [f"N={report['population']}, {report['workload']}; load average "
            f"{report['load_average'][0]:.1f} on {report['cores']} cores",
            "| engine | rounds timed | ms per client update | x the study engine's cost |",
            "|:---|---:|---:|---:|"]
    for e in report["engines"]:
        cost = e.get("ms_per_client_update")
        note = (f" (extrapolated from {e['rounds']} rounds)"
                if e["engine"] == "flwr" and e["rounds"] < report["rounds"] else "")
        rows.append(f"| {e['engine']}{note} | {e.get('rounds', '-')} | "
                    + (f"{cost:.3f} | {cost / ours:.1f} |" if cost else
                       f"- | {e.get('error') or e.get('status')} |"))
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
