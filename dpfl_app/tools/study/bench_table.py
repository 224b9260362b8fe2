"""`dpfl bench-study --table FILE`: the whole performance table in one command, as Markdown.

    dpfl bench-study --pfl-python pflvenv/bin/python --table /tmp/bench-study.md

Runs, in order: the app workload at every `--scales` N:m and `--rounds` count
(engine and pfl alternated, `--repeats` each), one `flwr run` of
`--flwr-rounds` rounds per scale, and the pfl-benchmark workload at
`--benchmark-scale` (default 100:5, 50 rounds). `flwr run`'s cost per update is
its steady round time (the median of rounds 2.., over m): a rate, the same for
10 or 50 rounds, so one run per scale serves both rows. The Markdown (the
load average at the start and the end, every row's loads, the ratios, and
whether each row meets the target, pfl ÷ engine >= 5) goes to FILE and the
JSON of every run beside it (FILE with .json): keep both outside the checkout,
which `flwr run` bundles. The defaults should finish in about 11 minutes on a
quiet 2-core machine (an estimate from quiet per-run times: pfl's rounds about
2.3 min, about 45 fresh processes' start-up 4–5 min, three `flwr run` about
3 min); the table states the minutes it took.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

TARGET = 5.0  # pfl's cost per update over the engine's, at least
COLUMNS = ("| N, m, rounds | engine ms/update | pfl ms/update | pfl ÷ engine | "
           "engine CPU ms/update | pfl CPU ms/update | CPU: pfl ÷ engine | "
           "`flwr run` ms/update | `flwr run` ÷ engine | target (≥ 5×) | "
           "load average during the runs |")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "?") \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    import torch

    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, " \
           f"torch {torch.__version__}"


def row(r: dict, flwr: dict | None) -> str:
    ours, theirs = r["engine"], r.get("pfl")
    loads = [x["load_average"] for name in ("engine", "pfl") for x in r["runs"][name]]
    cells = [f"{r['population']:,}, {r['clients']}, {r['rounds']}", f"{ours:.3f}"]
    if theirs:
        cells += [f"{theirs:.3f}", f"**{theirs / ours:.1f}×**", f"{r['engine_cpu']:.3f}",
                  f"{r['pfl_cpu']:.3f}", f"**{r['cpu_ratio']:.1f}×**"]
    else:
        cells += ["–"] * 5
    rate = (flwr or {}).get("ms_per_client_update")
    cells += [f"{rate:.1f}", f"{rate / ours:.0f}×"] if rate else ["–", "–"]
    cells.append(("met" if theirs / ours >= TARGET else "**missed**") if theirs else "–")
    cells.append(f"{min(loads):.1f}–{max(loads):.1f}")
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
    flwr = {(f["population"], f["clients"]): f for f in report["flwr"]}
    lines = [f"Measured {report['date']} by `{report['command']}` on {report['machine']}; "
             f"load average {report['load_average'][0]:.1f} at the start, "
             f"{report['load_average_end'][0]:.1f} at the end; {report['minutes']:.1f} min. "
             f"Medians of {report['repeats']} alternated runs each"
             + (f"; `flwr run`: one run of {report['flwr_rounds']} rounds per scale, its "
                "steady round time over m." if report["flwr"] else ".")]
    for title, results in ((f"The {report['workload']} workload:", report["results"]),
                           ("On pfl-research's ground (`--workload pfl-benchmark`):",
                            report["benchmark"])):
        if results:
            lines += ["", title, "", COLUMNS, "|---|" + "---:|" * 9 + "---|"]
            lines += [row(r, flwr.get((r["population"], r["clients"]))) for r in results]
    return "\n".join(lines) + "\n"


def new_report(args) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "dpfl bench-study " + " ".join(args.argv), "machine": machine(),
            "workload": args.workload, "load_average": os.getloadavg(),
            "repeats": args.repeats, "flwr_rounds": args.flwr_rounds, "results": [],
            "flwr": [], "benchmark": [], "started": time.monotonic()}


def finish(report: dict) -> str:
    report["load_average_end"] = os.getloadavg()
    report["minutes"] = (time.monotonic() - report.pop("started")) / 60
    return markdown(report)


def run_table(args, measure, flwr_cost, run_config) -> int:
    """Every row (bench.py's `measure`, `flwr_cost`, `run_config`): printed, the JSON to
    `--output`; with `--table`, the app workload and the pfl-benchmark row, as Markdown."""
    import tempfile

    if args.table:
        args.workload = "app"
        args.output = args.table.with_suffix(".json")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = new_report(args)

    def save():
        args.output.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="dpfl-bench-study-") as folder:
        for population, clients in args.scales:
            for rounds in args.rounds:
                report["results"].append(measure(args, args.workload, population, clients,
                                                 rounds, Path(folder)))
                save()
            if args.flwr_rounds:
                cfg = run_config(args.workload, population, clients, args.flwr_rounds)
                report["flwr"].append({"population": population, "clients": clients,
                                       **flwr_cost(cfg, population, args.flwr_rounds,
                                                   args.timeout)})
                save()
        population, clients, rounds = args.benchmark_scale
        if args.table and population:
            report["benchmark"].append(measure(args, "pfl-benchmark", population, clients,
                                               rounds, Path(folder)))
    text = finish(report)
    save()
    if report["results"] and "side_by_side" in report["results"][0]:
        print(report["results"][0]["side_by_side"] + "\n")
    print(text)
    if args.table:
        args.table.write_text(text)
        print(f"written to {args.table} (every run in {args.output})")
    return 0
