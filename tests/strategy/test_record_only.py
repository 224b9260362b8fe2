"""Record-level DP alone (noise=0, target-epsilon=0): no user-level clip, no clipped count.

The clients, the strategy and the study engine ask one predicate,
`config.user_level_clip_on`; secure aggregation keeps the clip (its quantization range).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from dpfl_app.config import user_level_clip_on, validate
from dpfl_app.strategy.build import build_strategy
from tests.fakes import FakeGrid, make_strategy, records, reply, run_round
from tests.inprocess import default_run_config

RECORD_ONLY = {"noise": 0.0, "target-epsilon": 0.0, "record-noise": 1.0}


def _cfg(**overrides) -> dict:
    return validate(default_run_config(**overrides))


@pytest.mark.parametrize("overrides, clip", [
    (RECORD_ONLY, False),
    ({**RECORD_ONLY, "record-noise": 0.0, "target-record-epsilon": 4.0}, False),
    ({**RECORD_ONLY, "secure-aggregation": True}, True),  # the quantization range
    ({**RECORD_ONLY, "noise": 0.5}, True),  # user-level DP too
    ({**RECORD_ONLY, "record-noise": 0.0, "target-epsilon": 8.0}, True),
    ({}, True),  # the default user-level run
    ({"noise": 0.0}, True),  # nothing private: as before
])
def test_only_record_level_dp_alone_drops_the_user_level_clip(overrides, clip):
    assert user_level_clip_on(_cfg(**overrides)) is clip


def test_the_built_strategy_follows_the_predicate_and_secure_aggregation_keeps_the_clip():
    assert build_strategy(_cfg(**RECORD_ONLY), 10, 0.0).user_level_clip is False
    secure = build_strategy(_cfg(**RECORD_ONLY, **{"secure-aggregation": True}), 10, 0.0)
    assert secure.user_level_clip is True and secure.clipping_norm == pytest.approx(1.3)


def test_a_record_only_round_sends_no_clip_and_averages_unclipped_updates():
    strategy = make_strategy(0.0, m=4, initial_clip=0.1, user_level_clip=False)
    start = {"w": np.zeros(3, dtype=np.float32)}
    sent = list(strategy.configure_train(1, records(start), ConfigRecord(),
                                         FakeGrid(10)))
    assert sent and all("clipping_norm" not in msg.content["config"] for msg in sent)
    strategy = make_strategy(0.0, m=4, initial_clip=0.1, user_level_clip=False)
    deltas = [np.array([10.0, 0, 0]), np.array([0, -20.0, 0]), np.array([0, 0, 30.0]),
              np.array([4.0, 4.0, 4.0])]
    arrays, _ = run_round(strategy, start, lambda clip: [
        reply(i + 1, {"w": d.astype(np.float32)}, metrics={"num-examples": 1})  # no norm bit
        for i, d in enumerate(deltas)])
    np.testing.assert_allclose(arrays["w"].numpy(), sum(deltas) / 4, rtol=1e-6)
    record = strategy.records[-1]
    assert record["clip_norm"] is None and record["next_clip_norm"] is None
    assert record["noisy_unclipped_fraction"] is None and record["noise_std"] == 0.0
    assert strategy.diagnostics[-1]["num_rejected"] == 0
