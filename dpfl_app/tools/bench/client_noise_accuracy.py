"""Accuracy of noise-at=clients against central DP, on the recipes, in the study engine.

    python -m dpfl_app.tools.bench.client_noise_accuracy [--recipes recipes/digits-eps4.toml,...]
        [--seeds 100-109] [--bits 18] [--thresholds 0.8] [--ideal] [--no-central]
        [--clients M] [--set "server-lr=48.0"] [--out FILE (appended;
        runs already in it are skipped)]
    python -m dpfl_app.tools.bench.client_noise_accuracy --table FILE

For every seed (the same seeds for every variant) and recipe, one run of each
variant: `central` (the recipe as it is: the server adds the Gaussian noise),
`clients t=F` (the recipe with the run-config keys `secure-aggregation=true`,
`noise-at="clients"`, `noise-bits=b`, `noise-threshold=F` and, with --clients,
`clients=M`, and with --set the keys the client-noise recipe tuned on its own:
what `client_noise_keys` adds; Skellam shares calibrated for
t = ceil(F m) survivors, every cohort member surviving) and, with `--ideal`,
`clients t=F ideal` (the survivors' excess noise removed, as Dordis would: what
calibrating for the threshold costs). Variants alternate within a seed, so a load change hits all
alike. Each run appends one JSON line to FILE; `--table` prints mean and
standard deviation of the final test accuracy per recipe and variant, with
epsilon, b and bytes per client.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tomllib
from collections import defaultdict
from pathlib import Path

from dpfl_app.tools.bench import default_run_config
from dpfl_app.tools.study.client_noise import ClientNoiseOptions
from dpfl_app.tools.study.engine import run_study

POPULATION = 1437  # the recipes' federation: one digits image per user


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(v) for v in text.split(",") if v]


Variant = tuple[str, dict, ClientNoiseOptions | None]  # name, run-config keys, study options


def client_noise_keys(bits: int, threshold: float, clients: int = 0,
                      tuned: dict | None = None) -> dict:
    """The run-config keys a client-noise variant adds to the recipe (a noise-at=clients
    recipe is the central one with exactly these: tests/test_e2e_recipes.py); `tuned`:
    keys the client-noise recipe chose on its own (its tuning, docs/secure-aggregation.md)."""
    return {"secure-aggregation": True, "noise-at": "clients", "noise-bits": bits,
            "noise-threshold": threshold, **({"clients": clients} if clients else {}),
            **(tuned or {})}


def variants(bits: int, thresholds: list[float], ideal: bool, central: bool = True,
             clients: int = 0, tuned: dict | None = None) -> list[Variant]:
    """(name, run-config keys, study options) of each variant; `clients` > 0 replaces the
    recipe's m in the client-noise variants, `tuned` adds its keys to them (both named)."""
    out: list[Variant] = [("central", {}, None)] if central else []
    cohort = f" m={clients}" if clients else ""
    extra = "".join(f" {key}={value:g}" if isinstance(value, float) else f" {key}={value}"
                    for key, value in (tuned or {}).items())
    for t in thresholds:
        keys = client_noise_keys(bits, t, clients, tuned)
        out.append((f"clients{cohort} t={t:g}m b={bits}{extra}", keys, None))
        if ideal:
            out.append((f"clients{cohort} t={t:g}m b={bits}{extra} ideal", keys,
                        ClientNoiseOptions(remove_excess=True)))
    return out


def one_run(recipe: Path, seed: int, name: str, keys: dict,
            options: ClientNoiseOptions | None = None) -> dict:
    cfg = default_run_config(**{**tomllib.loads(recipe.read_text()), **keys}, seed=seed)
    result = run_study(cfg, POPULATION, report_every=0, client_noise=options)
    final = result["final"]
    row = {"recipe": recipe.stem, "seed": seed, "variant": name,
           "test_accuracy": final["test_accuracy"], "epsilon": final["epsilon"],
           "loop_s": final["loop_s"], "load": os.getloadavg()[0]}
    if cfg["noise-at"] == "clients":
        accounting = final["accounting"]
        row.update(bits=cfg["noise-bits"],
                   bytes_per_client=accounting["params"]["bytes_per_client"],
                   z_at_threshold=accounting["noise_multiplier_at_threshold"],
                   epsilon_without_sampling=accounting["without_sampling"],
                   client_bound=accounting["client_bound"],
                   wrapped=accounting["wrapped_coordinates"],
                   withheld=accounting["withheld_rounds"])
    else:
        row["z"] = result["noise"]
    return row


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["recipe"], row["variant"])].append(row)
    lines = ["| recipe | variant | runs | test accuracy (mean ± sd) | minus central, same seeds "
             "(mean ± sd) | epsilon | b | bytes/client |",
             "|---|---|---|---|---|---|---|---|"]
    for (recipe, variant), runs in sorted(groups.items()):
        acc = [r["test_accuracy"] for r in runs]
        central = {r["seed"]: r["test_accuracy"] for r in groups.get((recipe, "central"), [])}
        diff = [r["test_accuracy"] - central[r["seed"]] for r in runs if r["seed"] in central]
        eps = max(r["epsilon"] for r in runs)
        lines.append(f"| {recipe} | {variant} | {len(runs)} | {_mean_sd(acc)} | "
                     f"{_mean_sd(diff, signed=True) if variant != 'central' else '-'} | "
                     f"{eps:.2f} | {runs[0].get('bits', '-')} | "
                     f"{runs[0].get('bytes_per_client', '-')} |")
    return "\n".join(lines)


def _mean_sd(values: list[float], signed: bool = False) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):{'+' if signed else ''}.3f} ± {sd:.3f} (n={len(values)})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="recipes/digits-eps4.toml,recipes/digits-eps2.toml")
    parser.add_argument("--seeds", default="100-109")
    parser.add_argument("--bits", type=int, default=18)
    parser.add_argument("--thresholds", default="0.8", help="fractions of m; \"\": central only")
    parser.add_argument("--ideal", action="store_true")
    parser.add_argument("--no-central", action="store_true", help="client-noise variants only")
    parser.add_argument("--clients", type=int, default=0,
                        help="m of the client-noise variants (0: the recipe's)")
    parser.add_argument("--set", default="", metavar="KEYS",
                        help='run-config keys of the client-noise variants only, "k=v k=v" '
                             '(TOML values), e.g. "server-lr=48.0"')
    parser.add_argument("--out", default="client_noise_accuracy.jsonl")
    parser.add_argument("--table", help="print the table of a finished FILE and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(Path(args.table)))
        return
    tuned = {key: tomllib.loads(f"v = {value}")["v"]  # TOML values, as in a recipe
             for key, value in (kv.split("=", 1) for kv in args.set.split())}
    chosen = variants(args.bits, [float(t) for t in args.thresholds.split(",") if t], args.ideal,
                      not args.no_central, args.clients, tuned)
    out = Path(args.out)
    done = {(r["recipe"], r["seed"], r["variant"]) for r in map(json.loads, (
        out.read_text().splitlines() if out.exists() else [])) if r}  # resume
    for seed in _seeds(args.seeds):
        for recipe in [Path(r) for r in args.recipes.split(",")]:
            for name, keys, options in chosen:
                if (recipe.stem, seed, name) in done:
                    continue
                row = one_run(recipe, seed, name, keys, options)
                with open(out, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
