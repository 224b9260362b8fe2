"""privacy.md for a DP-FTRL run: the rule, the factorization, its sensitivity, the trust.

Plain markdown, no Flower imports. The DP-FedAvg report is report.py.
"""

from __future__ import annotations

import math

from .ftrl_accounting import FtrlLedger
from .report import RECIPES_HINT, fmt_eps, strength
from .threat_model import threat_model


def _mechanism_lines(ledger: FtrlLedger) -> list[str]:
    model = ledger.model
    coefficients = ", ".join(f"{c:.4g}" for c in model.coefficients)
    workload = ("the prefix sums of the rounds' updates (the server's plain SGD step)"
                if model.momentum == 0 else
                f"the server's momentum trajectory (momentum {model.momentum:g})")
    count = (f"Adaptive clipping's count of unclipped updates gets independent noise of std "
             f"σ_b = {model.count_stddev:.4g} each round and is accounted the same way, with no "
             f"amplification: sensitivity 1/2 per participation, √k/2 over the run."
             if model.count_stddev > 0 else "No clipped-count was released.")
    return [
        "## Mechanism", "",
        f"DP-FTRL (Kairouz et al. 2021, \"Practical and Private (Deep) Learning without Sampling "
        f"or Shuffling\"). The workload is {workload}. It is factored as A = B·C with C the "
        f"banded square root of A (Kalinin & Lampert 2024): {model.bands} band(s), coefficients "
        f"{coefficients}. Round t's sum of clipped updates gets the noise "
        f"z_Δ·C_t·(C⁻¹z)_t with z_Δ = {model.update_noise_multiplier:.4g}, C_t the round's clip "
        f"norm and z i.i.d. standard Gaussian, so the model trajectory carries noise shaped by B "
        f"instead of fresh noise every round. The server keeps {model.bands - 1} model-sized "
        f"noise vector(s) in memory, never on disk.", "",
        "## Participation rule and sensitivity", "",
        f"Each client takes part at most once every b = {model.min_separation} round(s): at most "
        f"k = ⌈T/b⌉ = {model.participations()} times in T = {model.rounds} rounds. The server "
        f"asks only online clients not asked in the last b − 1 rounds, and every client keeps its "
        f"own record and refuses a request that comes sooner. With b ≥ the number of bands, two "
        f"participations never touch the same rows of C, so the sensitivity of C·x is "
        f"√(Σ column norms²) over the worst pattern (rounds 0, b, 2b, …): "
        f"{model.sensitivity():.4g} clip norms over the whole run (Choquette-Choo et al. 2023, "
        f"banded matrix factorization).", "", count, "",
        f"Both releases together are **one Gaussian mechanism over the whole run** with noise "
        f"multiplier {model.event_noise_multiplier():.4g} (= z / sensitivity, z = "
        f"{model.noise_multiplier:.4g}), add-or-remove-one adjacency (all of one client's "
        f"contributions): ε is the analytic Gaussian mechanism's exact figure (Balle & Wang 2018, "
        f"through dp_accounting), with dp_accounting's RDP accountant as the cross-check. "
        f"After t < T rounds the same holds for the first t rounds' sensitivity.", "",
        "## What no longer has to be trusted", "",
        "- **The server's sampling.** No amplification by sampling is claimed: the guarantee "
        "holds for *any* cohorts that respect the participation rule, chosen at random or not, "
        "and it is the clients who enforce that rule.",
        "- **The population size N.** It enters nowhere: announcing more clients than exist "
        "cannot lower ε.",
        "- **Still trusted:** the server adds the noise (central DP; see the threat model) and "
        "numbers its rounds honestly, up to the announced T: a client checks the separation in "
        "the server's round numbers.", "",
    ]


def ftrl_privacy_report(ledger: FtrlLedger, rounds_run: int, stop_reason: str | None = None) -> str:
    """Markdown privacy report of a DP-FTRL run, for the rounds in `ledger`."""
    model, rounds = ledger.model, ledger.rounds
    eps = ledger.epsilon()
    lines = ["# Privacy report (DP-FTRL)", ""]
    if ledger.noise_secret:
        lines.append(f"**Guarantee:** user-level (ε={fmt_eps(eps)}, δ={model.delta:g})-DP for any "
                     f"single client's entire data, after {rounds} of T = {model.rounds} rounds, "
                     f"with no assumption about how the server chose each round's clients.")
    else:
        lines.append(f"**Guarantee: none (ε = ∞).** deterministic-noise=true: the noise follows "
                     f"from the run's `seed`, which results.json records. ε if the noise were "
                     f"secret (NOT a guarantee): {fmt_eps(ledger.epsilon_if_secret())} at "
                     f"δ={model.delta:g}.")
    rdp = ledger.epsilon("rdp")
    if math.isfinite(eps):
        lines.append(f"(Cross-check: the RDP accountant gives ε = {fmt_eps(rdp)}.)")
    lines += ["", f"**Strength:** {strength(eps)}."]
    if model.noise_multiplier == 0:
        lines += ["", "**No DP noise was added (noise multiplier z = 0): ε = ∞.**"]
    elif eps > 20:
        lines += ["", f"**This model should NOT be considered private** (ε = {fmt_eps(eps)}).",
                  "", RECIPES_HINT]
    if stop_reason:
        lines += ["", f"Training stopped after {rounds_run} round(s): {stop_reason}."]
    if rounds_run > rounds:
        lines += ["", f"**Warning:** {rounds_run} rounds ran but only {rounds} were accounted."]
    lines += ["", *_mechanism_lines(ledger), *threat_model(False), "## Not covered", "",
              "Client-side evaluation metrics are not noised and not covered. Exact cohorts and "
              "reply counts stay in the operator's diagnostics file. ε bounds how much the "
              "released models can change, by a factor e^ε, when one client's whole data is "
              "added or removed; δ, the chance that bound fails, should be well below one over "
              "the number of clients.", ""]
    return "\n".join(lines)
