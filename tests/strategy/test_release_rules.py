"""What the strategy releases, and whom it samples (issue: privacy hardening 1, 3, 7).

Each test failed on the code before the fix: a round without replies was
skipped, fixed sampling drew m of the nodes online, and a node could
contribute two replies or reply without being sampled.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord

from dpfl_app.config import validate
from dpfl_app.errors import ConfigError
from tests.fakes import FakeGrid, clipped_reply, error_reply, make_strategy, records, set_source
from tests.inprocess import default_run_config

SHAPE = (50_000,)


def _delta(index: int, norm: float, shape=SHAPE) -> dict:
    delta = np.zeros(shape, dtype=np.float32)
    delta[index] = norm
    return {"w": delta}


@pytest.mark.parametrize("replies", [[], [error_reply(1)]], ids=["no-reply", "all-rejected"])
def test_a_round_without_accepted_replies_is_still_released(replies):
    """Noise on a zero sum: the model moves by N(0, noise_std^2) per coordinate.

    50,000 coordinates: the sample std has relative SE 1/sqrt(2n) = 0.32%;
    tolerance 1.5% (4.7 SE). A skipped round (the old behaviour) returns None.
    """
    strategy = make_strategy(noise=1.0, m=4)
    g = {"w": np.zeros(SHAPE, dtype=np.float32)}
    list(strategy.configure_train(1, records(g), ConfigRecord(), FakeGrid(10)))
    new, _ = strategy.aggregate_train(1, replies)
    assert new is not None
    moved = new["w"].numpy().astype(np.float64)
    assert np.std(moved) == pytest.approx(strategy.records[-1]["noise_std"], rel=0.015)
    assert strategy.clipping_norm != strategy.records[-1]["clip_norm"]  # b_bar is noised too
    assert strategy.ledger.rounds == 1
    assert "skipped" not in strategy.records[-1]


def test_min_replies_is_gone():
    with pytest.raises(ConfigError, match="unknown run-config key.*'min-replies'"):
        validate(default_run_config(**{"min-replies": 1}))


def _inclusion(sampling: str, rounds: int, online: int = 80) -> np.ndarray:
    """Per-node inclusion frequency through configure_train, N=100, m=10."""
    strategy = make_strategy(noise=1.0, m=10, population=100, sampling=sampling)
    grid, g = FakeGrid(online), records({"w": np.zeros(3, dtype=np.float32)})
    counts = np.zeros(online + 1)
    for rnd in range(1, rounds + 1):
        sent = [m.metadata.dst_node_id for m in strategy.configure_train(rnd, g, ConfigRecord(),
                                                                         grid)]
        assert len(sent) == len(set(sent))  # never two messages to one node
        counts[sent] += 1
    return counts[1:] / rounds


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_no_node_is_sampled_above_m_over_n_when_only_80_of_100_are_online(sampling):
    """Pooled over 80 nodes x 400 rounds, the mean inclusion rate is q = 0.1.

    Its SE is at most sqrt(q(1-q)/32,000) = 0.0017 (Poisson; fixed is smaller);
    tolerance 5 SE = 0.0084. Drawing m of the 80 online nodes gives 0.125.
    """
    freq = _inclusion(sampling, rounds=400)
    se = math.sqrt(0.1 * 0.9 / freq.size / 400)
    assert freq.mean() <= 0.1 + 5 * se
    assert freq.mean() >= 0.1 - 5 * se  # and the sampler still samples at q


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_each_slot_holders_rate_is_m_over_n(sampling):
    """Per node, 20,000 rounds: SE sqrt(0.09/20,000) = 0.0021; the tolerance of
    4.5 SE keeps the chance that any of 80 nodes exceeds it below 80 x 3.4e-6."""
    from dpfl_app.strategy.sampling import SlotSampler  # here: the module is new

    sampler, rng = SlotSampler(100, 10, sampling), np.random.default_rng(5)
    online = list(range(1, 81))
    counts = np.zeros(81)
    for _ in range(20_000):
        chosen, _ = sampler.sample(online, rng)
        counts[list(chosen)] += 1
    freq = counts[1:] / 20_000
    assert freq.max() <= 0.1 + 4.5 * math.sqrt(0.09 / 20_000)


def test_nodes_beyond_the_population_are_never_sampled():
    from dpfl_app.strategy.sampling import SlotSampler

    sampler = SlotSampler(5, 5, "fixed")  # every slot, every round
    chosen, slots = sampler.sample(range(1, 9), np.random.default_rng(0))
    assert slots == 5 and chosen == {1, 2, 3, 4, 5}
    assert sampler.unslotted == {6, 7, 8}
    # A node seen later takes a free slot only; the slot map never changes.
    sampler = SlotSampler(3, 3, "fixed")
    sampler.sample([10], np.random.default_rng(0))
    chosen, _ = sampler.sample([10, 11, 12, 13], np.random.default_rng(0))
    assert sampler.slot_of == {10: 0, 11: 1, 12: 2} and chosen == {10, 11, 12}


def test_one_reply_per_sampled_node_and_none_from_outside_the_cohort():
    strategy = make_strategy(noise=0.0, m=4)
    g = {"w": np.zeros(10, dtype=np.float32)}
    sent = strategy.configure_train(1, records(g), ConfigRecord(), FakeGrid(10))
    cohort = sorted(m.metadata.dst_node_id for m in sent)
    outsider = next(n for n in range(1, 11) if n not in cohort)
    clip = strategy._round_clip
    first, second, third = (_delta(i, 0.05, 10) for i in range(3))
    replies = [set_source(clipped_reply(0, g, first, clip), cohort[0]),
               set_source(clipped_reply(0, g, second, clip), cohort[0]),  # the same node again
               set_source(clipped_reply(0, g, third, clip), outsider)]
    new, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(new["w"].numpy(), first["w"] / 4, atol=1e-7)
    reasons = {(r["node_id"], r["reason"].split(":")[0])
               for r in strategy.diagnostics[-1]["rejected"]}
    assert reasons == {(cohort[0], "duplicate"), (outsider, "node was not in this round's cohort")}
