"""Benchmark the study engine against pfl-research and `flwr run` on one equal workload.

    dpfl bench-study [--scales 1437:718,1000:100,100:10] [--rounds 10,50]
                     [--workload app|pfl-benchmark] [--repeats 3]
                     [--pfl-python pflvenv/bin/python] [--flwr-rounds 3]
                     [--table /tmp/bench-study.md] [--benchmark-scale 100:5:50]

`--table FILE` runs the whole performance table (bench_table.py) and writes it
as Markdown.

Equal work, stated and checked. For each scale (N users, m expected per round)
and round count, both engines get the same workload: the users' data as the
app's ClientApps hold them (written to a file that pfl reads; its sha256 is
compared), the same model, local epochs, batch size, learning rates and
momentum, Poisson cohorts of expected size m, the same noise multiplier z and
count noise sigma_b, and adaptive clipping from the same initial clip. Each
engine reports the workload it ran; the two are printed side by side and the
benchmark stops with an error when any line differs.

Equal timers. Set-up is excluded from both alike: imports, data, model, the
noise calibration (done here once, then given to both), and one throwaway
local step (each framework's first training call pays one-off imports). The
timer covers every round and one evaluation of the final model on the test
set; the engine reads no per-round epsilon (`report_every=0`), as pfl computes
none. Cost per client update = timer / client updates actually trained.

Interleaved: the engine and pfl alternate (A, B, A, B...), each run in a fresh
process; the table gives medians, the ratio of the medians, and the load
average at every run. `--workload pfl-benchmark` takes the structure of
pfl-research's image-classification benchmark (benchmarks/image_classification/
configs/baseline.yaml: one local epoch, batch size 10, local lr 0.1, central
lr 1.0, clip bound 0.4, epsilon 2 at delta 1e-6, a small CNN, users of equal
size) onto the digits data, since CIFAR-10 cannot be downloaded here.

`--flwr-rounds R` adds a real `flwr run .` on N SuperNodes per scale: its
steady-state round time (median after the first) over m; its start-up is
reported apart. It prints numbers; it asserts nothing but the workloads' equality.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dpfl_app.tools.bench import default_run_config
from dpfl_app.tools.cli import HelpFormatter

WORKLOAD = Path(__file__).with_name("pfl_workload.py")
MOMENTUM = 0.9  # task.MOMENTUM; checked against it in the engine's run
# Run-config keys of each workload (beside clients, rounds, noise, clipped-count-stddev).
WORKLOADS = {
    "app": {"model": "digits-mlp", "local-epochs": 1, "batch-size": 16, "lr": 0.1,
            "server-lr": 4.0, "initial-clip": 0.1, "target-quantile": 0.5, "clip-lr": 0.2,
            "target-epsilon": 2.0, "target-delta": 1e-5},
    "pfl-benchmark": {"model": "digits-cnn", "local-epochs": 1, "batch-size": 10, "lr": 0.1,
                      "server-lr": 1.0, "initial-clip": 0.4, "target-quantile": 0.5,
                      "clip-lr": 0.2, "target-epsilon": 2.0, "target-delta": 1e-6},
}
# The workload lines both engines report; any difference stops the benchmark.
COMPARED = ("model", "weights", "population", "data", "local_epochs", "batch_size", "lr",
            "momentum", "server_lr", "clients", "sampling", "noise", "count_stddev",
            "initial_clip", "target_quantile", "clip_lr", "rounds", "timer")
TIMER = "all rounds + one evaluation of the final model; set-up and one warm-up step excluded"


def run_config(workload: str, population: int, clients: int, rounds: int) -> dict:
    """The engine's run-config: the workload's keys, its noise calibrated once here."""
    from dpfl_app.config import validate
    from dpfl_app.privacy.mechanism import split_noise
    from dpfl_app.strategy.build import choose_noise

    cfg = default_run_config(**WORKLOADS[workload], clients=clients, rounds=rounds,
                             **{"deterministic-noise": True})
    noise = choose_noise(validate(dict(cfg)), population)
    split = split_noise(noise, clients)
    return {**cfg, "noise": noise, "target-epsilon": 0.0,
            "clipped-count-stddev": split.count_stddev}


def workload_of(cfg: dict, population: int, data: str) -> dict:
    """The workload both engines are given (pfl reads it) and must report back."""
    return {"model": cfg["model"], "population": population, "data": data,
            "local_epochs": cfg["local-epochs"], "batch_size": cfg["batch-size"],
            "lr": cfg["lr"], "momentum": MOMENTUM, "server_lr": cfg["server-lr"],
            "clients": cfg["clients"], "sampling": "poisson", "noise": cfg["noise"],
            "count_stddev": float(cfg["clipped-count-stddev"]), "initial_clip": cfg["initial-clip"],
            "target_quantile": cfg["target-quantile"], "clip_lr": cfg["clip-lr"],
            "rounds": cfg["rounds"], "seed": cfg["seed"], "timer": TIMER}


def export_data(cfg: dict, population: int, path: Path) -> str:
    """The users' tensors as the ClientApps hold them, and the test set, to one .npz."""
    import numpy as np

    from dpfl_app.tools.study.engine import evaluation_sets, population_data
    from dpfl_app.tools.study.pfl_workload import fingerprint

    arrays = users_arrays(population_data(cfg, population))
    test = evaluation_sets(cfg, "test")["test"]
    np.savez(path, **arrays, test_images=test.images.numpy(),
             test_labels=test.labels.numpy().astype(np.int64))
    return fingerprint(arrays["images"], arrays["labels"], arrays["offsets"])


def users_arrays(users) -> dict:
    """Every user's examples end to end, and where each user's start (offsets)."""
    import numpy as np

    return {"images": np.concatenate([u.images.numpy() for u in users]),
            "labels": np.concatenate([u.labels.numpy() for u in users]).astype(np.int64),
            "offsets": np.cumsum([0] + [len(u.labels) for u in users]).astype(np.int64)}


def engine_run(cfg: dict, population: int) -> dict:
    """One timed engine run (in a fresh process: no cache of an earlier run helps it)."""
    from dpfl_app.task import MOMENTUM as APP_MOMENTUM, build_model
    from dpfl_app.tools.study.engine import population_data, run_study
    from dpfl_app.tools.study.pfl_workload import fingerprint

    result = run_study(cfg, population, report_every=0)
    arrays = users_arrays(population_data(cfg, population))  # what the engine trained on
    data = fingerprint(arrays["images"], arrays["labels"], arrays["offsets"])
    ran = {**workload_of(result["config"], result["population"], data),
           "momentum": APP_MOMENTUM, "rounds": result["final"]["rounds_completed"],
           "weights": sum(p.numel() for p in build_model(result["config"]["model"]).parameters())}
    updates = sum(d["num_sampled"] for d in result["diagnostics"])
    loop = result["final"]["loop_s"]
    phases = {k: sum(r[k] for r in result["rounds"]) for k in
              ("train_s", "dp_s", "account_s", "eval_s")}
    cpu = result["final"]["loop_cpu_s"]
    return {"engine": "study engine", "workload": ran, "updates": updates,
            "setup_s": result["final"]["setup_s"], "loop_s": loop, "loop_cpu_s": cpu,
            "ms_per_client_update": 1000 * loop / max(updates, 1),
            "cpu_ms_per_client_update": 1000 * cpu / max(updates, 1), "phases_s": phases,
            "test_accuracy": result["final"]["test_accuracy"]}


def _child(command: list[str], timeout: float) -> dict:
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{' '.join(command[:3])}... failed:\n{(done.stderr or done.stdout)[-2000:]}")
    return {**json.loads(lines[-1]), "load_average": load}


def check_equal(engine: dict, pfl: dict) -> list[str]:
    """The lines where the two workloads differ (none, or the benchmark stops)."""
    def same(a, b):
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1) if numbers else a == b
    return [f"{key}: engine {engine.get(key)!r}, pfl {pfl.get(key)!r}" for key in COMPARED
            if not same(engine.get(key), pfl.get(key))]


def side_by_side(engine: dict, pfl: dict) -> str:
    rows = ["| workload | study engine | pfl |", "|:---|:---|:---|"]
    rows += [f"| {key} | {engine.get(key)} | {pfl.get(key)} |" for key in COMPARED]
    return "\n".join(rows)


def flwr_cost(cfg: dict, population: int, rounds: int, timeout: float) -> dict:
    from dpfl_app.tools.bench.simulation import run_app
    from dpfl_app.tools.study.grid import toml_overrides

    keys = {k: cfg[k] for k in ("model", "local-epochs", "batch-size", "lr", "server-lr",
                                "initial-clip", "target-quantile", "clip-lr", "clients",
                                "noise", "clipped-count-stddev", "target-delta",
                                "deterministic-noise")}
    with tempfile.TemporaryDirectory(prefix="dpfl-bench-study-") as home:
        result = run_app(Path(home), population, toml_overrides(keys), rounds,
                         timeout=timeout, env={"DPFL_CACHE_DIR": str(Path(home) / "cache")})
    per_update = (1000 * result["round_s"] / cfg["clients"]) if result["round_s"] else None
    return {"engine": "flwr run", "status": result["status"], "rounds": rounds,
            "round_s": result["round_s"], "server_start_s": result["server_start_s"],
            "first_round_s": result["first_round_s"], "total_s": result["total_s"],
            "ms_per_client_update": per_update, "cpu_s": result["cpu_s"]}


def measure(args, workload: str, population: int, clients: int, rounds: int,
            folder: Path) -> dict:
    """Engine and pfl alternated `repeats` times on one workload: every run, medians, ratio."""
    cfg = run_config(workload, population, clients, rounds)
    stem = folder / f"{workload}-{population}-{clients}-{rounds}"
    data = export_data(cfg, population, stem.with_suffix(".npz"))
    work = workload_of(cfg, population, data)
    stem.with_suffix(".json").write_text(json.dumps(work))
    stem.with_suffix(".cfg.json").write_text(json.dumps(cfg))
    engine_cmd = [sys.executable, "-m", "dpfl_app.tools.study.bench", "--engine-run",
                  str(stem.with_suffix(".cfg.json")), "--population", str(population)]
    pfl_cmd = [args.pfl_python, str(WORKLOAD), "--workload", str(stem.with_suffix(".json")),
               "--data", str(stem.with_suffix(".npz"))]
    runs = {"engine": [], "pfl": []}
    for _ in range(args.repeats):
        runs["engine"].append(_child(engine_cmd, args.timeout))
        if args.pfl_python:
            runs["pfl"].append(_child(pfl_cmd, args.timeout))
    out = {"workload": workload, "population": population, "clients": clients,
           "rounds": rounds, "runs": runs}
    for name, done in runs.items():
        if done:
            out[name] = statistics.median(r["ms_per_client_update"] for r in done)
            out[f"{name}_cpu"] = statistics.median(r["cpu_ms_per_client_update"] for r in done)
    if runs["pfl"]:
        diff = check_equal(runs["engine"][0]["workload"], runs["pfl"][0]["workload"])
        out["side_by_side"] = side_by_side(runs["engine"][0]["workload"],
                                           runs["pfl"][0]["workload"])
        if diff:
            print(out["side_by_side"])
            raise SystemExit("the two engines ran different workloads:\n  " + "\n  ".join(diff))
        out["ratio"] = out["pfl"] / out["engine"]
        out["cpu_ratio"] = out["pfl_cpu"] / out["engine_cpu"]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dpfl bench-study", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--scales", default="1437:718,1000:100,100:10",
                        help="N:m pairs, comma-separated (N users, m expected per round)")
    parser.add_argument("--rounds", default="10,50", help="round counts, comma-separated")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="app",
                        help="app: the README's digits MLP; pfl-benchmark: pfl-research's "
                             "image-classification benchmark's structure on digits")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each engine, alternated")
    parser.add_argument("--flwr-rounds", type=int, default=None,
                        help="rounds of one `flwr run` per scale (0: skip it; default 3 "
                             "with --table, else 0); its steady round time over m is its "
                             "cost per update")
    parser.add_argument("--table", type=Path, default=None,
                        help="run the whole performance table (the app workload at every "
                             "scale and round count, flwr run per scale, and the "
                             "pfl-benchmark row) and write it as Markdown to this file, "
                             "outside the checkout")
    parser.add_argument("--benchmark-scale", default="100:5:50",
                        help="N:m:rounds of the --table's pfl-benchmark row (0:0:0: skip it)")
    parser.add_argument("--pfl-python", default="",
                        help="python of an environment with pfl==0.6.0 (empty: skip pfl)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--output", type=Path, default=Path("bench-study.json"),
                        help="JSON file of every number")
    parser.add_argument("--engine-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--population", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.flwr_rounds is None:
        args.flwr_rounds = 3 if args.table else 0
    try:
        args.scales = [tuple(int(x) for x in pair.split(":")) for pair in args.scales.split(",")]
        args.rounds = [int(r) for r in args.rounds.split(",")]
        args.benchmark_scale = tuple(int(x) for x in args.benchmark_scale.split(":"))
    except ValueError:
        parser.error("--scales takes N:m pairs like 1437:718,100:10; --rounds integers like "
                     "10,50; --benchmark-scale N:m:rounds like 100:5:50")
    if len(args.benchmark_scale) != 3:
        parser.error("--benchmark-scale takes N:m:rounds like 100:5:50 (0:0:0: skip it)")
    if any(len(s) != 2 or not 1 <= s[1] <= s[0] for s in args.scales) or args.repeats < 1:
        parser.error("--scales: each N:m needs 1 <= m <= N; --repeats >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.engine_run:  # a child: one engine measurement, as a JSON line
        print(json.dumps(engine_run(json.loads(args.engine_run.read_text()), args.population)))
        return 0
    from dpfl_app.tools.study.bench_table import run_table

    return run_table(args, measure, flwr_cost, run_config)


if __name__ == "__main__":
    sys.exit(main())
