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
    sent = strategy.configure_train(1, records(before), ConfigRecord(), FakeGrid(10))
    clip = strategy._round_clip
    # the four sampled clients send a zero update: only canaries move the model
    arrays, _ = strategy.aggregate_train(1, [
        clipped_reply(msg.metadata.dst_node_id, before, {"w": np.zeros(DIM)}, clip)
        for msg in sent])
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


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_canaries_are_drawn_by_the_real_clients_sampler(sampling):
    """Same generator state, same population and rate: the same indices. The old
    canary draw spent an extra coin on fixed-size rounds: a different code path."""
    from dpfl_app.privacy import audit
    from dpfl_app.strategy.sampling import SlotSampler

    real = SlotSampler(50, 7, sampling)
    for seed in range(20):
        slots = real.sample_slots(np.random.default_rng(seed))
        canaries = audit.sample_canaries(np.random.default_rng(seed), 50, 7 / 50, sampling)
        assert slots == canaries.tolist()


def test_a_withheld_secure_sum_withholds_the_canaries_too():
    """Secure aggregation never sums a cohort of one: that round releases noise only,
    and the canaries, which join the secure sum, must not appear in it either."""
    from flwr.serverapp.strategy import FedAvg

    from dpfl_app.strategy.secure_aggregation import SecureDPFedAvgAdaptive

    split = mechanism.split_noise(0.0, 1)
    ledger_model = AccountingModel("fixed", 0.0, 10, 1, 1e-5)
    from dpfl_app.privacy.accounting import PrivacyLedger

    strategy = SecureDPFedAvgAdaptive(
        FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1,
               fraction_evaluate=0.0),
        split, 1, PrivacyLedger(ledger_model), np.random.default_rng(0),
        sampling_rng=np.random.default_rng(1), sampling="fixed",
        canaries=CanaryAudit(10, seed=3, sampling="fixed", rate=1.0))  # all join each round
    zero = {"w": np.zeros(DIM, dtype=np.float32)}
    sent = strategy.configure_train(1, records(zero), ConfigRecord(), FakeGrid(10))
    assert sent == []  # a cohort of one: no protocol, no sum
    arrays, _ = strategy.aggregate_train(1, [])
    assert not np.any(arrays["w"].numpy())  # no noise (z = 0) and no canary


def test_the_audit_reads_the_released_count_too():
    """The count channel: each canary's coins against the released centred count.

    Canaries only, rate 0.5, 60 rounds, no count noise (the fault "the count is
    not noised"). An inserted canary adds 1/2 to its signed sum each round it is
    sampled: about 60 * 0.5 / 2 = 15 on average; an unseen one adds nothing. The
    other canaries' coins make each sum's std about sqrt(60 * 100 * 0.5) / 2 = 27,
    so the means of 200 statistics each are within 3 * 27 / sqrt(200) = 5.7 of 15 and 0.
    """
    k, rate, rounds = 200, 0.5, 60
    canaries = CanaryAudit(k, seed=11, sampling="poisson", rate=rate)
    rng = np.random.default_rng(0)
    zero = [np.zeros(50)]
    for _ in range(rounds):
        models, bits = canaries.join([], [], zero, 1.0, rng)
        centred = sum(b - 0.5 for b in bits)
        canaries.observe(zero, zero, centred)
    block = canaries.summary(1e-5, 1.0, 10_000)["count_channel"]
    assert block["inserted_fit"]["mean"] == pytest.approx(15, abs=5.7)
    assert block["unseen_fit"]["mean"] == pytest.approx(0, abs=5.7)
    assert block["epsilon"] > 0 and "count" in block["statistic"]
