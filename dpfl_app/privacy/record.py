"""The accounting record published in results.json (no Flower imports).

It names every input of the reported epsilon, so that anyone can recompute it
with dp_accounting alone, from results.json and nothing else:

1. build `round_event` (a DpEvent written as a dict: its class name under
   "type" and its fields) and compose it `rounds` times;
2. RDP: dp_accounting's `RdpAccountant(rdp_orders, neighboring_relation)`;
   under replace-one, take per order the minimum of the RDP of `round_event`
   and of its inner Gaussian event (see accountants.py for why both hold);
3. PLD (Poisson only): `PLDAccountant(value_discretization_interval=...)`;
4. `epsilon` = the rule in `epsilon_rule` at `delta`.

It is rebuilt after every round, so `rounds` is always the number of rounds
charged so far.
"""

from __future__ import annotations

import math

from .accountants import PLD_MAX_RDP_EPSILON, PLD_MIN_DISCRETIZATION, RDP_ORDERS
from .accounting import PrivacyLedger


def _event_dict(model) -> dict:
    gaussian = {"type": "GaussianDpEvent", "noise_multiplier": model.event_noise_multiplier}
    if model.sampling == "poisson":
        return {"type": "PoissonSampledDpEvent",
                "sampling_probability": model.sampling_probability, "event": gaussian}
    return {"type": "SampledWithoutReplacementDpEvent",
            "source_dataset_size": model.population,
            "sample_size": model.clients_per_round, "event": gaussian}


def pld_discretization(ledger: PrivacyLedger) -> float | None:
    """The PLD value discretisation interval behind the current epsilon, if PLD was used."""
    eps_rdp = ledger.epsilon("rdp")
    if (ledger.model.sampling != "poisson" or ledger.rounds == 0
            or not math.isfinite(eps_rdp) or eps_rdp > PLD_MAX_RDP_EPSILON):
        return None
    return max(PLD_MIN_DISCRETIZATION, eps_rdp / 2000)


def accounting_record(ledger: PrivacyLedger) -> dict:
    """Everything needed to recompute the ledger's epsilon with dp_accounting."""
    if hasattr(ledger, "accounting_record"):  # dp-ftrl's ledger writes its own
        return ledger.accounting_record()
    model = ledger.model
    poisson = model.sampling == "poisson"
    return {
        **ledger.to_dict(),
        "round_event": _event_dict(model),
        "composition": "SelfComposedDpEvent(round_event, rounds)",
        "neighboring_relation": model.neighboring_relation.name,
        "rdp_orders": list(RDP_ORDERS),
        "rdp_rule": ("RdpAccountant" if poisson else
                     "per order, min(RDP of round_event, RDP of round_event.event)"),
        "pld_value_discretization_interval": pld_discretization(ledger),
        "epsilon_rule": "min(pld, rdp)" if poisson else "rdp",
        "epsilon": ledger.epsilon(),
        "epsilon_rdp": ledger.epsilon("rdp"),
        "epsilon_pld": ledger.epsilon("pld"),
    }
