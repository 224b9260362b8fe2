"""`dpfl plan --mechanism dp-ftrl`: noise or epsilon for DP-FTRL, beside the honest
DP-FedAvg alternative (no amplification).

No population and no sampling rate: T rounds, min-separation b (so at most
k = ceil(T/b) participations), the banded square-root factorization the
server would choose, one Gaussian mechanism over the run.
"""

from __future__ import annotations

import argparse

from dpfl_app.privacy import ftrl_accounting as fa
from dpfl_app.privacy.report import fmt_eps, strength


def plan_ftrl(a: argparse.Namespace) -> dict:
    t, b, d, e = a.rounds, a.min_separation, a.delta, a.target_epsilon
    momentum, bands = a.momentum, a.ftrl_bands  # bands 0: the run's least-error choice
    sens = fa.run_sensitivity(t, b, momentum, bands)
    if a.noise is None:
        z = fa.calibrate_noise(e, d, sens)
        question = f"smallest noise multiplier z with ε ≤ {e:g} after {t} rounds"
    else:
        z = a.noise
        question = f"ε after {t} rounds at z = {z:g}"
    m = a.clients or 1
    model, _ = fa.build_model(z, t, b, m, d, momentum, bands=bands)
    eps = fa.gaussian_epsilon(model.event_noise_multiplier(), d) if z else float("inf")
    no_amp = fa.no_amplification_epsilon(z, t, d)
    curve = []
    ledger = fa.FtrlLedger(model)
    for rounds in sorted({1, t} | {max(1, round(t * k / 10)) for k in range(1, 10)}):
        ledger.compose_round(rounds - ledger.rounds)
        curve.append({"rounds": rounds, "epsilon": ledger.epsilon()})
    return {"mechanism": "dp-ftrl", "question": question, "rounds": t, "min_separation": b,
            "participations": model.participations(), "bands": model.bands,
            "coefficients": list(model.coefficients), "sensitivity": model.sensitivity(),
            "momentum": momentum, "delta": d, "noise_multiplier": z, "epsilon": eps,
            "target_epsilon": e, "reachable": e is None or eps <= e, "strength": strength(eps),
            "dp_fedavg_no_amplification_epsilon": no_amp,
            "noise_std_on_mean": z / m if a.clients else None, "curve": curve}


def render_ftrl(res: dict) -> str:
    out = [f"Model: DP-FTRL, T = {res['rounds']} rounds, min-separation b = "
           f"{res['min_separation']} (at most k = {res['participations']} participations per "
           f"client), δ = {res['delta']:g}; no population, no sampling assumption",
           f"Factorization: banded square root, {res['bands']} band(s) (server memory: "
           f"{res['bands'] - 1} model-sized noise vector(s)); sensitivity "
           f"{res['sensitivity']:.4g} clip norms",
           f"Question: {res['question']}",
           f"Answer: z = {res['noise_multiplier']:.6g}, ε = {fmt_eps(res['epsilon'])} "
           f"({res['strength']})"]
    if res["noise_std_on_mean"] is not None:
        out.append(f"        noise std on the mean update, fresh part: z·C/m = "
                   f"{res['noise_std_on_mean']:.4g}·C")
    out.append(f"DP-FedAvg with the same z and no amplification (each client possibly in every "
               f"round): ε = {fmt_eps(res['dp_fedavg_no_amplification_epsilon'])}")
    out += ["", f"{'rounds':>8}  {'ε':>12}"]
    out += [f"{row['rounds']:>8}  {fmt_eps(row['epsilon']):>12}" for row in res["curve"]]
    return "\n".join(out)
