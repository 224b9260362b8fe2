"""Privacy planning CLI: ``dpfl plan ...``.

Answers "how much noise / how many clients per round for (ε, δ) after T rounds"
before anything is trained. It prints the answer and the ε curve. No Flower imports.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from dpfl_app.config import ftrl_bands_problem
from dpfl_app.privacy.accounting import (
    ACCOUNTANTS, SAMPLING_MODES, AccountingModel, epsilon_after, headline_accountant,
)
from dpfl_app.privacy.calibration import (calibrate_clients, calibrate_noise, max_clients_within,
                                          round_up)
from dpfl_app.privacy.report import fmt_eps, strength
from dpfl_app.tools.cli import HelpFormatter

DESCRIPTION = """\
Plan user-level DP for federated learning (DP-FedAvg, one client = one privacy unit).

Modes (which options you give decides the question):
  --target-epsilon E --clients M              smallest noise multiplier z with ε ≤ E
  --target-epsilon E --noise Z                largest clients per round m with ε ≤ E
                                              (at a fixed z, more clients per round
                                              RAISE ε, because q = m/N grows)
  --target-epsilon E --noise-to-clients-ratio R
                                              smallest m with ε ≤ E when z = m·R
                                              (the noise std on the averaged update,
                                              z·C/m = R·C, stays fixed)
  --noise Z --clients M [--target-epsilon E]  ε after T rounds (and whether E is met)
  --mechanism dp-ftrl --min-separation B (--target-epsilon E | --noise Z)
      [--ftrl-bands P] [--momentum BETA]      DP-FTRL: z for E, or ε at z; no N needed

Every mode also prints ε after 1, T/10, 2T/10, ..., T rounds (RDP, and PLD where it
applies).

Sampling models (Andrew et al. 2021; dp-accounting's DpEvents):
  poisson  each client joins each round with probability q = m/N, the server divides by
           the fixed m; add-or-remove-one. Event PoissonSampled(q, Gaussian(z)).
  fixed    exactly m of N without replacement (Flower's random.sample); replace-one,
           so the sensitivity doubles. Event SampledWithoutReplacement(N, m,
           Gaussian(z/2)), RDP only.

Example (50,000 clients, 100 rounds, noise growing with the cohort as in
McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):
  dpfl plan --population 50000 --rounds 100 --delta 1e-4 \\
      --target-epsilon 2 --noise-to-clients-ratio 0.005
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _float_in(low: float, high: float, low_open: bool, name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and value < high
        if not ok:
            lo = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"{name} must be in {lo}{low:g}, {high:g}), got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    plan = argparse.ArgumentParser(prog="dpfl plan", description=DESCRIPTION,
                                   formatter_class=HelpFormatter)
    plan.add_argument("--population", "-N", type=_positive_int,
                      help="N, total number of clients (privacy units); required for dp-fedavg")
    plan.add_argument("--rounds", "-T", type=_positive_int, required=True, help="T, training rounds")
    plan.add_argument("--delta", type=_float_in(0, 1, True, "--delta"), required=True,
                      help="target δ, in (0, 1); should be well below 1/N")
    plan.add_argument("--target-epsilon", type=_float_in(0, math.inf, True, "--target-epsilon"),
                      help="target ε (> 0)")
    plan.add_argument("--noise", type=_float_in(0, math.inf, False, "--noise"),
                      help="noise multiplier z (>= 0), combined for the (update, count) pair")
    plan.add_argument("--clients", type=_positive_int, help="m, clients per round (1..N)")
    plan.add_argument("--noise-to-clients-ratio", type=_float_in(0, math.inf, True, "ratio"),
                      metavar="R", help="search m with z = m·R (needs --target-epsilon)")
    plan.add_argument("--sampling", choices=SAMPLING_MODES, default="poisson",
                      help="sampling model")
    plan.add_argument("--accountant", choices=ACCOUNTANTS, default=None,
                      help="accountant used for calibration; default: the run's headline "
                           "accountant, pld for poisson (tighter) and rdp for fixed "
                           "(pld does not apply to fixed)")
    plan.add_argument("--mechanism", choices=("dp-fedavg", "dp-ftrl"), default="dp-fedavg",
                      help="dp-ftrl: correlated noise and min-separation, no N, no sampling")
    plan.add_argument("--min-separation", type=_positive_int, default=1, metavar="B",
                      help="dp-ftrl: fewest rounds between two participations of a client")
    plan.add_argument("--momentum", type=_float_in(0, 1, False, "--momentum"), default=0.0,
                      help="dp-ftrl: server momentum in the workload (0: plain SGD)")
    plan.add_argument("--ftrl-bands", type=int, default=0, metavar="P",
                      help="dp-ftrl: bands of the factorization, 1..min(B, T), as the run "
                           "key `ftrl-bands` (0: the least-error choice; 1: the identity, "
                           "fresh noise every round)")
    plan.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return plan


def _validate(parser: argparse.ArgumentParser, a: argparse.Namespace) -> str:
    """Return the mode name, or exit through parser.error."""
    if a.mechanism == "dp-ftrl":
        if a.noise is None and a.target_epsilon is None:
            parser.error("--mechanism dp-ftrl needs --target-epsilon or --noise")
        if a.noise_to_clients_ratio is not None:
            parser.error("--noise-to-clients-ratio is dp-fedavg only")
        problem = ftrl_bands_problem(a.ftrl_bands, a.min_separation, a.rounds)
        if problem:  # the run config's own check: the run key `ftrl-bands`
            parser.error(f"--ftrl-bands {a.ftrl_bands}: {problem}")
        return "ftrl"
    if a.ftrl_bands:
        parser.error("--ftrl-bands is dp-ftrl only")
    if a.population is None:
        parser.error("--population is required for --mechanism dp-fedavg")
    if a.accountant is None:  # the same default as the app's run: its headline epsilon
        a.accountant = headline_accountant(AccountingModel(a.sampling, 1.0, a.population, 1,
                                                           a.delta))
    if a.clients is not None and a.clients > a.population:
        parser.error(f"--clients ({a.clients}) cannot exceed --population ({a.population})")
    if a.accountant == "pld" and a.sampling == "fixed":
        parser.error("--accountant pld does not apply to --sampling fixed (dp_accounting's PLD "
                     "has no sampling-without-replacement event); use --accountant rdp")
    if a.noise_to_clients_ratio is not None:
        if a.noise is not None or a.clients is not None:
            parser.error("--noise-to-clients-ratio sets z = m·R and searches m; "
                         "do not combine it with --noise or --clients")
        if a.target_epsilon is None:
            parser.error("--noise-to-clients-ratio needs --target-epsilon")
        return "ratio"
    if a.noise is not None and a.clients is not None:
        return "epsilon"
    if a.target_epsilon is None:
        parser.error("give --target-epsilon with one of --clients, --noise or "
                     "--noise-to-clients-ratio, or give both --noise and --clients")
    if a.clients is not None:
        return "noise"
    if a.noise is not None:
        if a.noise == 0:
            parser.error("--noise 0 adds no noise: no number of clients per round gives a finite ε")
        return "clients"
    parser.error("--target-epsilon needs one of --clients, --noise or --noise-to-clients-ratio")


# z is printed with this many significant digits (%.6g); a calibrated z has at
# most calibration.SIGNIFICANT_DIGITS, so what is printed is exactly what was checked.
PRINTED_DIGITS = 6


def _curve_points(rounds: int) -> list[int]:
    return sorted({1, rounds} | {max(1, round(rounds * k / 10)) for k in range(1, 10)})


def _num(x):
    """JSON-safe number: inf becomes the string 'inf'."""
    return x if x is None or math.isfinite(x) else "inf"


def plan(a: argparse.Namespace, mode: str) -> dict:
    n, t, d, s, acc, e = a.population, a.rounds, a.delta, a.sampling, a.accountant, a.target_epsilon
    m, z, reachable, question = a.clients, a.noise, True, ""
    if mode == "noise":
        question = f"smallest noise multiplier z with ε ≤ {e:g} at m = {m}"
        z = calibrate_noise(e, d, t, n, m, s, acc)
    elif mode == "clients":
        question = f"largest clients per round m with ε ≤ {e:g} at z = {z:g}"
        m = max_clients_within(e, d, t, n, noise_multiplier=z, sampling=s, accountant=acc)
        reachable = m is not None
        m = m if reachable else 1
    elif mode == "ratio":
        r = a.noise_to_clients_ratio
        question = f"smallest clients per round m with ε ≤ {e:g} when z = {r:g}·m"
        m = calibrate_clients(e, d, t, n, noise_to_clients_ratio=r, sampling=s, accountant=acc)
        reachable = m is not None
        m = m if reachable else n
        z = round_up(m * r, PRINTED_DIGITS)  # up: the printed z meets the target as printed
    else:
        question = f"ε after {t} rounds at m = {m}, z = {z:g}"
    model = AccountingModel(s, float(z), n, int(m), d)
    eps = {k: epsilon_after(model, t, k) for k in ACCOUNTANTS}
    if e is not None and mode == "epsilon":
        reachable = eps[acc] <= e
    curve = [{"rounds": r, **{k: epsilon_after(model, r, k) for k in ACCOUNTANTS}}
             for r in _curve_points(t)]
    return {"mode": mode, "question": question, "accountant": acc, "target_epsilon": e,
            "rounds": t, "reachable": reachable, "model": model.to_dict(),
            "answer": {"clients_per_round": model.clients_per_round,
                       "noise_multiplier": model.noise_multiplier} if reachable else None,
            "epsilon": eps, "strength": strength(eps[acc]), "curve": curve}


def render_text(res: dict) -> str:
    md, t, acc = res["model"], res["rounds"], res["accountant"].upper()
    m, z, n = md["clients_per_round"], md["noise_multiplier"], md["population"]
    out = [f"Model: {md['sampling']} sampling, {md['adjacency']} adjacency, N = {n}, "
           f"T = {t} rounds, δ = {md['delta']:g}",
           f"Question: {res['question']} ({acc} accountant)"]
    eps = res["epsilon"]
    eps_txt = f"RDP ε = {fmt_eps(eps['rdp'])}" + (
        f", PLD ε = {fmt_eps(eps['pld'])}" if eps["pld"] is not None else ", PLD n/a")
    if res["mode"] == "epsilon":
        out.append(f"Answer: {eps_txt} after {t} rounds ({res['strength']})")
        if res["target_epsilon"] is not None:
            verdict = "meets" if res["reachable"] else "does NOT meet"
            out.append(f"        {verdict} the target ε ≤ {res['target_epsilon']:g} ({acc})")
    elif res["reachable"]:
        out.append(f"Answer: m = {m} clients per round, noise multiplier z = {z:.6g} "
                   f"({eps_txt} after {t} rounds)")
    else:
        which = f"all N = {m} clients" if res["mode"] == "ratio" else "1 client"
        out.append(f"Answer: NOT reachable. Even the closest setting, {which} per round with z = {z:.6g}, "
                   f"gives {eps_txt} > {res['target_epsilon']:g}.")
    if md["delta"] >= 1 / n:
        out.append(f"Warning: δ = {md['delta']:g} is not well below 1/N = {1 / n:.3g}.")
    out += ["", f"ε after t rounds (m = {m}, z = {z:.6g}, δ = {md['delta']:g}):",
            f"{'rounds':>8}  {'RDP ε':>12}  {'PLD ε':>12}"]
    for row in res["curve"]:
        out.append(f"{row['rounds']:>8}  {fmt_eps(row['rdp']):>12}  {fmt_eps(row['pld']):>12}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = _validate(parser, args)
    if mode == "ftrl":
        from dpfl_app.tools.plan_ftrl import plan_ftrl, render_ftrl
        res = plan_ftrl(args)
        print(json.dumps(res, indent=2, default=_num) if args.json else render_ftrl(res))
        return 0
    res = plan(args, mode)
    if args.json:
        res["epsilon"] = {k: _num(v) for k, v in res["epsilon"].items()}
        res["curve"] = [{k: _num(v) if k != "rounds" else v for k, v in row.items()}
                        for row in res["curve"]]
        print(json.dumps(res, indent=2, allow_nan=False))
    else:
        print(render_text(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
