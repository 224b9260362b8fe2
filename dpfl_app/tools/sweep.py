"""Privacy-utility sweep: one real Flower simulation per noise level and repeat.

    dpfl sweep --noise 0,0.5,0.75,1.0 --repeats 3 --run-config "rounds=5"

Every run is a plain `flwr run . local` of this app (same ServerApp and
ClientApp) on a private local SuperLink, writing its usual run folder under
`<output>/runs/`. The sweep collects each run's results.json and writes
sweep.csv, sweep.md, sweep.json (every run and the series behind the plots),
accuracy_vs_round.png and accuracy_vs_epsilon.png, rewritten after every run.
A failed run is recorded with its status and log tail; the sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from flwr.common.config import parse_config_args

from dpfl_app.tools.federation import PROJECT, FederationError, LocalFederation, RunTimeout
from dpfl_app.run.plots import run_series
from dpfl_app.tools.sweep_report import machine, write_outputs
from dpfl_app.tools.cli import HelpFormatter

COMPLETED = "finished:completed"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION = re.compile(r"^[\w.]*(Error|Exception|Exhausted)\b: ")


def read_results(output_dir: Path) -> dict | None:
    """The results.json of the (single) run folder under a run's output-dir, if any."""
    paths = sorted(Path(output_dir).glob("*/results.json"))
    return json.loads(paths[-1].read_text()) if paths else None


def error_summary(status: str, log: str) -> tuple[str, str]:
    """(one line for the table, the log's tail for a file): why a run failed."""
    lines = [ANSI.sub("", line).strip() for line in log.splitlines() if line.strip()]
    tail = "\n".join(lines[-60:])
    # Prefer a Python exception line ("dpfl_app.config.ConfigError: ...") over log
    # lines that merely mention an error ("Simulation raised an exception").
    errors = ([line for line in lines if EXCEPTION.match(line)]
              or [line for line in lines if re.search(r"error|exception", line, re.IGNORECASE)])
    reason = errors[-1] if errors else (lines[-1] if lines else "no log")
    return f"{status}: {reason}"[:300], tail


def summarize_run(record: dict, results: dict) -> None:
    """Copy what the table and plots need from a run's results.json into its record."""
    final = results["final"]
    series = run_series(results["rounds"], results.get("initial"))
    record.update(
        final_accuracy=final["test_accuracy"], best_accuracy=final["best_test_accuracy"],
        epsilon=float(final["epsilon"]), delta=final["delta"], stop_reason=final["stop_reason"],
        rounds=series["round"], accuracy=series["test_accuracy"],
    )
    if results.get("audit"):  # audit-canaries > 0: the one-run empirical epsilon
        record.update(empirical_epsilon=results["audit"]["epsilon"],
                      audit_verdict=results["audit"]["verdict"])


def progress_printer(output_dir: Path, label: str):
    """An on_poll callback that prints each newly evaluated round of the running run."""
    shown = {"rounds": 0}

    def poll() -> None:
        try:
            results = read_results(output_dir)
        except (OSError, ValueError):  # between runs, or the folder is being made
            return
        done = [r for r in (results or {}).get("rounds", []) if "test_accuracy" in r]
        for rec in done[shown["rounds"]:]:  # a poll may find several new rounds
            print(f"{label} round {rec['round']}/{results['config']['rounds']}: test accuracy "
                  f"{rec['test_accuracy']:.4f}, epsilon {float(rec['epsilon']):.3f}",
                  flush=True)
        shown["rounds"] = max(shown["rounds"], len(done))

    return poll


def run_one(fed: LocalFederation, noise: float, seed: int, output_dir: Path, run_config: str,
            timeout: float, label: str, audit_canaries: int = 0) -> dict:
    """Submit one run, wait for it, and return its record (failed ones included)."""
    record = {"noise": noise, "seed": seed, "output_dir": str(output_dir), "run_id": None,
              "error": None}
    start = time.monotonic()
    try:
        # The sweep's keys come last, so they override the user's run-config.
        audit = f" audit-canaries={audit_canaries}" if audit_canaries else ""
        record["run_id"] = fed.submit(
            run_config, f"noise={float(noise)!r} seed={seed} output-dir='{output_dir}'{audit}")
        record["status"] = fed.wait(record["run_id"], timeout,
                                    on_poll=progress_printer(output_dir, label), interval=5)
    except RunTimeout as err:  # `wait` has stopped the run
        record["status"], record["error"] = f"timed out after {timeout:g}s", str(err)
    except FederationError as err:
        record["status"], record["error"] = "not submitted", str(err).strip()[-300:]
    except BaseException:  # Ctrl-C or SIGTERM: do not leave the run going
        if record["run_id"] is not None:
            fed.flwr("stop", str(record["run_id"]), "local")
        raise
    record["wall_s"] = round(time.monotonic() - start, 1)
    results = read_results(output_dir)
    if record["status"] == COMPLETED and results is not None:
        summarize_run(record, results)
    elif record["run_id"] is not None:
        record["error"], tail = error_summary(record["status"], fed.logs(record["run_id"]))
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "flwr-log-tail.txt").write_text(tail + "\n")
    return record


def parse_noise(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",") if value.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers like 0,0.5,1.0: {err}") from err


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dpfl sweep", formatter_class=HelpFormatter,
        description="Run the app once per noise multiplier and repeat (a real `flwr run` "
                    "each), then tabulate and plot final accuracy against epsilon.",
        epilog="Negative noise values need '=': --noise=-1,0.5 (the app rejects them).",
    )
    parser.add_argument("--noise", type=parse_noise, required=True,
                        help="comma-separated noise multipliers z, e.g. 0,0.5,0.75,1.0")
    parser.add_argument("--run-config", default="",
                        help='other run-config overrides for every run, e.g. "rounds=5 clients=6"')
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per noise level, with seeds seed, seed+1, ...")
    parser.add_argument("--output", type=Path, default=None,
                        help="new sweep folder; none given: sweeps/<timestamp>")
    parser.add_argument("--timeout-per-run", type=float, default=3600, metavar="S",
                        help="stop a run still going after S seconds")
    parser.add_argument("--supernodes", type=int, default=10,
                        help="SuperNodes (clients) in the local simulation")
    parser.add_argument("--audit-canaries", type=int, default=0, metavar="K",
                        help="canary clients per run for the one-run privacy audit (Andrew et "
                             "al., ICLR 2024); adds the empirical epsilon column; 0 = off")
    args = parser.parse_args(argv)
    if not args.noise or args.repeats < 1 or args.supernodes < 1 or args.audit_canaries < 0:
        parser.error("need at least one noise value, --repeats >= 1, --supernodes >= 1 and "
                     "--audit-canaries >= 0")
    try:
        args.user_config = parse_config_args([args.run_config])
    except Exception as err:  # click.ClickException: the message says what is wrong
        parser.error(f"--run-config: {getattr(err, 'message', err)}")
    for key in ("noise", "output-dir"):
        if key in args.user_config:
            parser.error(f"--run-config must not set {key!r}: the sweep sets it for every run")
    args.output = (args.output or Path("sweeps") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if args.output.exists() and any(args.output.iterdir()):
        parser.error(f"{args.output} exists and is not empty: choose another --output")
    return args


def base_seed(user_config: dict) -> int:
    """The run-config's seed, else the app's default from pyproject.toml."""
    if "seed" in user_config:
        return int(user_config["seed"])
    with open(PROJECT / "pyproject.toml", "rb") as handle:
        return int(tomllib.load(handle)["tool"]["flwr"]["app"]["config"]["seed"])


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: stop the run and the SuperLink


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    # Every noise level sees the same seeds: repeats differ, settings stay paired.
    seeds = [base_seed(args.user_config) + r for r in range(args.repeats)]
    plan = [(noise, seed) for noise in args.noise for seed in seeds]
    args.output.mkdir(parents=True, exist_ok=True)
    print(f"sweep of {len(plan)} runs into {args.output}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    runs: list[dict] = []
    start, code = time.monotonic(), 0
    meta = {"command": shlex.join(["dpfl", "sweep", *argv]),
            "run_config": args.run_config, "repeats": args.repeats, "seeds": seeds,
            "supernodes": args.supernodes, "machine": machine(), "elapsed_s": 0.0}
    with tempfile.TemporaryDirectory(prefix="dpfl-sweep-flwr-home-") as home:
        fed = LocalFederation(Path(home), args.supernodes)
        try:
            for i, (noise, seed) in enumerate(plan, 1):
                label = f"[run {i}/{len(plan)}] noise={noise:g} seed={seed}"
                mean_s = (time.monotonic() - start) / (i - 1) if i > 1 else None
                eta = f" (sweep: about {mean_s * (len(plan) - i + 1) / 60:.1f} min left)" \
                    if mean_s else ""
                print(f"{label} starting{eta}", flush=True)
                out = args.output / "runs" / f"noise-{noise:g}-seed-{seed}"
                record = run_one(fed, noise, seed, out, args.run_config,
                                 args.timeout_per_run, label, args.audit_canaries)
                runs.append(record)
                outcome = (f"final accuracy {record['final_accuracy']:.4f}, epsilon "
                           f"{record['epsilon']:.3f}" if record["error"] is None
                           else record["error"])
                print(f"{label} {record['status']} in {record['wall_s']:.0f}s: {outcome}",
                      flush=True)
                meta["elapsed_s"] = round(time.monotonic() - start, 1)
                write_outputs(args.output, runs, meta)  # current after every run
        except KeyboardInterrupt:
            print("interrupted: the sweep's table covers the runs that finished", flush=True)
            code = 130
        finally:
            fed.stop()
    meta["elapsed_s"] = round(time.monotonic() - start, 1)
    write_outputs(args.output, runs, meta)
    print(f"sweep done in {meta['elapsed_s']:.0f}s: {args.output / 'sweep.md'}", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
