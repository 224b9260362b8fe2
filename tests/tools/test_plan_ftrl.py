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


@pytest.mark.parametrize("bands", [0, 1, 3])
def test_plan_takes_ftrl_bands_as_the_run_does(capsys, bands):
    """`--ftrl-bands` answers the z a run with `ftrl-bands` calibrates (0: least error, 4 here)."""
    from dpfl_app.config import validate
    from dpfl_app.strategy.build import build_strategy, choose_noise
    from tests.inprocess import default_run_config

    assert plan.main(["--mechanism", "dp-ftrl", "--rounds", "40", "--min-separation", "4",
                      "--delta", "1e-5", "--target-epsilon", "4", "--ftrl-bands", str(bands),
                      "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    cfg = validate(default_run_config(**{"mechanism": "dp-ftrl", "rounds": 40,
                                         "min-separation": 4, "target-epsilon": 4.0,
                                         "target-delta": 1e-5, "ftrl-bands": bands}))
    noise = choose_noise(cfg, 10)
    model = build_strategy(cfg, 10, noise).ledger.model
    assert res["bands"] == model.bands == (bands or 4)
    assert res["noise_multiplier"] == pytest.approx(noise, rel=1e-12)
    assert res["sensitivity"] == pytest.approx(model.sensitivity(), rel=1e-12)
    if bands == 1:  # the identity: k = 10 participations, sensitivity sqrt(10)
        assert res["sensitivity"] == pytest.approx(10 ** 0.5, rel=1e-12)


@pytest.mark.parametrize("args, message", [
    (["--mechanism", "dp-ftrl", "--min-separation", "2", "--ftrl-bands", "3",
      "--target-epsilon", "4"],
     "--ftrl-bands 3: allowed 0 (chosen by error) or 1..min(min-separation, rounds) = 1..2"),
    (["--population", "100", "--clients", "10", "--noise", "1", "--ftrl-bands", "2"],
     "--ftrl-bands is dp-ftrl only"),
])
def test_plan_refuses_bands_the_run_would_refuse(capsys, args, message):
    with pytest.raises(SystemExit):
        plan.main(["--rounds", "40", "--delta", "1e-5", *args])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bands, separation, rounds", [(3, 2, 40), (5, 8, 4), (4, 8, 4), (2, 2, 40)])
def test_plan_and_run_config_refuse_the_same_bands_in_the_same_words(capsys, bands, separation,
                                                                     rounds):
    """One check (`config.ftrl_bands_problem`): `dpfl plan --ftrl-bands` refuses exactly the
    values the run config refuses, and says what is allowed in the same words."""
    from dpfl_app.config import validate
    from dpfl_app.errors import ConfigError
    from tests.inprocess import default_run_config

    keys = {"mechanism": "dp-ftrl", "min-separation": separation, "rounds": rounds,
            "ftrl-bands": bands}
    try:
        validate(default_run_config(**keys))
        refused = None
    except ConfigError as error:
        refused = str(error).split(": ", 1)[1]
    args = ["--rounds", str(rounds), "--delta", "1e-5", "--mechanism", "dp-ftrl",
            "--min-separation", str(separation), "--ftrl-bands", str(bands),
            "--target-epsilon", "4"]
    if refused is None:
        plan.main([*args, "--json"])
        assert '"bands"' in capsys.readouterr().out
    else:
        with pytest.raises(SystemExit):
            plan.main(args)
        assert f"--ftrl-bands {bands}: {refused}" in capsys.readouterr().err
