"""Each recipe reproduces, through the real `flwr run`, the accuracy docs/recipes.md states for it.

`flwr run . <federation> --run-config recipes/<file>` on a private local
SuperLink (its own FLWR_HOME and ports), with the recipe's own federation from
.flwr/config.toml. Slow (minutes per recipe on 2 cores): pick one with -k.
The stated accuracy is the study engine's mean over 20 runs with secret noise
and seeds the tuning never saw; the recipe also states the standard deviation
of one run. One flwr run is one more draw from that distribution (the
simulation's node IDs, and so its cohorts, differ, and its noise is secret), so
it must land no more than 3 standard deviations below the mean: a false alarm
about once in 740 runs if the two paths agree, where a systematic gap of a
standard deviation or more shows up within a few runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.flwr_harness import PROJECT, LocalFederation

RECIPES = sorted((PROJECT / "recipes").glob("*.toml"))
# noise-at=clients recipes take hours through `flwr run` (secure aggregation over 1,437
# SuperNodes): tests/test_e2e_client_noise_recipes.py runs them with their own checks.
SERVER_NOISE = [r for r in RECIPES if not r.stem.startswith("digits-clients-")]
STANDARD_DEVIATIONS = 3


def stated(recipe: Path) -> tuple[str, float, float]:
    """(federation, mean test accuracy, standard deviation of one run) from the header."""
    text = recipe.read_text()
    federation = re.search(r"^# federation: (\S+)", text, re.M).group(1)
    found = re.search(r"^# test accuracy: ([0-9.]+), sd ([0-9.]+)", text, re.M)
    return federation, float(found.group(1)), float(found.group(2))


def test_every_recipe_is_a_valid_run_config_with_its_federation_and_accuracy():
    import tomllib

    from dpfl_app.config import validate
    from tests.inprocess import default_run_config

    assert len(RECIPES) >= 4
    config = tomllib.loads((PROJECT / ".flwr" / "config.toml").read_text())
    for recipe in RECIPES:
        federation, accuracy, sd = stated(recipe)
        supernodes = config["superlink"][federation]["options"]["num-supernodes"]
        keys = tomllib.loads(recipe.read_text())
        assert validate(default_run_config(**keys))["clients"] <= supernodes, recipe.name
        # user-level recipes calibrate z, record-level ones (DP-SGD at each site) sigma
        assert 0 < keys.get("target-epsilon", 0) or 0 < keys.get("target-record-epsilon", 0)
        assert 0 < accuracy <= 1 and 0 < sd < 0.05


# Keys a noise-at=clients recipe may add for its `flwr run` that the study engine, which
# runs no protocol, does not read: SecAgg+'s neighbourhood and the stage timeout.
DEPLOYMENT_ONLY = {"secagg-neighbours", "round-timeout"}
# Keys a noise-at=clients recipe tuned on its own (docs/secure-aggregation.md, "Accuracy
# against central DP"): the benchmark's variant sets them (`client_noise_accuracy --set`).
OWN_TUNING = {"server-lr"}


def test_client_noise_recipes_are_their_central_recipe_plus_the_benchmarked_keys():
    """The accuracy a noise-at=clients recipe states comes from the benchmark's variant
    (central recipe + `client_noise_keys`); the recipe must be exactly that run config."""
    import tomllib

    from dpfl_app.tools.bench.client_noise_accuracy import client_noise_keys

    recipes = {r.stem: tomllib.loads(r.read_text()) for r in RECIPES}
    clients = {name: keys for name, keys in recipes.items() if keys.get("noise-at") == "clients"}
    assert set(clients) == {"digits-clients-eps2", "digits-clients-eps4"}
    for name, keys in clients.items():
        central = recipes[name.replace("digits-clients-", "digits-")]
        m = keys["clients"] if keys["clients"] != central["clients"] else 0
        tuned = {k: keys[k] for k in OWN_TUNING if k in keys and keys[k] != central.get(k)}
        expected = {**central,
                    **client_noise_keys(keys["noise-bits"], keys["noise-threshold"], m, tuned)}
        assert {k: v for k, v in keys.items() if k not in DEPLOYMENT_ONLY} == expected, name
        assert keys["noise-bits"] <= 20


@pytest.mark.e2e
@pytest.mark.recipes  # hours on 2 cores: not in the default suite
@pytest.mark.parametrize("recipe", SERVER_NOISE, ids=[r.stem for r in SERVER_NOISE])
def test_recipe_reproduces_its_stated_accuracy(recipe, tmp_path):
    _, accuracy, sd = stated(recipe)
    run_dir, _ = run_recipe(recipe, tmp_path, timeout=5400, interval=30)
    final = json.loads((run_dir / "results.json").read_text())["final"]
    assert final["test_accuracy"] >= accuracy - STANDARD_DEVIATIONS * sd, final


def run_recipe(recipe: Path, tmp_path: Path, timeout: float, interval: float
               ) -> tuple[Path, str]:
    """`flwr run . <its federation> --run-config <a copy of recipe>`: (run folder, logs)."""
    federation, _, _ = stated(recipe)
    out = tmp_path / "out"
    # Flower takes a TOML file alone, without other overrides: a copy adds output-dir.
    copy = tmp_path / recipe.name
    copy.write_text(recipe.read_text() + f"\noutput-dir = '{out}'\n")
    fed = LocalFederation(tmp_path / "home")
    fed.connection = federation
    fed.federation_config = {}  # the connection's own size (num-supernodes) applies
    try:
        run_id = fed.submit(str(copy))
        status = fed.wait(run_id, timeout=timeout, interval=interval)
        logs = fed.logs(run_id)
        assert status == "finished:completed", logs[-3000:]
    finally:
        fed.stop()
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir, logs
