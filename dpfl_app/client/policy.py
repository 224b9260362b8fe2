"""A client's privacy policy: refuse to train for a server weaker than it accepts.

Following dpsa4flower, the server announces its mechanism in every train (and
secure-aggregation setup) message: the noise multiplier z, the sampling, the
population N, the clients per round m, the number of rounds T, delta,
whether the sum is computed by secure aggregation, and whether the noise is
deterministic (reproducible from a seed: epsilon = inf for the node). A client recomputes the
epsilon of that announcement with the same accountant the server reports
(`dpfl_app.privacy.accounting`), and refuses when:

- its node-config `max-epsilon` (> 0) is below that epsilon, or a key is missing;
  with node-config `trust-sampling=false` that epsilon is the one without
  amplification by sampling (q = 1: the node is in every announced round), which
  no announced population N or sampling can lower: a node cannot verify either;
- its node-config `require-secure-aggregation` is true and the server does not
  use secure aggregation.

A refusal is an error reply: the server records its reason in the operator's
diagnostics and counts it as a dropout. The check imports no torch, so it
costs nothing on a cold start.
"""

from __future__ import annotations

import math
from typing import Any

# The announcement, as keys of the message's ConfigRecord.
ANNOUNCED = ("dp-sampling", "dp-noise", "dp-population", "dp-clients", "dp-rounds", "dp-delta",
             "dp-secure-aggregation", "dp-deterministic-noise")
POLICY_KEYS = ("max-epsilon", "require-secure-aggregation", "trust-sampling")


def announcement(model, rounds: int, secure: bool, deterministic: bool = False) -> dict[str, Any]:
    """What the server puts in every train message's config.

    `model`: the AccountingModel of *this* run's clients (for a simulated
    deployment, the real cohort with the noise it really gets, not the
    simulated one). `deterministic`: the noise is reproducible from a seed,
    which the node treats as epsilon = inf.
    """
    return {"dp-sampling": model.sampling, "dp-noise": model.noise_multiplier,
            "dp-population": model.population, "dp-clients": model.clients_per_round,
            "dp-rounds": int(rounds), "dp-delta": model.delta, "dp-secure-aggregation": secure,
            "dp-deterministic-noise": bool(deterministic)}


def announced_epsilon(config: dict[str, Any], trust_sampling: bool = True) -> float:
    """Epsilon after all announced rounds, with the server's headline accountant.

    inf when the noise is announced as deterministic. Under secure aggregation
    the node derives the withheld-sum bound W itself from the announced N, m
    and sampling (`withheld_sum_bound`), so a server cannot announce a smaller one.
    `trust_sampling=False`: without amplification, as if N = m (q = 1, the node is in
    every one of the T rounds; W then is m for both samplings). A bigger announced N
    can then lower nothing; m still sets W, and a node checks m against its neighbourhood.
    """
    if _flag(config.get("dp-deterministic-noise", False)):
        return math.inf
    if config.get("dp-mechanism") == "dp-ftrl":  # no sampling: one Gaussian over the run
        from dpfl_app.privacy.ftrl_accounting import announced_epsilon as ftrl_epsilon
        return ftrl_epsilon(config)
    # Imported here: dp-accounting (and scipy) load only on nodes that set max-epsilon.
    from dpfl_app.privacy.accounting import (  # pylint: disable=import-outside-toplevel
        AccountingModel, epsilon_after, headline_accountant, withheld_sum_bound)

    sampling, population = config["dp-sampling"], int(config["dp-population"])
    clients = int(config["dp-clients"])
    if not trust_sampling:
        population = clients
    withheld = (withheld_sum_bound(sampling, population, clients)
                if _flag(config["dp-secure-aggregation"]) else 0)
    model = AccountingModel(sampling, float(config["dp-noise"]), population, clients,
                            float(config["dp-delta"]), withheld)
    return epsilon_after(model, int(config["dp-rounds"]), headline_accountant(model))


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def refusal(config: dict[str, Any], node_config: dict[str, Any]) -> str | None:
    """The reason this node refuses the announced mechanism, or None to take part."""
    max_epsilon = float(node_config.get("max-epsilon", 0) or 0)
    require_secure = _flag(node_config.get("require-secure-aggregation", False))
    if max_epsilon <= 0 and not require_secure:
        return None
    missing = [key for key in ANNOUNCED if key not in config]
    if missing:
        return f"privacy policy: the server did not announce {', '.join(missing)}"
    if require_secure and not _flag(config["dp-secure-aggregation"]):
        return ("privacy policy: node-config require-secure-aggregation=true, but the server "
                "does not use secure aggregation")
    if max_epsilon > 0:
        trust = node_config.get("trust-sampling", True)
        if str(trust).strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            return (f"privacy policy: node-config trust-sampling={trust!r} is invalid; "
                    "allowed: true or false")
        trust_sampling = _flag(trust)
        epsilon = announced_epsilon(config, trust_sampling)
        if not epsilon <= max_epsilon:  # also refuses inf (no noise) and nan
            shown = f"{epsilon:.3f}"
            if math.isinf(epsilon):
                shown = ("inf (deterministic noise: reproducible from the run's seed)"
                         if _flag(config["dp-deterministic-noise"]) else "inf (no noise)")
            return (f"privacy policy: the announced mechanism (z={config['dp-noise']}, "
                    f"{config['dp-sampling']} sampling of m={config['dp-clients']} of "
                    f"N={config['dp-population']}, T={config['dp-rounds']} rounds, "
                    f"delta={config['dp-delta']}) gives epsilon={shown}"
                    f"{'' if trust_sampling else ' without amplification by sampling'} > "
                    f"node-config max-epsilon={max_epsilon}")
    return None


def has_policy(node_config: dict[str, Any]) -> bool:
    return (float(node_config.get("max-epsilon", 0) or 0) > 0
            or _flag(node_config.get("require-secure-aggregation", False)))


def plain_train_refusal(node_config: dict[str, Any]) -> str | None:
    """A node that requires secure aggregation never answers a plain train message.

    Whatever the server announces: the plain reply carries the update (and the train
    loss and example count) in the clear.
    """
    if _flag(node_config.get("require-secure-aggregation", False)):
        return ("privacy policy: node-config require-secure-aggregation=true, and this is a "
                "plain train message, whose reply would carry the update in the clear")
    return None


def round_refusal(config: dict[str, Any], last_round: int | None) -> str | None:
    """A train request for a round this node already trained (a replay), or past the announced T.

    A node sees the round number and can count its own participations; a second
    request for one round, or a round past `dp-rounds`, spends privacy the
    announced epsilon does not cover.
    """
    round_id = int(config.get("server-round", 0))
    if last_round is not None and round_id <= last_round:
        return (f"privacy policy: a second train request for round {round_id} (this node "
                f"already trained round {last_round})")
    if "dp-rounds" in config and round_id > int(config["dp-rounds"]):
        return (f"privacy policy: round {round_id} is past the {config['dp-rounds']} rounds "
                "the server announced")
    return None
