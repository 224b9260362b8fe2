"""The audit's hook in the strategy: canaries join the clipped sum and the count before the noise."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from dpfl_app.privacy import mechanism
from dpfl_app.privacy.accounting import AccountingModel, epsilon_after
from dpfl_app.privacy.report import privacy_report
from dpfl_app.strategy.canaries import CanaryAudit
from tests.fakes import FakeGrid, clipped_reply, make_strategy, records

DIM = 2000


def train(strategy, rounds: int, seed: int = 0) -> dict:
    """Run `rounds` rounds on a FakeGrid of 10 nodes; sampled nodes send random updates."""
    rng = np.random.default_rng(seed)
    weights = {"w": np.zeros(DIM, dtype=np.float32)}
    for server_round in range(1, rounds + 1):
        messages = strategy.configure_train(server_round, records(weights), ConfigRecord(),
                                            FakeGrid(10))
        clip = strategy._round_clip
        replies = [clipped_reply(msg.metadata.dst_node_id, weights,
                                 {"w": rng.normal(0, 0.01, DIM).astype(np.float32)}, clip)
                   for msg in messages]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        weights = {k: v.numpy() for k, v in arrays.items()}
    return weights


def test_sampled_canaries_are_summed_before_the_noise_and_leave_the_count_alone():
    canaries = CanaryAudit(20, seed=5, sampling="fixed", rate=0.4)
    strategy = make_strategy(noise=0.0, m=4, population=10, sampling="fixed", canaries=canaries)
    before = {"w": np.zeros(DIM, dtype=np.float32)}
    list(strategy.configure_train(1, records(before), ConfigRecord(), FakeGrid(10)))
    clip = strategy._round_clip
    # four real clients whose update is zero: only canaries move the model
    arrays, _ = strategy.aggregate_train(1, [clipped_reply(i, before, {"w": np.zeros(DIM)}, clip)
                                            for i in range(1, 5)])
    delta = arrays["w"].numpy().astype(np.float64)
    dirs = canaries.directions([before["w"]])
    cosines = dirs.cosines(delta)
    joined = np.argsort(cosines)[-8:]  # fixed draw: exactly 20 * 0.4 = 8 canaries
    assert set(joined) <= set(range(20))  # only the first k directions are ever inserted
    expected = clip * dirs.rows(sorted(joined)).sum(axis=0) / 4  # server-lr 1, denominator m
    assert np.allclose(delta, expected, atol=1e-7)
    assert np.allclose(canaries.max_cosines, cosines)
    # 4 real bits of 1 and 8 canaries split 4/4: b_bar = (4 * 1/2 + 0) / 4 + 1/2
    assert strategy.records[-1]["noisy_unclipped_fraction"] == pytest.approx(1.0)
    assert canaries.joined == 8 and canaries.rounds == 1


def _audited_run(claimed_noise: float, monkeypatch=None) -> tuple[dict, object]:
    canaries = CanaryAudit(300, seed=11, sampling="poisson", rate=0.6)
    strategy = make_strategy(noise=claimed_noise, m=6, population=10, sampling="poisson",
                             seed=3, canaries=canaries)
    train(strategy, rounds=5)
    accounted = strategy.ledger.epsilon()
    assert accounted == pytest.approx(
        epsilon_after(AccountingModel("poisson", claimed_noise, 10, 6, 1e-5), 5, "pld"))
    return canaries.summary(1e-5, accounted, population=10), strategy


def test_an_honest_run_stays_below_and_says_so():
    summary, strategy = _audited_run(2.0)
    assert summary["verdict"] == "below" and 0 < summary["epsilon"] < summary["accounted_epsilon"]
    report = privacy_report(strategy.ledger, 5, audit=summary)
    assert "below the accounted ε" in report and "ALERT" not in report


def test_a_mechanism_adding_a_tenth_of_the_noise_it_claims_is_flagged(monkeypatch):
    """The test double: the strategy claims z = 2 but its noise is a tenth of that."""
    honest = mechanism.update_noise_stddev
    monkeypatch.setattr(mechanism, "update_noise_stddev",
                        lambda split, clip: honest(split, clip) / 10)
    summary, strategy = _audited_run(2.0)
    assert summary["epsilon"] > 2 * summary["accounted_epsilon"]
    assert summary["verdict"] == "above"
    report = privacy_report(strategy.ledger, 5, audit=summary)
    assert "EXCEEDS the accounted ε" in report and "Something is wrong" in report
