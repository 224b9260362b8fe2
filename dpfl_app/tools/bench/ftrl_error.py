"""DP-FTRL's noise error against the participation bound b, from the factorization alone.

`python -m dpfl_app.tools.bench.ftrl_error --rounds 40 --population 1437` prints, for
each b, the banded square root the server would choose against the identity (fresh
noise every round: DP-FedAvg without amplification), as the Markdown table of
docs/dp-ftrl.md: the expected squared error of the model trajectory per unit noise
multiplier on the sensitivity, sens(C)^2 ||A C^-1||_F^2 / T (proportional to the
error at a fixed epsilon), at the same cohort size m, against every round (b = 1),
and per unit of signal when m = N // b (full participation's view). It ends with
the lower bound at b = 1 that holds for every factorization: sens(C) >= ||C 1||
(a client in every round) and ||A 1|| <= ||A C^-1||_F ||C 1||, so error >= ||A 1||^2 / T.
No training, no Flower: seconds.
"""

from __future__ import annotations

import argparse

import numpy as np

from dpfl_app.privacy import ftrl_accounting as fa
from dpfl_app.privacy import matrix_factorization as mf

SEPARATIONS = (1, 2, 3, 4, 7, 8, 14)


def error_rows(rounds: int, population: int, momentum: float = 0.0,
               separations=SEPARATIONS, epsilon: float = 4.0, delta: float = 1e-5) -> list[dict]:
    """One row per b: bands, sensitivity, z for `epsilon`, both errors and their ratios."""
    every_round = float(mf.band_errors(rounds, 1, momentum)[0])  # b = 1: the identity alone
    rows = []
    for b in separations:
        errors = mf.band_errors(rounds, b, momentum)  # what the server's choice compares
        p = mf.least_error_bands(errors)
        banded, identity = float(errors[p - 1]), float(errors[0])
        m = population // b
        sens = fa.run_sensitivity(rounds, b, momentum, p)  # the bands just chosen
        rows.append({"b": b, "m": m, "k": mf.participations(rounds, b), "bands": p,
                     "sensitivity": sens, "z": fa.calibrate_noise(epsilon, delta, sens),
                     "banded": banded, "identity": identity,
                     "identity_over_banded": identity / banded,
                     "every_round_over_banded": every_round / banded,
                     "per_signal_vs_full": (banded / m ** 2) / (every_round / population ** 2)})
    return rows


def every_round_lower_bound(rounds: int, momentum: float = 0.0) -> float:
    """||A 1||^2 / T: no factorization has less error when a client may join every round."""
    a = mf.workload_coefficients(rounds, momentum)
    return float(np.sum(np.cumsum(a) ** 2)) / rounds  # (A 1)_t = a_0 + ... + a_t


def render(rows: list[dict], rounds: int, momentum: float) -> str:
    out = ["| b | m = ⌊N/b⌋ | k = ⌈T/b⌉ | bands p | sensitivity | z for ε = 4 | error, banded "
           "root | error, identity under b | identity ÷ banded (same m) | every round ÷ "
           "banded (same m) | banded ÷ full participation (m = ⌊N/b⌋) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    out += [f"| {r['b']} | {r['m']:,} | {r['k']} | {r['bands']} | {r['sensitivity']:.2f} | "
            f"{r['z']:.3f} | {r['banded']:.1f} | {r['identity']:.1f} | "
            f"{r['identity_over_banded']:.2f} | {r['every_round_over_banded']:.1f} | "
            f"{r['per_signal_vs_full']:.2f} |" for r in rows]
    bound = every_round_lower_bound(rounds, momentum)
    identity = rows[0]["identity"] if rows[0]["b"] == 1 else float("nan")
    out.append(f"\nb = 1: every factorization's error >= ||A 1||^2 / T = {bound:.1f}; the "
               f"identity's is {identity:.1f} ({identity / bound:.2f}x the bound)")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpfl_app.tools.bench.ftrl_error",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--population", type=int, default=1437)
    parser.add_argument("--momentum", type=float, default=0.0)
    a = parser.parse_args(argv)
    print(render(error_rows(a.rounds, a.population, a.momentum), a.rounds, a.momentum))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
