"""Plain-words privacy report (markdown, for privacy.md). No Flower imports."""

from __future__ import annotations

import math

from .accounting import AccountingModel, PrivacyLedger
from .record_report import WHICH_UNIT
from .calibration import calibrate_clients, calibrate_noise, max_clients_within, round_up
from .threat_model import threat_model

ACCEPTABLE_EPSILON = 8.0
STRONG_EPSILON = 1.0
# Where a user who got "not private" finds configurations that are private and useful.
# The command is the real one (a test runs its names against recipes/ and .flwr/config.toml);
# the times are the recipes' measured `flwr run`s (docs/recipes.md).
RECIPES_HINT = ("To train privately, start from a recipe instead: the run-config files in "
                "`recipes/` reach ε = 1, 2, 4 or 8 on digits with 1,437 simulated users "
                "(docs/recipes.md), e.g. "
                "`flwr run . digits-1437 --run-config recipes/digits-eps2.toml`; "
                "each takes 19-25 min on 2 CPU cores. With few sites (10 to 50), "
                "protect each person's record at every site instead (docs/record-level.md): "
                "`flwr run . digits-10 --run-config recipes/digits-record-eps4.toml` "
                "(record-level ε = 4: the same as `--run-config "
                "\"target-record-epsilon=4 noise=0\"` on 10 SuperNodes; about 2 min).")


def strength(epsilon: float) -> str:
    """'strong' (eps <= 1), 'moderate' (<= 8), 'weak' (<= 20), else 'no meaningful protection'."""
    if epsilon is None or math.isnan(epsilon) or epsilon > 20:
        return "no meaningful protection"
    if epsilon <= STRONG_EPSILON:
        return "strong"
    if epsilon <= ACCEPTABLE_EPSILON:
        return "moderate"
    return "weak"


def fmt_eps(epsilon: float | None) -> str:
    if epsilon is None:
        return "n/a"
    return "∞" if math.isinf(epsilon) else f"{epsilon:.4g}"


def describe_model(model: AccountingModel, rounds: int, accountant: str) -> str:
    """One phrase naming sampling, adjacency, N, m, z, rounds and the accountant."""
    n, m, z = model.population, model.clients_per_round, model.noise_multiplier
    if model.sampling == "poisson":
        sampling = (f"Poisson sampling (each of N = {n} clients joins each round independently "
                    f"with probability q = m/N = {model.sampling_probability:.4g}; the server "
                    f"divides by the fixed expected cohort size m = {m})")
        adjacency = "add-or-remove-one adjacency"
    else:
        sampling = (f"fixed-size sampling without replacement (exactly m = {m} of N = {n} "
                    f"clients each round)")
        adjacency = (f"replace-one adjacency (sensitivity doubled, so the accounted "
                     f"multiplier is z/2 = {z / 2:.4g})")
    if model.withheld_inputs:
        adjacency += (f"; secure aggregation may withhold a round's whole sum, of up to "
                      f"W = {model.withheld_inputs} clients, depending on who took part, so "
                      f"the accounted sensitivity is {model.sensitivity_multiple}·C and the "
                      f"multiplier z/{model.sensitivity_multiple} = "
                      f"{model.event_noise_multiplier:.4g}")
    name = {"pld": "PLD", "rdp": "RDP"}[accountant]
    return (f"{sampling}, {adjacency}, noise multiplier z = {z:.4g}, {rounds} rounds, "
            f"{name} accountant")


def float_line(residual: dict) -> str:
    """The floating-point residual of the noise sampler, in one sentence."""
    if not residual["bound_applies"]:
        return ("**Floating point:** the release grid is coarser than σ/256 in this "
                "configuration (m/z_Δ above about 16,000), where our bound of the sampler's "
                "residual is not claimed.")
    head = (f"**Floating point:** the ε above is that of an exact Gaussian. numpy's sampler "
            f"differs from it by a factor within e^±2^-36 per released number (docs/privacy.md, "
            f"\"Randomness and floating point\"); over the "
            f"{residual['coordinates_released']:,} numbers released, ")
    if residual["delta_with_float"] >= 1:
        # The sampler's tail term grows like e^ε: at an ε this large it bounds nothing.
        return head + ("our bound of the sampler's residual is vacuous (δ ≥ 1) at this ε; "
                       "the ε above already says the run is not private.")
    return head + (f"the guarantee is (ε + {residual['epsilon_added']:.2g}, "
                   f"δ·{residual['delta_factor']:.6g})-DP, i.e. "
                   f"ε ≤ {fmt_eps(residual['epsilon_with_float'])} at δ = "
                   f"{residual['delta_with_float']:.4g}.")


def withheld_section(ledger: PrivacyLedger) -> list[str]:
    """Why secure aggregation's epsilon is larger, and the figure under a stated assumption."""
    model = ledger.model
    return ["", "## Withheld sums (secure aggregation)", "",
            "A secure sum is released only when enough clients survive to rebuild the masks; "
            "otherwise the round releases noise only. Whether that happens depends on who took "
            "part: adding one client can turn \"noise only\" into \"the sum of the others and "
            "that client\". When the other clients' answers sit exactly at the protocol's "
            "threshold, one client's presence or dropout decides it, so the guarantee above "
            f"charges each round with sensitivity W·C, W = {model.withheld_inputs} (the largest "
            "cohort), against any pattern of dropouts.", "",
            f"ε if no sampled client drops out during the protocol (an ASSUMPTION about the "
            f"deployment, NOT part of the guarantee: then only a cohort smaller than "
            f"{ledger.no_dropout_floor} is withheld, W = {max(2, ledger.no_dropout_floor)}): "
            f"{fmt_eps(ledger.epsilon_if_no_dropout())} at δ={model.delta:g}."]


def _reach(model: AccountingModel, rounds: int, goal: float, accountant: str) -> list[str]:
    """Bullets: what reaches eps <= goal with the same N, rounds and delta."""
    n, m, z, d, s = (model.population, model.clients_per_round, model.noise_multiplier,
                     model.delta, model.sampling)
    out = []
    try:
        z_need = calibrate_noise(goal, d, rounds, n, m, s, accountant, model.withheld_inputs)
        out.append(f"- Keeping m = {m} clients per round: you need noise ≥ {z_need:g} "
                   f"(noise multiplier; now {z:.4g}).")
    except ValueError:
        out.append(f"- Keeping m = {m} clients per round: not reachable by adding noise.")
    if model.withheld_inputs:
        out.append("- Without secure aggregation nothing is withheld, and the sensitivity is "
                   "C (Poisson) or 2C (fixed-size).")
        return out
    if z == 0:
        out.append("- Changing the number of clients per round cannot help while no noise is added.")
        return out
    ratio = z / m
    m_need = calibrate_clients(goal, d, rounds, n, noise_to_clients_ratio=ratio,
                               sampling=s, accountant=accountant)
    if m_need is None:
        out.append(f"- Keeping the same noise on the averaged update (z/m = {ratio:.4g}): not "
                   f"reachable, even with all N = {n} clients every round.")
    else:
        out.append(f"- Keeping the same noise on the averaged update (z/m = {ratio:.4g}): you need "
                   f"≥ {m_need} clients per round (with z = {round_up(m_need * ratio, 6):g}).")
    m_max = max_clients_within(goal, d, rounds, n, noise_multiplier=z, sampling=s,
                               accountant=accountant)
    if m_max is None:
        out.append(f"- Keeping z = {z:.4g}: not reachable with any number of clients per round "
                   f"(fewer clients per round lowers ε, but even 1 is too many).")
    else:
        out.append(f"- Keeping z = {z:.4g}: at most {m_max} clients per round "
                   f"(at a fixed z, more clients per round *raise* ε).")
    return out


def audit_section(audit: dict) -> list[str]:
    """The empirical audit beside the accounted epsilon, in plain words."""
    lines = ["", "## Empirical privacy audit (one run, canary clients)", ""]
    k, eps, acc = audit["canaries"], audit["epsilon"], audit["accounted_epsilon"]
    lines.append(
        f"The server inserted {k} canary clients, sampled like real clients (about "
        f"{audit['canaries_per_round']:.3g} per round), each pushing one secret random direction, "
        f"and kept {audit['unseen_canaries']} more directions that were never inserted (Andrew et "
        f"al., \"One-shot Empirical Privacy Estimation for Federated Learning\", ICLR 2024). "
        f"An attacker who sees every released model compares each direction with every round's "
        f"update; how well that separates inserted from unseen canaries gives an ε.")
    if eps is None:
        return lines + ["", "No model update was released, so there is nothing to estimate."]
    low, high = audit["epsilon_ci95"]
    lines += ["", f"**Empirical ε ≈ {fmt_eps(eps)}** at δ = {audit['delta']:g} (95% bootstrap "
                  f"interval {fmt_eps(low)} to {fmt_eps(high)}), against the **accounted "
                  f"ε = {fmt_eps(acc)}**.", "",
              "This is a lower estimate from one run, not a guarantee: it says how much this "
              "attack actually learned, and a correct mechanism keeps it below the accounted ε."]
    if audit["verdict"] == "below":
        lines += ["", "It is below the accounted ε, as it must be."]
    elif audit["verdict"] == "above-within-error":
        lines += ["", "**Warning: the empirical ε is above the accounted ε**, although within "
                      "the estimate's sampling error. Rerun with more canaries; if it stays above, "
                      "the mechanism does not do what the accountant assumes."]
    else:
        lines += ["", "**ALERT: the empirical ε EXCEEDS the accounted ε, beyond its sampling "
                      "error. Something is wrong: the noise, the clipping, the sampling or the "
                      "accounting does not match what the code claims. Do not trust this run's "
                      "ε.**"]
    count = audit.get("count_channel")
    if count is not None and count.get("epsilon") is not None:
        lines += ["", f"The clipped-count release, audited on its own (each canary's coin per "
                      f"round against the released count): empirical ε ≈ "
                      f"{fmt_eps(count['epsilon'])} (verdict: {count['verdict']})."]
    lines += ["", "Canaries change the model a little: each sampled one adds the clip norm "
                  "times a random unit direction to the update, like one more client."]
    if audit.get("population_warning"):
        lines += ["", f"**Warning:** {audit['population_warning']}"]
    return lines


def privacy_report(ledger: PrivacyLedger, rounds_run: int, stop_reason: str | None = None,
                   audit: dict | None = None, secure_aggregation: bool = False,
                   assumptions: list[str] = (), simulation: str | None = None,
                   float_residual: dict | None = None,
                   record_level: list[str] | None = None, user_level_clip: bool = True) -> str:
    """Markdown privacy report for the rounds composed in `ledger`, with the audit if any.

    `assumptions` are sentences the guarantee rests on (e.g. how N was chosen).
    `simulation`: the sentence that says this run only simulated the noise of
    the deployment `ledger` accounts for; it then opens the report.
    `record_level`: the record-level guarantee's lines (record_report.py), shown
    beside the user-level one when the run asked for record-level DP-SGD.
    `user_level_clip=False`: record-level DP alone, whose updates were not clipped.
    """
    model, rounds, acc = ledger.model, ledger.rounds, ledger.headline
    eps = ledger.epsilon()
    eps_all = ledger.epsilons()
    cat = strength(eps)
    lines = ["# Privacy report", ""]
    if simulation:
        lines = [f"**THIS RUN IS A {simulation}**", "", "# Privacy report (of the simulated "
                 "deployment)", ""]
    if ledger.noise_secret:
        lines.append(f"**Guarantee:** user-level (ε={fmt_eps(eps)}, δ={model.delta:g})-DP for any "
                     f"single client's entire data, under {describe_model(model, rounds, acc)}.")
    else:
        lines += [f"**Guarantee: none (ε = ∞).** The run used deterministic-noise=true: the noise "
                  "came from a generator seeded with the run's `seed`, which results.json records, "
                  "so anyone can regenerate the noise and subtract it from the released models. "
                  "Use it for reproducible experiments only.", "",
                  f"ε if the noise were secret (NOT a guarantee for this run): "
                  f"{fmt_eps(ledger.epsilon_if_secret())} at δ={model.delta:g}, under "
                  f"{describe_model(model, rounds, acc)}."]
    other = "rdp" if acc == "pld" else "pld"
    if eps_all.get(other) is not None and math.isfinite(eps):
        lines.append(f"(Cross-check: the {other.upper()} accountant gives ε = "
                     f"{fmt_eps(eps_all[other])}.)")
    if float_residual is not None and ledger.noise_secret and rounds > 0:
        lines += ["", float_line(float_residual)]
    if record_level:
        lines += ["", *record_level]
    if assumptions:
        lines += ["", "**Assumptions:** " + " ".join(assumptions)]
    lines += ["", f"**Strength:** {cat}."]
    if not user_level_clip:
        lines += ["", "**No user-level clip and no user-level noise: there is no user-level "
                      "guarantee, and no user-level ε is claimed (ε = ∞).** Each site sent its "
                      "DP-SGD update unclipped and no clipped count was released: a clip without "
                      "server noise would cost accuracy and protect nothing. The record-level "
                      "guarantee above stands: each site's own noise bounds what its update "
                      "reveals about any record."]
    elif model.noise_multiplier == 0 and record_level:
        lines += ["", "**The server added no noise (noise multiplier z = 0): there is no "
                      "user-level guarantee (ε = ∞).** The record-level guarantee above stands."]
    elif model.noise_multiplier == 0:
        lines += ["", "**No DP noise was added (noise multiplier z = 0). There is no differential "
                      "privacy guarantee at all: ε = ∞.**"]
    if eps > 20 and record_level:
        lines += ["", f"At the user level, ε = {fmt_eps(eps)} says nothing useful: an attacker "
                      f"could in principle tell whether a given client took part."]
    elif eps > 20:
        lines += ["", f"**This model should NOT be considered private.** With ε = {fmt_eps(eps)} "
                      f"the guarantee says nothing useful: an attacker could in principle tell "
                      f"whether a given client took part, and learn about that client's data.",
                  "", RECIPES_HINT]
    run = f"{rounds_run} round(s) ran"
    if stop_reason:
        lines += ["", f"Training stopped after {rounds_run} round(s): {stop_reason}."]
    if rounds_run > rounds:
        lines += ["", f"**Warning:** {run} but only {rounds} were accounted. The "
                      f"{rounds_run - rounds} unaccounted round(s) are NOT covered by the figure above."]
    elif rounds_run < rounds:
        lines += ["", f"Note: {rounds} rounds were charged but {run}; the figure above is conservative."]
    if model.delta >= 1 / model.population:
        lines += ["", f"**Warning:** δ = {model.delta:g} is not well below 1/N = "
                      f"{1 / model.population:.3g}. A mechanism that publishes one client's data "
                      f"outright can satisfy such a δ. Choose δ ≪ 1/N."]
    eps = ledger.epsilon_if_secret()  # what the parameters would give: the advice below
    goal = ACCEPTABLE_EPSILON if eps > ACCEPTABLE_EPSILON else (
        STRONG_EPSILON if eps > STRONG_EPSILON else None)
    if rounds > 0 and goal is not None:
        lines += ["", f"## What would reach ε ≤ {goal:g} (same N = {model.population}, "
                      f"{rounds} rounds, δ = {model.delta:g}, {acc.upper()})", ""]
        lines += _reach(model, rounds, goal, acc)
    elif rounds == 0:
        lines += ["", "No round was accounted: nothing trained was released, so ε = 0."]
    if model.withheld_inputs and rounds > 0:
        lines += withheld_section(ledger)
    if audit is not None:
        lines += audit_section(audit)
    lines += [
        "", "## What ε and δ mean", "",
        "Differential privacy promises that anything computed from the released models is almost "
        "equally likely whether or not any one client took part, with all of that client's data "
        "over all rounds. ε bounds the difference: any outcome's probability can change by at most "
        "a factor of e^ε. δ is the small probability that this bound fails, and it should be well "
        "below 1/N. Smaller is better. ε ≤ 1 is strong, and single digits are common in practice. "
        "Above about 20 the promise is empty.",
        "", *threat_model(secure_aggregation), *WHICH_UNIT,
        "## Not covered", "",
        "Client-side evaluation metrics (loss and accuracy computed on clients' private data) are "
        "not noised and are **not covered** by this guarantee. Treat them as non-private. Only the "
        "noised model update and the noised clipped-count are covered; exact participation "
        "counts stay in the operator's diagnostics file and are not released. The guarantee "
        "also assumes the mechanism ran as modelled: an unweighted sum over the sampled "
        "clients, the fixed denominator m, and noise scaled to the clip norm the clients used.",
        "",
    ]
    return "\n".join(lines)
