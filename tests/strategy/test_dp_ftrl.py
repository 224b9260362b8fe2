"""DP-FTRL through the real ServerApp and ClientApp (in process): participation, refusals,
the accounting block, and the study engine.

The min-separation is checked from the operator diagnostics (who was asked in
which round); epsilon is recomputed from results.json alone with dp_accounting
and a brute-force sensitivity; a server that breaks the rule meets refusals.
"""

from __future__ import annotations

import json
import math
import re

import dp_accounting
import numpy as np
import pytest

from dpfl_app.run.outputs import read_diagnostics
from dpfl_app.strategy.dp_ftrl import MinSeparationCohorts
from dpfl_app.tools.study.engine import run_study
from tests.inprocess import default_run_config, run_server
from tests.privacy.test_matrix_factorization import (allowed_patterns, balle_wang_epsilon,
                                                      brute_force_sensitivity)
from dpfl_app.privacy.matrix_factorization import toeplitz

FTRL = {"mechanism": "dp-ftrl", "min-separation": 2, "rounds": 5, "clients": 3,
        "local-epochs": 1, "deterministic-noise": False}
NODES = 7


def _run(tmp_path, num_nodes=NODES, **overrides):
    cfg = default_run_config(**{**FTRL, "output-dir": str(tmp_path), **overrides})
    grid = run_server(cfg, num_nodes=num_nodes)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    return grid, run_dir, json.loads((run_dir / "results.json").read_text())


def asked_rounds(diagnostics) -> dict[int, list[int]]:
    rounds: dict[int, list[int]] = {}
    for diag in diagnostics:
        for node in diag["cohort"]:
            rounds.setdefault(node, []).append(diag["round"])
    return rounds


def test_cohorts_respect_min_separation_whoever_is_online():
    rng = np.random.default_rng(3)
    cohorts = MinSeparationCohorts(clients_per_round=4, min_separation=3)
    last: dict[int, int] = {}
    for t in range(1, 200):
        online = [n for n in range(15) if rng.random() < 0.7]
        allowed = [n for n in online if t - last.get(n, -10) >= 3]
        chosen, eligible = cohorts.sample(online, rng)
        assert eligible == len(allowed) and chosen <= set(allowed)
        assert len(chosen) == min(4, len(allowed))
        last.update({n: t for n in chosen})


def test_server_never_asks_within_b_rounds_and_epsilon_recomputes_from_results(tmp_path):
    grid, run_dir, results = _run(tmp_path, **{"target-epsilon": 6.0})
    diagnostics = read_diagnostics(run_dir)
    assert [d["round"] for d in diagnostics] == [1, 2, 3, 4, 5]
    for node, rounds in asked_rounds(diagnostics).items():
        assert all(b - a >= FTRL["min-separation"] for a, b in zip(rounds, rounds[1:])), node
    # the diagnostics are what was sent: every train message went to the listed cohort
    sent = [m for m in grid.sent if m.metadata.message_type.startswith("train")]
    assert sorted(m.metadata.dst_node_id for m in sent) == sorted(
        n for d in diagnostics for n in d["cohort"])
    assert all(d["num_rejected"] == 0 for d in diagnostics)  # honest server: nobody refuses

    # epsilon from results.json alone: brute-force sensitivity of its coefficients,
    # its noise split, dp_accounting's PLD on the one Gaussian event
    acc = results["accounting"]
    rounds, b = acc["rounds"], acc["min_separation"]
    sens = brute_force_sensitivity(toeplitz(np.array(acc["coefficients"]), rounds), b)
    k = max(len(p) for p in allowed_patterns(rounds, b))
    mu = math.sqrt((sens / acc["update_noise_multiplier"]) ** 2 + k / (4 * acc["count_stddev"] ** 2))
    assert acc["event"]["noise_multiplier"] == pytest.approx(1 / mu, rel=1e-12)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    expected = pld.compose(dp_accounting.GaussianDpEvent(1 / mu)).get_epsilon(acc["delta"])
    assert results["final"]["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert results["final"]["epsilon"] == pytest.approx(balle_wang_epsilon(mu, acc["delta"]),
                                                        rel=1e-8)
    assert expected <= 6.0  # the calibration met its target
    report = (run_dir / "privacy.md").read_text()
    assert f"ε={expected:.4g}" in report
    assert "no assumption about how the server chose" in report


def test_clients_refuse_a_server_that_asks_too_soon(tmp_path, monkeypatch):
    """A server that ignores min-separation (every node every round): the clients refuse,
    and their refusals reach the operator diagnostics as rejected replies."""
    monkeypatch.setattr(MinSeparationCohorts, "eligible", lambda self, online: sorted(online))
    _, run_dir, _ = _run(tmp_path, num_nodes=3, rounds=3, **{"noise": 1.0})
    first, second, third = read_diagnostics(run_dir)
    assert first["num_rejected"] == 0  # round 1: first participation for all
    assert second["num_rejected"] == 3 and second["num_replies"] == 0
    assert all(re.search(r"took part in round 1; min-separation 2 allows round 3 at the "
                         r"earliest", r["reason"]) for r in second["rejected"])
    assert third["num_rejected"] == 0  # a refused round is no participation: round 3 is fine


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_engine_matches_the_flower_path_under_dp_ftrl(tmp_path, optimizer):
    """Same seeds, same cohorts, same correlated noise; with server momentum both take the
    strategy's momentum step and factor the momentum workload."""
    config = default_run_config(**{**FTRL, "deterministic-noise": True, "noise": 1.0,
                                   "output-dir": str(tmp_path), "rounds": 4,
                                   "server-optimizer": optimizer})
    run_server(config, num_nodes=NODES)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    flower = json.loads((run_dir / "results.json").read_text())
    study = run_study(config, NODES)
    assert flower["accounting"]["momentum"] == (0.9 if optimizer == "momentum" else 0.0)
    for ours, theirs, diag, flower_diag in zip(study["rounds"], flower["rounds"],
                                               study["diagnostics"], read_diagnostics(run_dir)):
        assert diag["num_sampled"] == flower_diag["num_sampled"]
        assert ours["clip_norm"] == pytest.approx(theirs["clip_norm"], rel=1e-4)
        assert ours["epsilon"] == theirs["epsilon_if_noise_secret"]
        assert abs(ours["test_accuracy"] - theirs["test_accuracy"]) * 360 <= 1 + 1e-9


def test_momentum_workload_is_what_the_servers_momentum_optimizer_does():
    """The factorization of server-optimizer=momentum is for the server's real trajectory:
    the model's response to one unit update is the workload's first column."""
    from dpfl_app.privacy.matrix_factorization import workload_coefficients
    from dpfl_app.strategy.dp_ftrl import workload_momentum
    from dpfl_app.strategy.server_optimizer import ServerOptimizer

    cfg = default_run_config(**{"server-optimizer": "momentum", "server-momentum": 0.9})
    beta = workload_momentum(cfg)
    optimizer = ServerOptimizer("momentum", [np.zeros(1, np.float32)], lr=1.0, momentum=beta)
    model, trajectory = [np.zeros(1, np.float32)], []
    for t in range(12):
        model = optimizer.step(model, [np.full(1, 1.0 if t == 0 else 0.0, np.float32)])
        trajectory.append(float(model[0][0]))
    assert trajectory == pytest.approx(workload_coefficients(12, beta), rel=1e-6)
    assert workload_momentum(default_run_config(**{"server-optimizer": "adam"})) == 0.0


@pytest.mark.parametrize("bands", [0, 1, 2])
def test_ftrl_bands_sets_the_factorization_its_noise_and_its_announcement(bands):
    """`ftrl-bands=1` is fresh noise every round under the same min-separation (DP-FedAvg
    without amplification, k = ceil(T/b) participations); 0 lets the error choose (2 here)."""
    from dpfl_app.config import validate
    from dpfl_app.privacy import ftrl_accounting as fa
    from dpfl_app.strategy.build import build_strategy, choose_noise

    cfg = validate(default_run_config(**{**FTRL, "rounds": 10, "target-epsilon": 4.0,
                                         "ftrl-bands": bands}))
    noise = choose_noise(cfg, NODES)
    strategy = build_strategy(cfg, NODES, noise)
    model = strategy.ledger.model
    assert model.bands == (bands or 2) == strategy.announcement["dp-bands"]
    sens = math.sqrt(5) if model.bands == 1 else brute_force_sensitivity(
        toeplitz(np.array(model.coefficients), 10), 2)
    assert model.sensitivity() == pytest.approx(sens, rel=1e-12)
    assert noise == pytest.approx(fa.calibrate_noise(4.0, cfg["target-delta"], sens), rel=1e-9)
    strategy.ledger.compose_round(10)  # a client's own recompute from the announcement agrees
    assert fa.announced_epsilon(strategy.announcement) == pytest.approx(
        strategy.ledger.epsilon_if_secret(), rel=1e-9)
