"""The record-level part of privacy.md, in plain words (no Flower imports)."""

from __future__ import annotations

import math

from .record_level import RecordLevelModel, record_epsilon, steps_per_epoch


def _fmt(epsilon: float) -> str:
    return "∞" if math.isinf(epsilon) else f"{epsilon:.4g}"


def record_level_lines(model: RecordLevelModel, rounds: int, clip: float) -> list[str]:
    """The record-level guarantee after `rounds` rounds of DP-SGD at every site."""
    eps, eps_rdp = record_epsilon(model, rounds), record_epsilon(model, rounds, "rdp")
    q, per_epoch = model.sampling_rate, steps_per_epoch(model.sampling_rate)
    lines = [
        f"**Record-level guarantee:** (ε={_fmt(eps)}, δ={model.delta:g})-DP for any single "
        f"record (one person's example) at any site, however many records the site holds, for "
        f"a site that trained in every one of the {rounds} round(s). Each site ran DP-SGD "
        f"itself: each local step drew each record independently with probability q = {q:g} "
        f"(Poisson sampling; {per_epoch} steps per epoch, {model.steps_per_round} per round), "
        f"clipped each example's gradient to norm {clip:g}, and added Gaussian noise of "
        f"standard deviation {model.noise_multiplier:.4g} × {clip:g} to their sum, before "
        f"anything left the site. Add-or-remove-one adjacency of records; {rounds} × "
        f"{model.steps_per_round} = {rounds * model.steps_per_round} Poisson-sampled Gaussian "
        f"steps composed with the PLD accountant (RDP gives ε = {_fmt(eps_rdp)}).",
        "",
        "This holds against everyone, **the server and the other sites included**: the noise "
        "is added by the site, with a generator keyed from its operating system. A site that "
        "trained fewer rounds has a smaller ε. Each site keeps its own ledger of the rounds it "
        "really trained, logs its own ε on its own node, and refuses to train past its "
        "node-config `max-record-epsilon`; that does not depend on anything the server says.",
    ]
    if math.isfinite(eps) and eps > 20:
        lines += ["", f"**At the record level, ε = {_fmt(eps)} is no meaningful protection.**"]
    return lines


WHICH_UNIT = [
    "## Which unit to choose", "",
    "- **User-level** (`noise`, `clients`): protects everything one client (site or device) "
    "contributes, against everyone who sees the released models, but *not* against the server, "
    "which sees each update (with secure aggregation: the cohort's sum). Meaningful only with "
    "many clients per round: hundreds to thousands of devices.",
    "- **Record-level** (`record-noise` or `target-record-epsilon`): protects each person's "
    "record at each site against everyone, the server and the other sites included. It is the "
    "unit that works at 10 to 50 sites (hospitals, companies). It does not hide that a site took "
    "part, nor properties of a site's data as a whole.",
    "- **Both**: combine them; each figure keeps its own unit.", "",
]


def record_fields(model: RecordLevelModel, rounds: int) -> dict:
    """A round's (or the run's) record-level figures, for results.json and rounds.csv."""
    return {"record_epsilon": record_epsilon(model, rounds),
            "record_epsilon_rdp": record_epsilon(model, rounds, "rdp")}


def record_log_text(model: RecordLevelModel, rounds: int) -> str:
    """The record-level part of a round's log line (and of the run's last line)."""
    return (f"record-level epsilon {record_epsilon(model, rounds):.3f} at delta "
            f"{model.delta:g} (any record at any site)")
