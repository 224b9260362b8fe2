"""A SuperNode's privacy policy recomputes the announced epsilon with our accountant."""

from __future__ import annotations

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
    from dpfl_app.server_app import build_strategy
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
