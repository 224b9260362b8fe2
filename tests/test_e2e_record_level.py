"""The record-level recipe for epsilon = 4 through the real `flwr run` (10 SuperNodes).

The issue's command is `flwr run . --run-config "target-record-epsilon=4 noise=0"`;
the recipe is exactly those two keys plus the tuned rest (full-batch DP-GD at
each site, every site every round, the user-level clip out of the way), run with
one command on its federation, `digits-10` (10 SuperNodes, the size of the
default federation). On the app's defaults alone, which are tuned for
user-level DP (6 of 10 clients a round, a user-level clip of 1.3), the two keys
reach the same epsilon but only about 0.79 (docs/record-level.md states it), so
the recipe test checks the recipe's accuracy and the literal command's test the
figure the docs state for it. Each run must reach its record-level target without
going over (the calibrated sigma is the smallest of 4 significant digits that
meets it, so within 0.1 of it), and its stated accuracy within 3 standard
deviations of one run (the reasoning of tests/test_e2e_recipes.py).
About 4 minutes each on 2 cores at load average 20.
"""

from __future__ import annotations

import json
import tomllib

import pytest

from tests.flwr_harness import PROJECT, LocalFederation
from tests.test_e2e_recipes import STANDARD_DEVIATIONS, run_recipe, stated

pytestmark = pytest.mark.e2e
RECIPE = PROJECT / "recipes" / "digits-record-eps4.toml"
# What docs/record-level.md states for the two keys on the defaults (study engine,
# seeds 100-109): mean and standard deviation of one run.
LITERAL_ACCURACY, LITERAL_SD = 0.797, 0.038


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


def test_the_issues_command_on_the_defaults_reaches_epsilon_4_and_its_stated_accuracy(tmp_path):
    """`flwr run . --run-config "target-record-epsilon=4 noise=0"` on the default federation."""
    doc = (PROJECT / "docs" / "record-level.md").read_text()
    assert f"{LITERAL_ACCURACY:.3f} ± {LITERAL_SD:.3f}" in doc
    out = tmp_path / "out"
    fed = LocalFederation(tmp_path / "home")  # 10 SuperNodes, the default federation
    try:
        run_id = fed.submit("target-record-epsilon=4 noise=0", f"output-dir='{out}'")
        status = fed.wait(run_id, timeout=1800, interval=10)
        logs = fed.logs(run_id)
        assert status == "finished:completed", logs[-3000:]
    finally:
        fed.stop()
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    results = json.loads((run_dir / "results.json").read_text())
    final = results["final"]
    assert results["config"]["target-record-epsilon"] == 4 and results["config"]["noise"] == 0
    assert 3.9 <= final["record_epsilon"] <= 4.0, final
    assert all(r["record_epsilon"] <= 4.0 for r in results["rounds"])
    assert final["test_accuracy"] >= LITERAL_ACCURACY - STANDARD_DEVIATIONS * LITERAL_SD, final
