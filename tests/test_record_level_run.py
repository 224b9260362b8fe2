"""A record-level run through the real ServerApp and ClientApp (in one process): what it reports.

The record-level epsilon printed in results.json is recomputed here with
dp_accounting alone, from results.json alone (its `accounting.record_level`
block), for every round and for the final figure.
"""

from __future__ import annotations

import csv
import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from dpfl_app.run.outputs import read_diagnostics
from tests.inprocess import default_run_config, run_server

CONFIG = {"noise": 0.0, "record-noise": 1.2, "record-sampling-rate": 0.25, "rounds": 2,
          "clients": 3, "local-epochs": 1, "record-delta": 1e-6}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("record") / "out"
    run_server(default_run_config(**CONFIG, **{"output-dir": str(out)}), num_nodes=3,
               node_config={1: {"max-record-epsilon": 0.5}})
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir, json.loads((run_dir / "results.json").read_text())


def _recompute(block: dict, steps: int) -> float:
    """min(PLD, RDP) of `steps` Poisson-sampled Gaussian steps, from the block's fields only."""
    step = block["step_event"]
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        step["sampling_probability"], dp_accounting.GaussianDpEvent(
            step["event"]["noise_multiplier"])), steps)
    rdp = RdpAccountant(block["rdp_orders"]).compose(event).get_epsilon(block["delta"])
    pld = PLDAccountant(value_discretization_interval=block["pld_value_discretization_interval"]
                        ).compose(event).get_epsilon(block["delta"])
    return min(rdp, pld)


def test_printed_record_epsilon_matches_an_independent_dp_accounting_recompute(run):
    _, results = run
    block = results["accounting"]["record_level"]
    assert block["steps_per_round"] == 4 and block["steps"] == 8 and block["clip"] == 1.0
    assert block["delta"] == 1e-6 and block["unit"] == "record"
    assert results["final"]["record_epsilon"] == pytest.approx(_recompute(block, 8), rel=1e-9)
    for rec in results["rounds"]:
        per_round = {**block, "pld_value_discretization_interval": max(
            1e-3, RdpAccountant(block["rdp_orders"]).compose(dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.2)),
                4 * rec["round"])).get_epsilon(1e-6) / 2000)}
        assert rec["record_epsilon"] == pytest.approx(_recompute(per_round, 4 * rec["round"]),
                                                      rel=1e-9)
    assert results["rounds"][0]["record_epsilon"] < results["rounds"][1]["record_epsilon"]
    # no server noise: the user-level figure is infinite, and says so
    assert math.isinf(float(results["final"]["epsilon"]))


def test_rounds_csv_and_privacy_md_carry_the_record_level_epsilon_with_its_unit(run):
    run_dir, results = run
    with open(run_dir / "rounds.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["record_epsilon"]) for r in rows] == pytest.approx(
        [r["record_epsilon"] for r in results["rounds"]])
    report = (run_dir / "privacy.md").read_text()
    eps = results["final"]["record_epsilon"]
    assert f"**Record-level guarantee:** (ε={eps:.4g}, δ=1e-06)-DP for any single record" in report
    assert "the server and the other sites included" in report
    assert "no user-level guarantee" in report and "Which unit to choose" in report
    assert "should NOT be considered private" not in report  # the record-level guarantee holds
    # record-level DP alone: no user-level clip, no clipped count, no user-level claim
    assert "no user-level ε is claimed" in report
    assert results["accounting"]["user_level_clip"] is False
    assert results["final"]["user_level_epsilon_claimed"] is False
    assert all(r["clip_norm"] is None and r["noisy_unclipped_fraction"] is None
               for r in results["rounds"])


def test_a_site_with_a_budget_below_the_plan_is_refused_in_every_round(run):
    run_dir, _ = run
    diagnostics = read_diagnostics(run_dir)
    assert len(diagnostics) == 2
    for rnd in diagnostics:
        reasons = json.dumps(rnd["rejected"])
        assert "record-level budget: the plan" in reasons, rnd


def test_the_issues_command_is_the_epsilon_4_recipe():
    """`--run-config "target-record-epsilon=4 noise=0"` on the defaults runs the recipe."""
    import tomllib

    from dpfl_app.config import validate
    from tests.flwr_harness import PROJECT

    recipe = tomllib.loads((PROJECT / "recipes" / "digits-record-eps4.toml").read_text())
    command = {"target-record-epsilon": 4, "noise": 0}
    assert validate(default_run_config(**recipe)) == validate(default_run_config(**command))
