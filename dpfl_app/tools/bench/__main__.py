"""Benchmark the app against its in-process limit, with DP on and off, at several scales.

    dpfl bench [--scales 10:6,100:50,1000:50,1000:200] [--rounds 4]
                             [--output bench.json] [--cold-start] [--secure-aggregation]

For each scale N:m (N SuperNodes, m clients per round) it runs, back to back:
(a) the in-process limit (`limit.py`), (b) the real app through `flwr run .`
and (c) the real app with DP off: `noise=0` (no noise; the accountant reports
epsilon = inf at no cost) and `initial-clip=1e9` (no update is ever clipped;
the norms are still computed, which costs microseconds at this model size).
With --secure-aggregation it also runs (s): (b) with `secure-aggregation=true`
(SecAgg+ with its consistency round), right after (b), and reports s/b.
Every run uses `deterministic-noise=true`, so (a), (b) and (c) sample cohorts
of the same sizes, and its own empty partition cache, so each starts cold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from dpfl_app.tools.cli import HelpFormatter

DP_OFF = "noise=0.0 initial-clip=1e9"


def parse_scales(text: str) -> list[tuple[int, int]]:
    """"10:6,100:50" -> [(10, 6), (100, 50)]: population N and clients per round m."""
    scales = []
    for item in text.split(","):
        population, clients = (int(v) for v in item.split(":"))
        if not 1 <= clients <= population:
            raise ValueError(f"scale {item!r}: need 1 <= m <= N")
        scales.append((population, clients))
    return scales


def machine() -> dict:
    """What the numbers were measured on, and how busy it was."""
    import flwr
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line), "?")
    mem = Path("/proc/meminfo").read_text().split()[1]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(int(mem) / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "flwr": flwr.__version__, "load_average": os.getloadavg()}


def run_scale(population: int, clients: int, rounds: int, extra: str, work: Path,
              skip_app: bool, warm: bool = False, secure: bool = False,
              dp_off: bool = True) -> dict:
    """(a), (b), (c) for one scale, each on a fresh partition cache."""
    from dpfl_app.tools.bench import default_run_config
    from dpfl_app.tools.bench.limit import run_limit

    result: dict = {"population": population, "clients": clients, "rounds": rounds,
                    "load_before": os.getloadavg()[0]}
    base = f"clients={clients} deterministic-noise=true {extra}".strip()
    os.environ["DPFL_CACHE_DIR"] = str(work / f"cache-{population}-{clients}-a")
    overrides = dict(item.split("=", 1) for item in base.split())
    run_config = default_run_config(**{k: _value(v) for k, v in overrides.items()})
    result["a"] = run_limit(run_config, population, rounds)
    if not skip_app:
        from dpfl_app.tools.bench.simulation import run_app

        # b_warm: (b) again on the partition cache (b) filled, as a second run would.
        runs = [("b", base, "b")]
        if secure:  # on against off, back to back, each on a cold cache of its own
            runs.append(("s", f"{base} secure-aggregation=true", "s"))
        if dp_off:
            runs.append(("c", f"{base} {DP_OFF}", "c"))
        if warm:
            runs.append(("b_warm", base, "b"))
        for label, config, cache in runs:
            cache_dir = work / f"cache-{population}-{clients}-{cache}"
            result[label] = run_app(work / f"home-{population}-{clients}-{label}", population,
                                    config, rounds, env={"DPFL_CACHE_DIR": str(cache_dir)})
        result["b_over_a"] = _ratio(result["b"]["round_s"], result["a"]["round_s"])
        if secure:
            result["s_over_b"] = _ratio(result["s"]["round_s"], result["b"]["round_s"])
    return result


def _value(text: str):
    """A run-config value as `flwr run --run-config` would parse it (TOML scalars)."""
    import tomllib

    return tomllib.loads(f"v = {text}")["v"]


def _ratio(top, bottom):
    return top / bottom if top is not None and bottom else None


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[dict]) -> str:
    """The markdown table of docs/performance.md."""
    rows = ["| N | m | rounds | (a) in-process s/round | (b) app: first round s | "
            "(b) s/round | b/a | (c) DP off s/round | (b) total s | (b) peak RSS MiB | "
            "(b) warm cache: first round s | (s) secure aggregation s/round | s/b |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        b, c, warm, s = r.get("b", {}), r.get("c", {}), r.get("b_warm", {}), r.get("s", {})
        failed = b and not b["status"].endswith("completed")
        rows.append(
            f"| {r['population']} | {r['clients']} | {r['rounds']} | {_fmt(r['a']['round_s'], 3)}"
            f" | {_fmt(b.get('first_round_s'), 1)} | {_fmt(b.get('round_s'))}"
            f" | {_fmt(r.get('b_over_a'), 1)} | {_fmt(c.get('round_s'))}"
            f" | {_fmt(b.get('total_s'), 1)} | {_fmt(b.get('peak_rss_mb'), 0)}"
            + (f" ({b['status']})" if failed else "")
            + f" | {_fmt(warm.get('first_round_s'), 1)} | {_fmt(s.get('round_s'))}"
            + f" | {_fmt(r.get('s_over_b'), 1)} |")
    return "\n".join(rows)


def stage_lines(results: list[dict]) -> list[str]:
    """Where a secure round's time goes: each exchange's mean wall time after round 1."""
    lines = []
    for r in results:
        stages = r.get("s", {}).get("stage_s") or {}
        if stages:
            parts = ", ".join(f"{name} {seconds:.3f}" for name, seconds in stages.items())
            lines.append(f"(s) N={r['population']} m={r['clients']}: s per exchange: {parts}; "
                         f"plain round {_fmt(r['b'].get('round_s'), 3)}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dpfl bench", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--scales", type=parse_scales, default="10:6,100:50,1000:50,1000:200",
                        help="comma-separated N:m pairs")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run")
    parser.add_argument("--run-config", default="",
                        help="more run-config overrides for every run, e.g. \"batch-size=32\"")
    parser.add_argument("--output", type=Path, default=Path("bench.json"),
                        help="results as JSON")
    parser.add_argument("--skip-app", action="store_true",
                        help="only the in-process limit (no flwr run)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="also rerun (b) on the partition cache its first run filled")
    parser.add_argument("--secure-aggregation", action="store_true",
                        help="also run (b) with secure-aggregation=true and report s/b")
    parser.add_argument("--skip-dp-off", action="store_true",
                        help="leave out (c), the run with DP off")
    parser.add_argument("--cold-start", action="store_true",
                        help="also time a fresh ClientApp process per message")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict = {"machine": machine(), "command": " ".join(sys.argv), "scales": []}
    with tempfile.TemporaryDirectory(prefix="dpfl-bench-") as work:
        for i, (population, clients) in enumerate(args.scales, 1):
            start = time.monotonic()
            print(f"[scale {i}/{len(args.scales)}] N={population} m={clients}: in-process limit"
                  + ("" if args.skip_app else ", then `flwr run .` with DP on and off")
                  + f", {args.rounds} rounds each ...", flush=True)
            result = run_scale(population, clients, args.rounds, args.run_config, Path(work),
                               args.skip_app, args.warm_cache, args.secure_aggregation,
                               not args.skip_dp_off)
            report["scales"].append(result)
            print(f"N={population} m={clients}: {time.monotonic() - start:.0f} s", flush=True)
    if args.cold_start:
        from dpfl_app.tools.bench import coldstart

        report["cold_start"] = coldstart.measure()
    report["machine"]["load_average_end"] = os.getloadavg()
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report["scales"]))
    for line in stage_lines(report["scales"]):
        print(line)
    if args.cold_start:
        print()
        print(coldstart.table(report["cold_start"]))
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
