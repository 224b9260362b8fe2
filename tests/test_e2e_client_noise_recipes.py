"""The noise-at=clients recipes through the real `flwr run` (hours on 2 cores: -m recipes).

`flwr run . digits-1437 --run-config recipes/digits-clients-eps*.toml` on a private
local SuperLink. What the study engine's numbers for the recipe rest on, checked on
the Flower run:
- the parameters the server announced are the ones the study engine runs with for
  the same config (`strategy.client_noise.plan_for`, the one calibration);
- every reported epsilon is the study engine's ledger (`DistributedAccountant`) fed
  the survivors of the rounds so far;
- every released sum decoded to the model's d values, and its largest centred value
  stayed below 0.9 * 2^(b-1) (the server cannot see a wrapped coordinate; a sum that
  stays clear of the edge had no coordinate near it);
- (full run) the accuracy lands no more than 3 standard deviations below the mean the
  recipe states (the reasoning of tests/test_e2e_recipes.py).

`test_one_round_of_the_client_noise_recipe` runs round 1 of a recipe with the recipe's
calibrated z given as `noise` (so the shares are the 40-round recipe's) and
`rounds = 1`: the check without the hours.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from dpfl_app.config import validate
from dpfl_app.privacy.distributed_accounting import DistributedAccountant
from dpfl_app.run.outputs import read_diagnostics
from tests.flwr_harness import PROJECT
from tests.inprocess import default_run_config
from tests.test_e2e_recipes import STANDARD_DEVIATIONS, run_recipe, stated

pytestmark = [pytest.mark.e2e, pytest.mark.recipes]

RECIPES = sorted((PROJECT / "recipes").glob("digits-clients-*.toml"))
POPULATION = 1437  # the recipes' federation, digits-1437


def server_plan(keys: dict):
    from dpfl_app.strategy.client_noise import model_dim, plan_for

    cfg = validate(default_run_config(**keys))
    return plan_for(cfg, POPULATION, model_dim(cfg))


def derived_recipe(recipe: Path, folder: Path, **changes) -> Path:
    """The recipe's header (federation, accuracy) and keys, with `changes`: a new TOML file."""
    header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
    keys = {**tomllib.loads(recipe.read_text()), **changes}
    body = [f"{key} = {json.dumps(value) if not isinstance(value, float) else repr(value)}"
            for key, value in keys.items()]
    path = folder / recipe.name
    path.write_text("\n".join(header + body) + "\n")
    assert tomllib.loads(path.read_text()) == keys
    return path


def check_run(run_dir: Path, keys: dict) -> dict:
    """The checks of the module doc on a finished run; its results.json."""
    results = json.loads((run_dir / "results.json").read_text())
    accounting = results["accounting"]
    plan = server_plan(keys)
    assert accounting["noise_at"] == "clients"
    assert accounting["params"] == plan.params.to_dict()
    cfg = validate(default_run_config(**keys))
    ledger = DistributedAccountant(plan.params, cfg["target-delta"], cfg["sampling"],
                                   cfg["clients"] / POPULATION)
    diagnostics = {d["round"]: d for d in read_diagnostics(run_dir)}
    survivors = iter(accounting["survivors"])
    for record in results["rounds"]:
        if record["sum_released"]:
            ledger.compose_round(next(survivors))
            used = diagnostics[record["round"]]["client_noise"]
            assert used["decoded_values"] == plan.params.dim
            assert used["largest_centred"] < 0.9 * used["half_modulus"]
        assert record["epsilon"] == pytest.approx(ledger.epsilons()["with_sampling"], rel=1e-9)
    assert results["final"]["epsilon"] == pytest.approx(ledger.epsilons()["with_sampling"])
    return results


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_one_round_of_the_client_noise_recipe(recipe, tmp_path):
    keys = tomllib.loads(recipe.read_text())
    z = server_plan(keys).split.noise_multiplier  # the 40-round recipe's calibrated z
    one_round = {"target-epsilon": 0.0, "noise": z, "rounds": 1}
    run_dir, _ = run_recipe(derived_recipe(recipe, tmp_path, **one_round), tmp_path,
                            timeout=4 * 3600, interval=30)
    results = check_run(run_dir, {**keys, **one_round})
    assert server_plan({**keys, **one_round}).params == server_plan(keys).params
    assert len(results["rounds"]) == 1 and results["rounds"][0]["sum_released"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_client_noise_recipe_reproduces_its_stated_accuracy(recipe, tmp_path):
    _, accuracy, sd = stated(recipe)
    run_dir, _ = run_recipe(recipe, tmp_path, timeout=48 * 3600, interval=120)
    results = check_run(run_dir, tomllib.loads(recipe.read_text()))
    assert results["final"]["test_accuracy"] >= accuracy - STANDARD_DEVIATIONS * sd
