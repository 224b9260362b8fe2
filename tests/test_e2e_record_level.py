"""The record-level recipe for epsilon = 4 through the real `flwr run` (10 SuperNodes).

The issue's command is `flwr run . --run-config "target-record-epsilon=4 noise=0"`;
the recipe is exactly those two keys plus the tuned rest (full-batch DP-GD at
each site, every site every round, the user-level clip out of the way), run with
one command on its federation, `digits-10` (10 SuperNodes, the size of the
default federation). On the app's defaults alone, which are tuned for
user-level DP (6 of 10 clients a round, a user-level clip of 1.3), the two keys
reach the same epsilon but only about 0.79 (docs/record-level.md states it), so
the accuracy check runs the recipe. The run must reach its record-level target
without going over (the calibrated sigma is the smallest of 4 significant digits
that meets it, so within 0.1 of it), and the recipe's stated accuracy within 3
standard deviations of one run (the reasoning of tests/test_e2e_recipes.py).
A few minutes on 2 cores.
"""

from __future__ import annotations

import json
import tomllib

import pytest

from tests.flwr_harness import PROJECT
from tests.test_e2e_recipes import STANDARD_DEVIATIONS, run_recipe, stated

pytestmark = pytest.mark.e2e
RECIPE = PROJECT / "recipes" / "digits-record-eps4.toml"


def test_record_level_recipe_reaches_its_epsilon_and_accuracy(tmp_path):
    _, accuracy, sd = stated(RECIPE)
    keys = tomllib.loads(RECIPE.read_text())
    assert keys["target-record-epsilon"] == 4 and keys["noise"] == 0
    run_dir, logs = run_recipe(RECIPE, tmp_path, timeout=1800, interval=10)
    results = json.loads((run_dir / "results.json").read_text())
    final = results["final"]
    assert 3.9 <= final["record_epsilon"] <= 4.0, final
    assert final["test_accuracy"] >= accuracy - STANDARD_DEVIATIONS * sd, final
    assert "record-level epsilon" in logs and "Record-level guarantee" in (
        run_dir / "privacy.md").read_text()
