"""Simulating a large deployment: the big cohort's noise on the mean, its accounting,
and a report that says first that the run is a simulation and not itself private."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpfl_app.config import validate
from dpfl_app.errors import ConfigError
from dpfl_app.privacy import mechanism
from dpfl_app.run.outputs import read_diagnostics
from dpfl_app.privacy.accounting import AccountingModel, epsilon_after
from dpfl_app.strategy.large_deployment import deployment
from tests.inprocess import default_run_config, run_server

SIMULATED = {"simulate-population": 100_000, "simulate-clients": 1_000}


def test_the_noise_on_the_mean_is_the_big_cohorts():
    """std of the noise on the mean = z_delta * C / m_big, measured over many draws."""
    m, big_m, clip = 6, 1000, 0.5
    split = mechanism.split_noise(1.0, big_m)
    zero = [np.zeros(20_000, dtype=np.float32)]
    new, _, _ = mechanism.dp_fedavg_step(
        zero, [], [], clip, m, split, np.random.default_rng(0), server_lr=1.0,
        target_quantile=0.5, clip_lr=0.2, noise_scale=m / big_m)
    expected = split.update_noise_multiplier * clip / big_m
    # 20,000 draws: the sample std is within 2% of the true one (about 4 sigma)
    assert np.std(new[0]) == pytest.approx(expected, rel=0.02)
    assert np.std(new[0]) < split.update_noise_multiplier * clip / m / 100


def test_deployment_from_the_keys():
    cfg = validate(default_run_config(**SIMULATED))
    big = deployment(cfg, 10)
    assert (big.population, big.clients_per_round) == (100_000, 1_000)
    assert big.noise_scale == pytest.approx(10 / 1000) and big.simulated  # m = 10
    own = deployment(validate(default_run_config()), 10)
    assert (own.population, own.clients_per_round, own.noise_scale) == (10, 10, 1.0)
    assert not own.simulated
    with pytest.raises(ConfigError, match="'simulate-population' = 100000 is smaller"):
        deployment(cfg, 200_000)


@pytest.mark.parametrize("keys,message", [
    ({"simulate-population": 1000}, "set both"),
    ({"simulate-population": 1000, "simulate-clients": 3}, "between clients=10"),
    ({"simulate-population": 1000, "simulate-clients": 2000}, "between clients=10"),
])
def test_inconsistent_simulation_keys_are_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        validate(default_run_config(**keys))


def test_a_simulated_run_accounts_for_the_deployment_and_says_it_is_not_private(
        tmp_path, caplog):
    cfg = default_run_config(**{"output-dir": str(tmp_path), "rounds": 2, "noise": 1.0,
                                "deterministic-noise": True, **SIMULATED})
    run_server(cfg)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    results = json.loads((run_dir / "results.json").read_text())
    acc = results["accounting"]
    assert (acc["population"], acc["clients_per_round"]) == (100_000, 1_000)
    model = AccountingModel("poisson", 1.0, 100_000, 1_000, 1e-5)
    # deterministic-noise: the guarantee is inf; the secret-noise figure is the accounted one
    assert results["final"]["epsilon"] == "inf"
    assert results["final"]["epsilon_if_noise_secret"] == pytest.approx(
        epsilon_after(model, 2, "pld"), rel=1e-9)
    split = mechanism.split_noise(1.0, 1_000)
    for rec in results["rounds"]:
        assert rec["noise_std"] == pytest.approx(
            split.update_noise_multiplier * rec["clip_norm"] / 1_000)
    for diag in read_diagnostics(run_dir):  # exact counts: operator-only
        assert diag["num_sampled"] <= 10  # the real cohort, drawn from the 10 real nodes
    report = (run_dir / "privacy.md").read_text()
    first = report.splitlines()[0]
    assert "SIMULATION" in first and "not itself private" in first
    assert "N = 100000 users with cohorts of m = 1000" in first
    assert "N = 100000" in report and "m = 1000" in report  # the guarantee's model
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert logged.count("SIMULATION, not itself private") >= 2  # at the start and the end


def test_clients_are_told_the_real_runs_epsilon_not_the_simulated_one():
    """A real cohort of 5 of 10 simulating 1,000 of 100,000 (z = 1, 100 rounds): each
    real client gets noise multiplier z * 5/1000. The old announcement said 0.72."""
    from dpfl_app.client import policy as client_policy
    from dpfl_app.strategy.build import build_strategy

    cfg = validate(default_run_config(**{"clients": 5, "noise": 1.0, "rounds": 100,
                                         **SIMULATED}))
    announced = build_strategy(cfg, 10, 1.0).announcement
    assert (announced["dp-population"], announced["dp-clients"]) == (10, 5)
    assert announced["dp-noise"] == pytest.approx(1.0 * 5 / 1000)
    real = client_policy.announced_epsilon(announced)
    assert real == pytest.approx(epsilon_after(
        AccountingModel("poisson", 0.005, 10, 5, 1e-5), 100, "pld"), rel=1e-9)
    assert real > 1e5  # about 2e6; the simulated deployment's is below 1
    assert client_policy.refusal(announced, {"max-epsilon": 10.0}) is not None


def test_every_simulated_epsilon_is_labelled_as_simulated(tmp_path, caplog):
    caplog.set_level("INFO")
    cfg = default_run_config(**{"output-dir": str(tmp_path), "rounds": 1, "noise": 1.0,
                                **SIMULATED})
    run_server(cfg)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    results = json.loads((run_dir / "results.json").read_text())
    final = results["final"]
    assert final["epsilon_is"].startswith("SIMULATED")
    assert results["accounting"]["epsilon_is"].startswith("SIMULATED")
    assert final["epsilon_this_run"] == pytest.approx(epsilon_after(
        AccountingModel("poisson", 1.0 * 10 / 1000, 10, 10, 1e-5), 1, "pld"), rel=1e-9)
    lines = [r.getMessage() for r in caplog.records]
    (round_line,) = [line for line in lines if line.startswith("round 1/1")]
    assert "SIMULATED deployment's epsilon so far" in round_line
    assert "SIMULATED deployment's epsilon" in lines[-1] and "this run's own" in lines[-1]
