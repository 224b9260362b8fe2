"""A client's privacy policy: refuse to train for a server weaker than it accepts.

Following dpsa4flower, the server announces its mechanism in every train (and
secure-aggregation share-keys) message: the noise multiplier z, the sampling, the
population N, the clients per round m, the number of rounds T, delta,
whether the sum is computed by secure aggregation, and whether the noise is
deterministic (reproducible from a seed: epsilon = inf for the node). A client recomputes the
epsilon of that announcement with the same accountant the server reports
(`dpfl_app.privacy.accounting`); with noise-at=clients, its own bound from its
noise share and the threshold it enforces, without amplification
(`client_noise.own_epsilon`). It refuses when:

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
# The one vocabulary of a yes/no value, in node config and in the announcement.
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


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
    if flag(config.get("dp-deterministic-noise", False), "dp-deterministic-noise"):
        return math.inf
    if config.get("dp-noise-at") == "clients":  # its own bound: t shares, no amplification
        from dpfl_app.client.client_noise import own_epsilon
        return own_epsilon(config)
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
                if flag(config["dp-secure-aggregation"], "dp-secure-aggregation") else 0)
    model = AccountingModel(sampling, float(config["dp-noise"]), population, clients,
                            float(config["dp-delta"]), withheld)
    return epsilon_after(model, int(config["dp-rounds"]), headline_accountant(model))


def flag(value: Any, key: str) -> bool:
    """A yes/no value: a bool, or TRUE / FALSE as text (node config given as text).

    Anything else is a ValueError naming the key, never a silent false: a misspelt
    require-secure-aggregation must not turn the requirement off.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE + FALSE:
        return text in TRUE
    raise ValueError(f"{key}={value!r} is invalid; allowed: true or false")


def node_policy(node_config: dict[str, Any]) -> tuple[float, bool, bool]:
    """max-epsilon (0: none), require-secure-aggregation, trust-sampling.

    ValueError: one line naming the node-config key that is malformed.
    """
    value = node_config.get("max-epsilon", 0) or 0
    try:
        max_epsilon = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"max-epsilon={value!r} is invalid; allowed: a number "
                         "(0: no limit)") from None
    return (max_epsilon,
            flag(node_config.get("require-secure-aggregation", False),
                 "require-secure-aggregation"),
            flag(node_config.get("trust-sampling", True), "trust-sampling"))


def refusal(config: dict[str, Any], node_config: dict[str, Any]) -> str | None:
    """The reason this node refuses the announced mechanism, or None to take part."""
    try:
        max_epsilon, require_secure, trust_sampling = node_policy(node_config)
    except ValueError as error:  # refuse: a node must not train under a policy it misread
        return f"privacy policy: node-config {error}"
    if max_epsilon <= 0 and not require_secure:
        return None
    missing = [key for key in ANNOUNCED if key not in config]
    if missing:
        return f"privacy policy: the server did not announce {', '.join(missing)}"
    try:
        secure = flag(config["dp-secure-aggregation"], "dp-secure-aggregation")
        deterministic = flag(config["dp-deterministic-noise"], "dp-deterministic-noise")
    except ValueError as error:
        return f"privacy policy: the server announced {error}"
    if require_secure and not secure:
        return ("privacy policy: node-config require-secure-aggregation=true, but the server "
                "does not use secure aggregation")
    if max_epsilon > 0:
        try:  # noise-at=clients: the node's own bound, never amplified
            epsilon = announced_epsilon(config, trust_sampling)
        except ValueError as error:  # noise-at=clients: a parameter missing or out of range
            return f"privacy policy: the announced client noise is malformed: {error}"
        if not epsilon <= max_epsilon:  # also refuses inf (no noise) and nan
            shown = f"{epsilon:.3f}"
            if math.isinf(epsilon):
                shown = ("inf (deterministic noise: reproducible from the run's seed)"
                         if deterministic else "inf (no noise)")
            if config.get("dp-noise-at") == "clients":
                return (f"privacy policy: the announced client noise (Skellam share variance "
                        f"{config['dp-share-variance']}, at least t={config['dp-noise-threshold']}"
                        f" survivors, T={config['dp-rounds']} rounds, delta={config['dp-delta']})"
                        f" gives this client's own epsilon={shown}, without amplification by "
                        f"sampling, > node-config max-epsilon={max_epsilon}")
            return (f"privacy policy: the announced mechanism (z={config['dp-noise']}, "
                    f"{config['dp-sampling']} sampling of m={config['dp-clients']} of "
                    f"N={config['dp-population']}, T={config['dp-rounds']} rounds, "
                    f"delta={config['dp-delta']}) gives epsilon={shown}"
                    f"{'' if trust_sampling else ' without amplification by sampling'} > "
                    f"node-config max-epsilon={max_epsilon}")
    return None


def has_policy(node_config: dict[str, Any]) -> bool:
    try:
        max_epsilon, require_secure, _ = node_policy(node_config)
    except ValueError:  # a malformed policy is still a policy (refusal refuses it)
        return True
    return max_epsilon > 0 or require_secure


def plain_train_refusal(node_config: dict[str, Any]) -> str | None:
    """A node that requires secure aggregation never answers a plain train message.

    Whatever the server announces: the plain reply carries the update (and the train
    loss and example count) in the clear.
    """
    try:
        _, require_secure, _ = node_policy(node_config)
    except ValueError as error:
        return f"privacy policy: node-config {error}"
    if require_secure:
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
