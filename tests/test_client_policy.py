"""A SuperNode's privacy policy recomputes the announced epsilon with our accountant."""

from __future__ import annotations

import pytest

from dpfl_app import client_policy
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
