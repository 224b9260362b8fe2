"""Empirical against accounted epsilon over noise levels: `dpfl audit`.

    dpfl audit --noise 0,0.3,0.5,1.0,2.0 --canaries 1000 --seeds 42,43

Each run is the real ServerApp `main` with the real ClientApp, in this process
(dpfl_app/tools/inprocess.py: no SuperLink), with `audit-canaries` set; the
canary estimate (Andrew et al., ICLR 2024) is read back from its results.json.
`--canaries` may list several k to see how many canaries a stable estimate
needs, and `--baseline` adds one run without canaries per noise level for the
time and accuracy the canaries cost; `--overhead` times only the canary code.
Writes audit.json, audit.md and audit_epsilon.png into --output.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from dpfl_app.tools.bench import default_run_config
from dpfl_app.tools.cli import HelpFormatter
from dpfl_app.tools.sweep import epsilon_if_noise_secret, parse_noise, read_results


def run_once(noise: float, canaries: int, seed: int, overrides: dict) -> dict:
    """One in-process run; its epsilons, accuracy and wall time."""
    from dpfl_app.tools.inprocess import run_server  # imports torch and Flower

    with tempfile.TemporaryDirectory(prefix="dpfl-audit-") as out:
        config = default_run_config(**{**overrides, "noise": noise, "seed": seed,
                                       "audit-canaries": canaries, "output-dir": out})
        start = time.monotonic()
        run_server(config)
        wall = time.monotonic() - start
        results = read_results(Path(out))
    return audit_row(results, noise, canaries, seed, wall)


def audit_row(results: dict, noise: float, canaries: int, seed: int, wall: float) -> dict:
    """One run's row. The audit tests the mechanism, so a deterministic-noise run (whose
    guaranteed epsilon is inf) is compared with the epsilon its noise would give if secret,
    as the run's own audit verdict is."""
    final = results["final"]
    row = {"noise": noise, "canaries": canaries, "seed": seed, "wall_s": round(wall, 1),
           "accounted_epsilon": epsilon_if_noise_secret(final),
           "test_accuracy": final["test_accuracy"]}
    audit = results.get("audit")
    if audit:
        row.update(empirical_epsilon=float(audit["epsilon"]),
                   ci95=[float(v) for v in audit["epsilon_ci95"]],
                   verdict=audit["verdict"], canaries_per_round=audit["canaries_per_round"])
    return row


def hook_overhead(canaries: int, rounds: int = 5, population: int = 10, m: int = 6) -> dict:
    """Seconds the canary code adds to a run of the default model (median of 3 timings).

    Times exactly what the strategy adds: `join` (sampling, C_t u_j per canary),
    the larger `dp_fedavg_step` (each canary clipped and summed), `observe`
    (2k cosines per round), and the final `summary` (fits, epsilon, bootstrap).
    """
    import numpy as np

    from dpfl_app.config import model_spec, validate
    from dpfl_app.privacy import mechanism
    from dpfl_app.strategy.canaries import CanaryAudit
    from dpfl_app.task import build_model

    cfg = validate(default_run_config())
    model = [v.numpy() for v in build_model(*model_spec(cfg)).state_dict().values()]
    split = mechanism.split_noise(cfg["noise"], m)
    timings = {"per_round_s": [], "summary_s": []}
    for repeat in range(3):
        rng = np.random.default_rng(repeat)
        audit = CanaryAudit(canaries, repeat, "poisson", m / population)
        start = time.perf_counter()
        for _ in range(rounds):
            models, bits = audit.join([], [], model, 0.1, rng)
            new, _, _ = mechanism.dp_fedavg_step(model, models, bits, 0.1, m, split, rng,
                                                 server_lr=1.0, target_quantile=0.5, clip_lr=0.2)
            audit.observe(model, new)
        middle = time.perf_counter()
        audit.summary(cfg["target-delta"], 1.0, population)
        timings["per_round_s"].append((middle - start) / rounds)
        timings["summary_s"].append(time.perf_counter() - middle)
    return {"canaries": canaries, "dim": sum(a.size for a in model),
            **{k: round(float(np.median(v)), 3) for k, v in timings.items()}}


def _fmt(value) -> str:
    if value is None:
        return "–"
    return "∞" if math.isinf(value) else f"{value:.3g}"


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"`{command}`", "",
             "| noise z | canaries k | seed | accounted ε | empirical ε (95% CI) | verdict "
             "| test accuracy | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        emp = (f"{_fmt(r['empirical_epsilon'])} ({_fmt(r['ci95'][0])}–{_fmt(r['ci95'][1])})"
               if "empirical_epsilon" in r else "–")
        lines.append(f"| {r['noise']:g} | {r['canaries']} | {r['seed']} | "
                     f"{_fmt(r['accounted_epsilon'])} | {emp} | {r.get('verdict', '–')} | "
                     f"{r['test_accuracy']:.3f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, canaries: int) -> None:
    """Empirical (mean and CI over seeds) and accounted epsilon against noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    audited = [r for r in rows if r["canaries"] == canaries and "empirical_epsilon" in r]
    noises = sorted({r["noise"] for r in audited})
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in audited:
        ax.plot([r["noise"]] * 2, r["ci95"], color="tab:blue", alpha=0.4, lw=3)
    ax.plot(noises, [sum(r["empirical_epsilon"] for r in audited if r["noise"] == z)
                     / sum(1 for r in audited if r["noise"] == z) for z in noises],
            "o-", color="tab:blue", label=f"empirical ε, {canaries} canaries (mean; bars: 95% CI)")
    finite = [z for z in noises if z > 0]
    ax.plot(finite, [next(r["accounted_epsilon"] for r in audited if r["noise"] == z)
                     for z in finite], "s--", color="tab:red", label="accounted ε (PLD)")
    if 0 in noises:
        ax.text(0.02, 0.04, "z = 0: accounted ε = ∞", transform=ax.transAxes, fontsize=8,
                color="tab:red")
    ax.set_yscale("log")
    ax.set_xlabel("noise multiplier z")
    ax.set_ylabel(f"ε at δ = {default_run_config()['target-delta']:g}")
    ax.set_title("One-run audit (Andrew et al. 2024) on the default digits run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dpfl audit", formatter_class=HelpFormatter,
        description="Run the app in process with canary clients at each noise level and "
                    "compare the one-run empirical epsilon with the accounted one.")
    parser.add_argument("--noise", type=parse_noise, default=[0.0, 0.3, 0.5, 1.0, 2.0],
                        help="comma-separated noise multipliers")
    parser.add_argument("--canaries", type=lambda t: [int(v) for v in t.split(",")],
                        default=[1000], help="comma-separated k; the first one is plotted")
    parser.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")],
                        default=[42], help="comma-separated seeds (deterministic-noise runs)")
    parser.add_argument("--baseline", action="store_true",
                        help="also one run without canaries per noise level and seed")
    parser.add_argument("--output", type=Path, default=Path("audit"), help="output folder")
    parser.add_argument("--overhead", action="store_true",
                        help="only time the canary code itself for each --canaries k, no runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.overhead:
        for k in args.canaries:
            print(json.dumps(hook_overhead(k)), flush=True)
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    command = "dpfl audit " + " ".join(argv or [])
    plan = [(z, k, s) for z in args.noise for s in args.seeds
            for k in ([0] if args.baseline else []) + args.canaries]
    rows = []
    for i, (noise, k, seed) in enumerate(plan, 1):
        row = run_once(noise, k, seed, {"deterministic-noise": True})
        rows.append(row)
        print(f"[{i}/{len(plan)}] {json.dumps(row)}", flush=True)
        (args.output / "audit.json").write_text(json.dumps(rows, indent=1) + "\n")
        (args.output / "audit.md").write_text(markdown(rows, command))
    plot(rows, args.output / "audit_epsilon.png", args.canaries[0])
    print(markdown(rows, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
