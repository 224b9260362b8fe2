"""The noise sweep's table, plots and sweep.json, from the runs' records (no Flower here).

A run record (see `dpfl_app.tools.sweep.run_one`) has noise, seed, status, wall_s and
error (None when the run completed); a completed one also has final_accuracy,
best_accuracy, epsilon, delta and its per-round series rounds/accuracy.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
from pathlib import Path

from dpfl_app.run.outputs import write_atomic, write_json
from dpfl_app.run.plots import plot_frontier, plot_sweep_rounds

COLUMNS = ("noise", "status", "runs_ok", "runs", "epsilon", "delta", "final_accuracy_mean",
           "final_accuracy_std", "best_accuracy_mean", "wall_s_mean", "error",
           "empirical_epsilon", "audit_above")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of a single value is 0."""
    n = len(values)
    mean = math.fsum(values) / n  # not statistics.mean: it cannot average inf (noise 0)
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(runs: list[dict]) -> list[dict]:
    """One row per noise level, in sweep order, over its completed repeats."""
    rows = []
    for noise in dict.fromkeys(r["noise"] for r in runs):
        group = [r for r in runs if r["noise"] == noise]
        ok = [r for r in group if r["error"] is None]
        row = dict.fromkeys(COLUMNS)
        row.update(noise=noise, runs=len(group), runs_ok=len(ok),
                   status="ok" if len(ok) == len(group) else "partial" if ok else "failed",
                   wall_s_mean=round(mean_std([r["wall_s"] for r in group])[0], 1),
                   error="; ".join(dict.fromkeys(r["error"] for r in group if r["error"])))
        if ok:
            row["final_accuracy_mean"], row["final_accuracy_std"] = mean_std(
                [r["final_accuracy"] for r in ok])
            row["epsilon"] = mean_std([r["epsilon"] for r in ok])[0]
            row["best_accuracy_mean"] = mean_std([r["best_accuracy"] for r in ok])[0]
            row["delta"] = ok[0]["delta"]
            audited = [r for r in ok if r.get("empirical_epsilon") is not None]
            if audited:  # the one-run audit: mean estimate, and how many runs exceeded
                row["empirical_epsilon"] = mean_std([r["empirical_epsilon"] for r in audited])[0]
                row["audit_above"] = sum(r["audit_verdict"] != "below" for r in audited)
        rows.append(row)
    return rows


def round_curves(runs: list[dict]) -> dict[str, dict]:
    """Per noise level: mean and std of test accuracy at each round all its repeats reached."""
    curves = {}
    for noise in dict.fromkeys(r["noise"] for r in runs):
        ok = [r for r in runs if r["noise"] == noise and r["error"] is None]
        if not ok:
            continue
        common = [n for n in ok[0]["rounds"] if all(n in r["rounds"] for r in ok)]
        stats = [mean_std([r["accuracy"][r["rounds"].index(n)] for r in ok]) for n in common]
        curves[f"noise {noise:g}"] = {"noise": noise, "repeats": len(ok), "round": common,
                                      "mean": [s[0] for s in stats],
                                      "std": [s[1] for s in stats]}
    return curves


def frontier(rows: list[dict]) -> tuple[list[dict], float | None]:
    """(points with finite epsilon, the noise-0 accuracy as the non-private reference)."""
    done = [r for r in rows if r["runs_ok"]]
    points = [{"noise": r["noise"], "epsilon": r["epsilon"], "mean": r["final_accuracy_mean"],
               "std": r["final_accuracy_std"]}
              for r in done if r["noise"] > 0 and math.isfinite(r["epsilon"])]
    reference = [r["final_accuracy_mean"] for r in done if r["noise"] == 0]
    return sorted(points, key=lambda p: p["epsilon"]), reference[0] if reference else None


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{os.cpu_count()} CPU cores ({model}), {platform.system()} {platform.machine()}"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _fmt(value, spec: str = ".4f") -> str:
    if value is None:
        return "—"
    return "∞" if value == math.inf else format(value, spec)


def markdown(rows: list[dict], meta: dict) -> str:
    delta = next((r["delta"] for r in rows if r["delta"] is not None), None)
    lines = [
        "# Noise sweep", "",
        f"Command: `{meta['command']}`  ",
        f"Repeats per noise level: {meta['repeats']} (seeds {meta['seeds']}), "
        f"{meta['supernodes']} SuperNodes.  ",
        f"Machine: {meta['machine']}. Sweep wall time: {meta['elapsed_s'] / 60:.1f} min.", "",
        f"| noise z | ε at δ={delta if delta is not None else '?'} | final test accuracy "
        "(mean ± std) | best test accuracy (mean) | wall time per run | runs ok |",
        "|---:|---:|---:|---:|---:|:---|",
    ]
    audit = any(r["empirical_epsilon"] is not None for r in rows)
    if audit:  # one more column: the audit's empirical epsilon beside the accounted one
        lines[-2] = lines[-2].replace(" | final test", " | empirical ε (audit) | final test")
        lines[-1] = "|---:" + lines[-1]
    for r in rows:
        accuracy = ("failed" if not r["runs_ok"] else
                    f"{r['final_accuracy_mean']:.4f} ± {r['final_accuracy_std']:.4f}")
        status = f"{r['runs_ok']}/{r['runs']}"
        if r["error"]:
            status += " — " + r["error"].replace("|", "\\|").replace("\n", " ")
        empirical = ""
        if audit:
            empirical = f" {_fmt(r['empirical_epsilon'], '.2f')} |"
            if r["audit_above"]:
                empirical = f" **{_fmt(r['empirical_epsilon'], '.2f')} ABOVE the accounted ε in " \
                            f"{r['audit_above']} run(s)** |"
        lines.append(f"| {r['noise']:g} | {_fmt(r['epsilon'], '.2f')} |{empirical} {accuracy} | "
                     f"{_fmt(r['best_accuracy_mean'])} | {r['wall_s_mean']:.0f} s | {status} |")
    return "\n".join(lines) + "\n"


def write_outputs(folder: Path, runs: list[dict], meta: dict) -> dict:
    """Write sweep.csv, sweep.md, sweep.json and both plots; return sweep.json's content."""
    rows = summarize(runs)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(folder / "sweep.csv", buffer.getvalue().encode())
    write_atomic(folder / "sweep.md", markdown(rows, meta).encode())
    curves = plot_sweep_rounds(round_curves(runs), folder / "accuracy_vs_round.png")
    points, reference = frontier(rows)
    front = plot_frontier(points, reference, folder / "accuracy_vs_epsilon.png")
    payload = {"meta": meta, "rows": rows, "runs": runs, "curves": curves, "frontier": front}
    write_json(folder / "sweep.json", payload)
    return payload
