"""Privacy-utility sweep: one run per noise level (or target epsilon) and repeat.

    dpfl sweep --noise 0,0.5,0.75,1.0 --repeats 3 --run-config "rounds=5"

Every run is a plain `flwr run . local` of this app (same ServerApp and
ClientApp) on a private local SuperLink, writing its usual run folder under
`<output>/runs/`. The sweep collects each run's results.json and writes
sweep.csv, sweep.md, sweep.json (every run and the series behind the plots),
accuracy_vs_round.png and accuracy_vs_epsilon.png, rewritten after every run.
A failed run is recorded with its status and log tail; the sweep goes on.

    dpfl sweep --engine inprocess --target-epsilon 1,2,4,8 --supernodes 1437 \
        --grid "lr=0.05,0.1 server-lr=1,2" --holdout validation

`--engine inprocess` runs each setting in the study engine
(`dpfl_app/tools/study/`) instead: the app's own mechanism, sampling and
accounting, with the cohort's training vectorised, in one process, seconds a
run. `--target-epsilon` replaces `--noise`: each run calibrates z to its
target (the app's `target-epsilon` key). `--grid` adds every combination of
other keys. `--holdout validation` (in process) tunes on half of the server's
test set and reports the other half (Papernot & Steinke 2022). Every record
and table says which engine made it.
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
from pathlib import Path

from flwr.common.config import parse_config_args

from dpfl_app.tools.federation import FederationError, LocalFederation, RunTimeout
from dpfl_app.run.plots import run_series
from dpfl_app.tools.sweep_report import machine, write_outputs
from dpfl_app.tools.bench import default_run_config
from dpfl_app.tools.cli import HelpFormatter
from dpfl_app.tools.study.grid import parse_grid, setting_label, settings, toml_overrides

COMPLETED = "finished:completed"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION = re.compile(r"^[\w.]*(Error|Exception|Exhausted)\b: ")


def read_results(output_dir: Path) -> dict | None:
    """The results.json of the (single) run folder under a run's output-dir, if any."""
    paths = sorted(Path(output_dir).glob("*/results.json"))
    return json.loads(paths[-1].read_text()) if paths else None


def epsilon_if_noise_secret(final: dict) -> float:
    """A run's epsilon for comparing configurations or checking the mechanism.

    A deterministic-noise run guarantees nothing (its `epsilon` is inf); what a
    sweep or an audit compares is the epsilon the same run would have with
    secret noise, which results.json records beside it.
    """
    return float(final.get("epsilon_if_noise_secret", final["epsilon"]))


def error_summary(status: str, log: str) -> tuple[str, str]:
    """(one line for the table, the log's tail for a file): why a run failed."""
    lines = [ANSI.sub("", line).strip() for line in log.splitlines() if line.strip()]
    tail = "\n".join(lines[-60:])
    # Prefer the app's own verdict ("run FAILED: <why>"), then a Python exception
    # line ("dpfl_app.config.ConfigError: ..."), over log lines that merely
    # mention an error (Flower's "An unhandled exception occurred ...").
    errors = ([line[line.index("run FAILED:"):] for line in lines if "run FAILED:" in line]
              or [line for line in lines if EXCEPTION.match(line)]
              or [line for line in lines if re.search(r"error|exception", line, re.IGNORECASE)])
    reason = errors[-1] if errors else (lines[-1] if lines else "no log")
    return f"{status}: {reason}"[:300], tail


def summarize_run(record: dict, results: dict) -> None:
    """Copy what the table and plots need from a run's results.json into its record."""
    final = results["final"]
    series = run_series(results["rounds"], results.get("initial"))
    record.update(
        final_accuracy=final["test_accuracy"], best_accuracy=final["best_test_accuracy"],
        epsilon=epsilon_if_noise_secret(final),
        noise_secret="epsilon_if_noise_secret" not in final,
        delta=final["delta"], stop_reason=final["stop_reason"],
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


def new_record(setting: dict, seed: int, output_dir: Path, engine: str) -> dict:
    """A run's record before it runs: `noise` is the calibrated z once known."""
    target = setting.get("target-epsilon")
    return {"noise": setting.get("noise"), "target_epsilon": target, "seed": seed,
            "setting": setting_label(setting), "engine": engine,
            "output_dir": str(output_dir), "run_id": None, "error": None}


def run_one(fed: LocalFederation, setting: dict, seed: int, output_dir: Path, run_config: str,
            timeout: float, label: str, audit_canaries: int = 0) -> dict:
    """Submit one run, wait for it, and return its record (failed ones included)."""
    record = new_record(setting, seed, output_dir, "flwr")
    start = time.monotonic()
    try:
        # The sweep's keys come last, so they override the user's run-config.
        audit = f" audit-canaries={audit_canaries}" if audit_canaries else ""
        record["run_id"] = fed.submit(
            run_config, f"{toml_overrides(setting)} seed={seed} output-dir='{output_dir}'{audit}")
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
        record["noise"] = results["accounting"]["noise_multiplier"]  # calibrated, if a target
    elif record["run_id"] is not None:
        record["error"], tail = error_summary(record["status"], fed.logs(record["run_id"]))
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "flwr-log-tail.txt").write_text(tail + "\n")
    return record


def run_inprocess(setting: dict, seed: int, output_dir: Path, base: dict, population: int,
                  holdout: str, label: str, report_every: int = 1) -> dict:
    """One run in the study engine; writes results.json like a Flower run's folder."""
    from dpfl_app.run.outputs import write_diagnostics, write_json
    from dpfl_app.tools.study.engine import ENGINE, run_study

    record = new_record(setting, seed, output_dir, ENGINE)
    start = time.monotonic()
    try:
        results = run_study({**base, **setting, "seed": seed}, population, holdout,
                            report_every=report_every)
    except Exception as err:  # noqa: BLE001  a bad setting is recorded; the sweep goes on
        record.update(status="failed", error=f"failed: {type(err).__name__}: {err}"[:300])
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_diagnostics(output_dir, results.pop("diagnostics"))  # operator-only, as in Flower
        write_json(output_dir / "results.json", results)
        record["status"] = COMPLETED
        summarize_run(record, results)
        record["noise"] = results["noise"]
        record["validation_accuracy"] = results["final"].get("validation_accuracy")
        print(f"{label} rounds {len(results['rounds'])}: test accuracy "
              f"{results['final']['test_accuracy']:.4f}", flush=True)
    record["wall_s"] = round(time.monotonic() - start, 1)
    return record


def parse_noise(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",") if value.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers like 0,0.5,1.0: {err}") from err


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dpfl sweep", formatter_class=HelpFormatter,
        description="Run the app once per noise multiplier (or target epsilon) and repeat, "
                    "then tabulate and plot final accuracy against epsilon. Each run is a real "
                    "`flwr run` on a private local SuperLink (--engine flwr, the default) or, "
                    "in seconds, the study engine in this process (--engine inprocess).",
        epilog="Negative noise values need '=': --noise=-1,0.5 (the app rejects them).",
    )
    levels = parser.add_mutually_exclusive_group(required=True)
    levels.add_argument("--noise", type=parse_noise,
                        help="comma-separated noise multipliers z, e.g. 0,0.5,0.75,1.0")
    levels.add_argument("--target-epsilon", type=parse_noise, metavar="EPSILONS",
                        help="comma-separated target epsilons, e.g. 1,2,4,8 (inf: noise 0); "
                             "z is calibrated for each")
    parser.add_argument("--engine", choices=("flwr", "inprocess"), default="flwr",
                        help="flwr: a real `flwr run` per run; inprocess: the study engine")
    parser.add_argument("--grid", type=parse_grid, default=None,
                        help='other keys to combine, e.g. "lr=0.05,0.1 server-lr=1,2"')
    parser.add_argument("--holdout", choices=("test", "validation"), default="test",
                        help="inprocess: report accuracy on a validation half of the server's "
                             "test set, for tuning")
    parser.add_argument("--report-every", type=int, default=1, metavar="K",
                        help="inprocess: evaluate and read epsilon every K rounds and the last "
                             "(0: the last only; the table needs no more, the per-round plot "
                             "shows what was evaluated)")
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
    if not (args.noise or args.target_epsilon) or args.repeats < 1 or args.supernodes < 1 \
            or args.audit_canaries < 0:
        parser.error("need at least one noise value, --repeats >= 1, --supernodes >= 1 and "
                     "--audit-canaries >= 0")
    if args.target_epsilon and min(args.target_epsilon) <= 0:
        parser.error("--target-epsilon values must be > 0")
    if args.holdout != "test" and args.engine != "inprocess":
        parser.error("--holdout validation needs --engine inprocess")
    if args.report_every < 0 or (args.report_every != 1 and args.engine != "inprocess"):
        parser.error("--report-every takes K >= 0 and needs --engine inprocess")
    if args.audit_canaries and args.engine != "flwr":
        parser.error("--audit-canaries needs --engine flwr")
    try:
        args.user_config = parse_config_args([args.run_config])
    except Exception as err:  # click.ClickException: the message says what is wrong
        parser.error(f"--run-config: {getattr(err, 'message', err)}")
    for key in ("noise", "target-epsilon", "output-dir"):
        if key in args.user_config:
            parser.error(f"--run-config must not set {key!r}: the sweep sets it for every run")
    args.output = (args.output or Path("sweeps") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if args.output.exists() and any(args.output.iterdir()):
        parser.error(f"{args.output} exists and is not empty: choose another --output")
    return args


def base_seed(user_config: dict) -> int:
    """The run-config's seed, else the app's default from pyproject.toml."""
    return int(default_run_config(**user_config)["seed"])


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: stop the run and the SuperLink


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    # Every noise level sees the same seeds: repeats differ, settings stay paired.
    seeds = [base_seed(args.user_config) + r for r in range(args.repeats)]
    plan = [(setting, seed) for setting in settings(args) for seed in seeds]
    args.output.mkdir(parents=True, exist_ok=True)
    print(f"sweep of {len(plan)} runs ({args.engine}) into {args.output}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    runs: list[dict] = []
    start, code = time.monotonic(), 0
    meta = {"command": shlex.join(["dpfl", "sweep", *argv]), "engine": args.engine,
            "run_config": args.run_config, "repeats": args.repeats, "seeds": seeds,
            "supernodes": args.supernodes, "holdout": args.holdout, "machine": machine(),
            "elapsed_s": 0.0}
    with tempfile.TemporaryDirectory(prefix="dpfl-sweep-flwr-home-") as home:
        fed = LocalFederation(Path(home), args.supernodes) if args.engine == "flwr" else None
        base = default_run_config(**args.user_config) if fed is None else {}
        try:
            for i, (setting, seed) in enumerate(plan, 1):
                name = setting_label(setting)
                label = f"[run {i}/{len(plan)}] {name} seed={seed}"
                mean_s = (time.monotonic() - start) / (i - 1) if i > 1 else None
                eta = f" (sweep: about {mean_s * (len(plan) - i + 1) / 60:.1f} min left)" \
                    if mean_s else ""
                print(f"{label} starting{eta}", flush=True)
                out = args.output / "runs" / f"{name.replace(' ', '-')}-seed-{seed}"
                record = (run_one(fed, setting, seed, out, args.run_config, args.timeout_per_run,
                                  label, args.audit_canaries) if fed is not None else
                          run_inprocess(setting, seed, out, base, args.supernodes,
                                        args.holdout, label, args.report_every))
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
            if fed is not None:
                fed.stop()
    meta["elapsed_s"] = round(time.monotonic() - start, 1)
    write_outputs(args.output, runs, meta)
    print(f"sweep done in {meta['elapsed_s']:.0f}s: {args.output / 'sweep.md'}", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
