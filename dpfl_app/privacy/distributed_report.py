"""privacy.md for noise-at=clients: the three figures, the mechanism, who sees what."""

from __future__ import annotations

from .distributed_ledger import DistributedLedger
from .report import audit_section, fmt_eps, strength
from .threat_model import CLIENT_NOISE, threat_model


def distributed_report(ledger: DistributedLedger, rounds_run: int,
                       stop_reason: str | None = None, audit: dict | None = None,
                       assumptions: list[str] = ()) -> str:
    """Markdown: the guarantee with and without the server's sampling, the clients' bound."""
    model, p, eps = ledger.model, ledger.params, ledger.epsilons()
    survivors = ledger.accountant.survivors
    sampling = (f"Poisson sampling (q = m/N = {model.sampling_probability:.4g}; zero-out "
                f"adjacency: one client's update and count replaced by zero, its noise share "
                f"still added)" if model.sampling == "poisson" else
                f"fixed-size sampling of m = {model.clients_per_round} of N = {model.population} "
                f"(replace-one adjacency)")
    lines = [
        "# Privacy report", "",
        f"**Guarantee (trusting the server's sampling):** user-level (ε={fmt_eps(eps['rdp'])}, "
        f"δ={model.delta:g})-DP for any single client's data, under {sampling}, "
        f"{len(survivors)} released round(s) each accounted with the noise its survivors added "
        f"(Skellam mechanism, Agarwal, Kairouz & Liu 2021, RDP).",
        "",
        f"**Without trusting the server's sampling:** ε = {fmt_eps(eps['without_sampling'])} "
        f"(the same rounds and noise, no amplification).",
        "",
        f"**Each client's own bound:** ε = {fmt_eps(eps['client_bound'])}: what a client "
        f"computes from its own share and the t = {p.threshold} survivors it requires, over "
        f"all {ledger.rounds} round(s), trusting neither the server's sampling nor its "
        f"counts. It holds as long as the t survivors of a sum are honest.",
        "",
        f"**Mechanism (noise-at=clients):** each client clipped its update, rotated it "
        f"(randomized Walsh–Hadamard, public per-round seed), scaled it to γC = "
        f"{p.scale * p.clip:.4g} and rounded it to integers with norm at most "
        f"{p.l2_sensitivity:.4g}, then added its own Skellam noise of variance "
        f"{p.share_variance:.4g} per coordinate (count: {p.count_share_variance:.4g}) and "
        f"reduced it modulo 2^{p.bits} before masking: {p.padded_dim + 1} coordinates, "
        f"{p.bytes_per_client} bytes per client packed. The shares are calibrated so that "
        f"t = {p.threshold} of m = {model.clients_per_round} survivors give the noise "
        f"multiplier z = {model.noise_multiplier:.4g}; with more survivors there is more noise "
        f"(up to √(m/t) = {(model.clients_per_round / p.threshold) ** 0.5:.3g}×). The server "
        f"added no noise. {ledger.withheld_rounds} round(s) had fewer than t survivors: their "
        f"sum was withheld and nothing was released.",
        "", f"**Strength:** {strength(eps['rdp'])}.",
    ]
    if assumptions:
        lines += ["", "**Assumptions:** " + " ".join(assumptions) + " Survivors drop out "
                  "independently of their data."]
    if stop_reason:
        lines += ["", f"Training stopped after {rounds_run} round(s): {stop_reason}."]
    if model.noise_multiplier == 0:
        lines += ["", "**No noise (z = 0): there is no differential privacy guarantee: ε = ∞.**"]
    if audit is not None:
        lines += audit_section(audit)
    lines += ["", *threat_model(True), *CLIENT_NOISE, "", "## Not covered", "",
              "Participation: the server sees which clients send a masked input, and the "
              "number of survivors of each round (results.json lists them) sets that round's "
              "noise; the guarantee covers what a client's data contributed, not whether it "
              "took part. Client-side evaluation metrics are not covered.", ""]
    return "\n".join(lines)
