"""The real ServerApp and ClientApp in one process with `secure-aggregation=true`.

The in-process grid delivers every stage message to the real ClientApp, keeps
each node's `context.state` between messages, and can drop nodes at a stage.
"""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest
import torch

from dpfl_app.run.outputs import read_diagnostics

from dpfl_app.secagg import quantize
from tests.inprocess import default_run_config, run_server


def _config(tmp_path, name, **overrides):
    base = {"output-dir": str(tmp_path / name), "rounds": 1, "sampling": "fixed",
            "clients": 6, "deterministic-noise": True}
    return default_run_config(**{**base, **overrides})


def _outputs(tmp_path, name):
    (run_dir,) = list((tmp_path / name).iterdir())
    model = torch.load(run_dir / "final_model.pt", weights_only=True)
    return json.loads((run_dir / "results.json").read_text()), model


def _diagnostics(tmp_path, name) -> list[dict]:
    """Exact per-round counts: only in the operator's diagnostics file."""
    (run_dir,) = list((tmp_path / name).iterdir())
    return read_diagnostics(run_dir)


def _replies(tmp_path, name) -> list[int]:
    """Accepted replies per round: exact counts, from the operator-only diagnostics."""
    return [d["num_replies"] for d in _diagnostics(tmp_path, name)]


def _protocol_lines(caplog) -> list[str]:
    """Log lines the server's secure-aggregation code wrote: there must be none,
    since every one of them would carry a participation count or a node id."""
    server_side = (os.path.join("strategy", "secure_aggregation.py"),
                   os.path.join("dpfl_app", "secagg", ""))
    return [r.getMessage() for r in caplog.records
            if any(part in r.pathname for part in server_side)]


def _flat(model) -> np.ndarray:
    return np.concatenate([v.double().numpy().ravel() for v in model.values()])


def test_secure_and_plain_rounds_end_at_the_same_model_within_the_bound(tmp_path):
    """Noise 0, same seed: one round with and one without secure aggregation."""
    run_server(_config(tmp_path, "plain", noise=0.0))
    grid = run_server(_config(tmp_path, "secure", noise=0.0, **{"secure-aggregation": True}))
    # The stages build their messages with the Message constructor: the in-process grid
    # has no `create_message` (flwr 1.42 deprecates it and warns in every secure run).
    assert not hasattr(grid, "create_message")
    plain_results, plain = _outputs(tmp_path, "plain")
    secure_results, secure = _outputs(tmp_path, "secure")
    assert {m.metadata.message_type for m in grid.sent} == {
        "query.secagg_enrol", "query.secagg_share_keys", "train.secagg",
        "query.secagg_consistency", "query.secagg_unmask"}
    (p_rec,), (s_rec,) = plain_results["rounds"], secure_results["rounds"]
    assert _replies(tmp_path, "secure") == _replies(tmp_path, "plain") == [6]
    assert s_rec["next_clip_norm"] == p_rec["next_clip_norm"]  # sum of bits: exact
    a, b = _flat(plain), _flat(secure)
    m, lr, clip = 6, plain_results["config"]["server-lr"], p_rec["clip_norm"]
    # The sum's quantization bound, scaled by server-lr / m, plus float32 storage rounding.
    bound = lr / m * quantize.sum_error_bound(6, a.size, clip) + math.sqrt(a.size) * float(
        np.abs(a).max()) * 2.0**-23
    assert 0 < np.linalg.norm(a - b) <= bound or np.array_equal(a, b)
    assert np.linalg.norm(a - b) < 1e-3 * np.linalg.norm(a)
    # Where a secure round's time goes: each exchange's wall time, for the operator only.
    (diag,) = _diagnostics(tmp_path, "secure")
    stages = diag["secure_aggregation"]["stage_seconds"]
    assert set(stages) == {"secagg_enrol", "secagg_share_keys", "train.secagg",
                           "secagg_consistency", "secagg_unmask"}
    assert all(0 < seconds < diag["seconds"] for seconds in stages.values())


def test_after_the_enrolment_a_secure_round_is_four_exchanges(tmp_path):
    """Round 1 enrols every online node (keys for all T = 3 rounds); rounds 2 and 3 are
    share keys, train, consistency and unmask only, and still release the sum."""
    grid = run_server(_config(tmp_path, "out", rounds=3, clients=6,
                              **{"secure-aggregation": True}))
    by_round: dict[str, set[str]] = {}
    for msg in grid.sent:
        by_round.setdefault(msg.metadata.group_id, set()).add(msg.metadata.message_type)
    steady = {"query.secagg_share_keys", "train.secagg", "query.secagg_consistency",
              "query.secagg_unmask"}
    assert by_round["1"] == steady | {"query.secagg_enrol"}
    assert by_round["2"] == by_round["3"] == steady
    enrolled = [m for m in grid.sent if m.metadata.message_type == "query.secagg_enrol"]
    assert sorted(m.metadata.dst_node_id for m in enrolled) == sorted(grid.get_node_ids())
    diags = _diagnostics(tmp_path, "out")
    assert [d["secure_aggregation"]["sum_released"] for d in diags] == [True] * 3
    assert [("secagg_enrol" in d["secure_aggregation"]["stage_seconds"]) for d in diags] == [
        True, False, False]


@pytest.mark.parametrize("stage", ["query.secagg_share_keys", "train.secagg",
                                   "query.secagg_consistency", "query.secagg_unmask"])
def test_a_dropout_at_any_stage_leaves_the_survivors_sum(tmp_path, stage, caplog):
    """All 10 nodes sampled (k = 9, t = 5); nodes 1 and 2 vanish at `stage`."""
    caplog.set_level(logging.INFO)
    run_server(_config(tmp_path, "out", clients=10, **{"secure-aggregation": True}),
               drop_at={stage: {1, 2}})
    results, _ = _outputs(tmp_path, "out")
    (rec,) = results["rounds"]
    # Before sending its input a dropout leaves the sum; after it, its input stays.
    after_input = stage in ("query.secagg_consistency", "query.secagg_unmask")
    assert _replies(tmp_path, "out") == [10 if after_input else 8]
    (diag,) = _diagnostics(tmp_path, "out")
    protocol = diag["secure_aggregation"]
    assert protocol["sum_released"] and protocol["cohort"] == 10 and protocol["threshold"] == 5
    assert protocol["masked_inputs"] == (10 if after_input else 8)
    assert protocol["dropouts"] == diag["num_rejected"] == 2
    assert _protocol_lines(caplog) == []  # counts and node ids stay operator-only
    # A withheld sum is a release: the round is charged with the largest (m = 10 clients).
    assert results["accounting"]["withheld_inputs"] == 10
    assert results["accounting"]["round_event"]["event"]["noise_multiplier"] == pytest.approx(
        results["config"]["noise"] / 10)
    assert "epsilon_if_no_dropout" in results["final"]


def test_fewer_survivors_than_threshold_release_noise_only(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_server(_config(tmp_path, "out", noise=1.0, **{"secure-aggregation": True}),
               drop_at={"train.secagg": set(range(1, 10))})
    results, _ = _outputs(tmp_path, "out")
    (rec,) = results["rounds"]
    (run_dir,) = list((tmp_path / "out").iterdir())
    (diag,) = read_diagnostics(run_dir)  # exact counts: operator-only
    assert diag["num_replies"] == 0
    assert rec["noisy_unclipped_fraction"] is not None  # the round was released (noise only)
    protocol = diag["secure_aggregation"]
    assert protocol["sum_released"] is False
    assert protocol["masked_inputs"] < protocol["min_survivors"]
    # Whether the sum was withheld depends on the survivors: not in the log either.
    assert _protocol_lines(caplog) == []


def test_a_client_whose_max_epsilon_is_too_low_refuses_and_the_run_continues(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    strict = {node: {"max-epsilon": 1.0} for node in (1, 2)}  # the run's epsilon is ~35
    run_server(_config(tmp_path, "out", rounds=2, clients=10, **{"secure-aggregation": True}),
               node_config=strict)
    results, _ = _outputs(tmp_path, "out")
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert _replies(tmp_path, "out") == [8, 8]  # refusals are dropouts
    for diag in _diagnostics(tmp_path, "out"):  # the reasons: operator diagnostics
        reasons = [r["reason"] for r in diag["rejected"]]
        assert len(reasons) == 2 and all("max-epsilon=1.0" in r for r in reasons), reasons
    assert _protocol_lines(caplog) == []


def test_require_secure_aggregation_refuses_a_plain_server(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_server(_config(tmp_path, "out"),
               node_config={n: {"require-secure-aggregation": True} for n in range(1, 11)})
    results, _ = _outputs(tmp_path, "out")
    assert _replies(tmp_path, "out")[0] == 0
    (diag,) = _diagnostics(tmp_path, "out")  # the reasons reach the operator ...
    assert diag["rejected"] and all("require-secure-aggregation=true" in r["reason"]
                                    for r in diag["rejected"])
    # ... and the nodes' shared log only says that a node refused, without counts.
    assert not any("require-secure-aggregation=true" in r.getMessage() for r in caplog.records)
    assert any("refused a train message" in r.getMessage() for r in caplog.records)


def test_a_node_that_lost_its_keys_refuses_a_round_and_is_enrolled_again(tmp_path, monkeypatch):
    """Node 1's state (its per-run secret) is wiped before round 2: it refuses round 2's
    share keys (no committed keys), the round goes on without it, and round 3 enrols it
    again (one enrolment message, to node 1 alone) and sums all 6."""
    from dpfl_app.tools.inprocess import InProcessGrid
    from flwr.app import RecordDict

    original = InProcessGrid.send_and_receive

    def wipe_before_round_2(grid, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "query.secagg_share_keys" \
                and messages[0].metadata.group_id == "2":
            grid.states[1] = RecordDict()
        return original(grid, messages, timeout=timeout)

    monkeypatch.setattr(InProcessGrid, "send_and_receive", wipe_before_round_2)
    grid = run_server(_config(tmp_path, "out", rounds=3, clients=6,
                              **{"secure-aggregation": True}), num_nodes=6)
    enrolments = [(m.metadata.group_id, m.metadata.dst_node_id) for m in grid.sent
                  if m.metadata.message_type == "query.secagg_enrol"]
    assert enrolments == [("1", n) for n in range(1, 7)] + [("3", 1)]
    diags = _diagnostics(tmp_path, "out")
    assert [d["secure_aggregation"]["masked_inputs"] for d in diags] == [6, 5, 6]
    (reason,) = [r["reason"] for r in diags[1]["rejected"]]
    assert "secagg_share_keys" in reason and "committed no keys" in reason
