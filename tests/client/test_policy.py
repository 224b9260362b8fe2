"""A SuperNode's privacy policy recomputes the announced epsilon with our accountant."""

from __future__ import annotations

import math

import pytest

from dpfl_app.client import policy as client_policy
from dpfl_app.privacy.accounting import AccountingModel, epsilon_after

MODEL = AccountingModel("poisson", 1.0, 100, 10, 1e-5)


def _announced(secure=False, rounds=20):
    return client_policy.announcement(MODEL, rounds, secure)


def test_the_announced_epsilon_is_the_servers_headline_epsilon():
    assert client_policy.announced_epsilon(_announced()) == pytest.approx(
        epsilon_after(MODEL, 20, "pld"))  # 3.59 (PLD; the reference table of tests/privacy/test_accounting.py)


def test_no_policy_accepts_anything():
    assert client_policy.refusal(_announced(), {}) is None
    assert client_policy.refusal({}, {}) is None


@pytest.mark.parametrize("limit,refused", [(3.0, True), (4.0, False)])
def test_max_epsilon_refuses_only_a_weaker_mechanism(limit, refused):
    reason = client_policy.refusal(_announced(), {"max-epsilon": limit})
    assert (reason is not None) == refused
    if refused:
        assert "epsilon=3.59" in reason and f"max-epsilon={limit}" in reason


def test_no_noise_is_refused_under_any_max_epsilon():
    announced = client_policy.announcement(MODEL.replace(noise_multiplier=0.0), 5, True)
    assert "inf (no noise)" in client_policy.refusal(announced, {"max-epsilon": 1e6})


def test_require_secure_aggregation():
    policy = {"require-secure-aggregation": "true"}
    assert "require-secure-aggregation" in client_policy.refusal(_announced(False), policy)
    assert client_policy.refusal(_announced(True), policy) is None


def test_a_server_that_announces_nothing_is_refused_by_a_node_with_a_policy():
    assert "did not announce" in client_policy.refusal({}, {"max-epsilon": 8.0})


def test_deterministic_noise_is_announced_and_the_node_treats_it_as_no_guarantee():
    """deterministic-noise=true: the noise is reproducible from the seed, epsilon = inf.
    The old announcement omitted it, and a node with max-epsilon=10 accepted (8.38)."""
    from dpfl_app.config import validate
    from dpfl_app.strategy.build import build_strategy
    from tests.inprocess import default_run_config

    cfg = validate(default_run_config(**{"deterministic-noise": True, "population": 10,
                                         "clients": 6, "rounds": 5, "noise": 1.0}))
    announced = build_strategy(cfg, 10, 1.0).announcement
    assert announced["dp-deterministic-noise"] is True
    assert client_policy.announced_epsilon(announced) == float("inf")
    reason = client_policy.refusal(announced, {"max-epsilon": 10.0})
    assert reason is not None and "deterministic noise" in reason
    secret = {**announced, "dp-deterministic-noise": False}
    assert client_policy.refusal(secret, {"max-epsilon": 10.0}) is None  # 8.38 <= 10


# --- the ClientApp's train handlers (dpfl_app.client.secagg's mods) ---------------------

def _train_message(config: dict, message_type: str = "train"):
    from flwr.app import ConfigRecord, Message, RecordDict

    import tests.fakes  # noqa: F401  (gives this process a task identity, as messages need)

    return Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=1,
                   message_type=message_type)


def _context(node_config: dict):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


def _passes(mod, config: dict, context) -> bool:
    """Whether `mod` lets the message through to training (True) or refuses it."""
    called = []

    def train(msg, ctx):
        called.append(msg)
        return msg

    reply = mod(_train_message(config), context, train)
    assert bool(called) != reply.has_error()
    return bool(called)


def test_a_node_that_requires_secure_aggregation_refuses_a_plain_train_message():
    """The bypass: the server *announces* secure aggregation but sends a plain `train`
    message, whose reply would carry the update in the clear."""
    from dpfl_app.client.secagg import plain_policy_mod, policy_mod

    announced = {**_announced(secure=True), "server-round": 1}
    requiring = _context({"require-secure-aggregation": True})
    assert not _passes(plain_policy_mod, announced, requiring)
    # The masked path (train.secagg) passes the same policy; a node without the
    # requirement still answers plain train messages.
    assert _passes(policy_mod, announced, _context({"require-secure-aggregation": True}))
    assert _passes(plain_policy_mod, announced, _context({}))


def test_a_node_with_a_policy_refuses_a_replayed_round_and_a_round_past_the_announced_t():
    from dpfl_app.client.secagg import plain_policy_mod

    context = _context({"max-epsilon": 4.0})
    config = {**_announced(rounds=20), "server-round": 3}
    assert _passes(plain_policy_mod, config, context)
    assert not _passes(plain_policy_mod, config, context)  # round 3 again
    assert not _passes(plain_policy_mod, {**config, "server-round": 2}, context)
    assert _passes(plain_policy_mod, {**config, "server-round": 4}, context)
    assert not _passes(plain_policy_mod, {**config, "server-round": 21}, context)


# --- node-config trust-sampling=false: the epsilon a node can verify ----------------------

def _gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with mu = sensitivity / sigma (Balle & Wang
    2018, Thm 8), independent of dp-accounting: T rounds of z compose to mu = sqrt(T)/z."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def gap(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(gap, 0.0, 100.0)


def test_without_trusting_the_sampling_a_lying_population_is_refused():
    """Announcing N = 10**9 instead of 100 makes the trusted epsilon about 0, and
    max-epsilon=1 accepts; a node with trust-sampling=false computes the epsilon
    without amplification, which no announced N changes, and refuses."""
    lying = {**_announced(), "dp-population": 10**9}
    assert client_policy.announced_epsilon(lying) < 0.1
    assert client_policy.refusal(lying, {"max-epsilon": 1.0}) is None
    untrusting = {"max-epsilon": 1.0, "trust-sampling": "false"}
    reason = client_policy.refusal(lying, untrusting)
    assert reason is not None and "without amplification by sampling" in reason
    honest = _announced()
    assert (client_policy.announced_epsilon(lying, trust_sampling=False)
            == client_policy.announced_epsilon(honest, trust_sampling=False))


def test_the_unamplified_epsilon_is_the_gaussian_mechanisms_over_every_round():
    """Poisson, no secure aggregation: T = 20 Gaussians of multiplier z = 1 are one
    Gaussian with mu = sqrt(20). PLD's pessimistic discretisation may only be above
    the exact value, by well under 1 % at this interval."""
    exact = _gaussian_epsilon(math.sqrt(20) / 1.0, 1e-5)
    computed = client_policy.announced_epsilon(_announced(), trust_sampling=False)
    assert exact <= computed <= exact * 1.01
    assert computed > client_policy.announced_epsilon(_announced())  # 3.59 with q = 0.1
    assert client_policy.refusal(_announced(), {"max-epsilon": computed * 1.001,
                                                "trust-sampling": False}) is None


def test_trust_sampling_true_is_the_default():
    for value in (True, "true"):
        assert (client_policy.refusal(_announced(), {"max-epsilon": 4.0, "trust-sampling": value})
                is None)


@pytest.mark.parametrize("key,value", [
    ("trust-sampling", "maybe"), ("require-secure-aggregation", "ture"),
    ("max-epsilon", "four")])
def test_a_malformed_policy_key_is_refused_with_one_line_naming_it(key, value):
    """Before, a misspelt require-secure-aggregation read as false: the node trained
    without the secure aggregation it asked for."""
    allowed = "a number (0: no limit)" if key == "max-epsilon" else "true or false"
    line = f"privacy policy: node-config {key}={value!r} is invalid; allowed: {allowed}"
    policy = {"max-epsilon": 4.0, key: value}
    assert client_policy.refusal(_announced(secure=False), policy) == line
    assert client_policy.plain_train_refusal(policy) == line
    assert client_policy.has_policy({key: value})


def test_one_vocabulary_of_yes_and_no_for_node_config_and_announcement():
    for text in client_policy.TRUE + ("True", " YES ", True):
        assert client_policy.flag(text, "k") is True
    for text in client_policy.FALSE + ("False", " No ", False):
        assert client_policy.flag(text, "k") is False
    with pytest.raises(ValueError, match=r"^k='' is invalid; allowed: true or false$"):
        client_policy.flag("", "k")


def test_a_malformed_announced_flag_is_refused():
    announced = {**_announced(secure=True), "dp-secure-aggregation": "sort of"}
    assert client_policy.refusal(announced, {"require-secure-aggregation": True}) == (
        "privacy policy: the server announced dp-secure-aggregation='sort of' is invalid; "
        "allowed: true or false")
