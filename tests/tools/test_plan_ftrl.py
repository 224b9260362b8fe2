"""`dpfl plan --mechanism dp-ftrl`: the calibrated z meets the target, no population needed."""

from __future__ import annotations

import json

import pytest

from dpfl_app.privacy import ftrl_accounting as fa
from dpfl_app.tools import plan


def test_plan_calibrates_dp_ftrl_without_a_population(capsys):
    assert plan.main(["--mechanism", "dp-ftrl", "--rounds", "40", "--min-separation", "4",
                      "--delta", "1e-5", "--target-epsilon", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["participations"] == 10 and res["bands"] == 4
    model, _ = fa.build_model(res["noise_multiplier"], 40, 4, 1, 1e-5)
    eps = fa.gaussian_epsilon(model.event_noise_multiplier(), 1e-5)
    assert eps == pytest.approx(res["epsilon"]) and eps <= 4.0
    # the honest DP-FedAvg alternative at the same z composes all 40 rounds
    assert res["dp_fedavg_no_amplification_epsilon"] > 1.5 * res["epsilon"]


def test_plan_still_needs_a_population_for_dp_fedavg(capsys):
    with pytest.raises(SystemExit):
        plan.main(["--rounds", "40", "--delta", "1e-5", "--noise", "3", "--clients", "5"])
    assert "--population is required for --mechanism dp-fedavg" in capsys.readouterr().err
