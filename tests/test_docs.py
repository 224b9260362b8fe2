"""The documentation: the site builds with --strict, its run-config reference is the code's,
and the README stays a landing page whose links and feature commands work."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
README = (PROJECT / "README.md").read_text()


def _hook():
    path = PROJECT / "docs" / "hooks" / "run_config.py"
    spec = importlib.util.spec_from_file_location("run_config_hook", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_site_builds_with_strict(tmp_path):
    """A broken link or anchor, a page left out of the nav, a snippet that is gone, or a
    run-config key without a row in the reference fails the build. The site is written
    outside the checkout: `flwr run` bundles every file .gitignore does not exclude."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    reference = (site / "reference" / "index.html").read_text()
    from dpfl_app.config import KEYS

    for name in KEYS:
        assert f"<code>{name}</code>" in reference, name
    # the operators' guide is included from deploy/README.md, not copied
    assert "Try it on one machine" in (site / "deployment" / "index.html").read_text()


def test_reference_takes_defaults_and_allowed_values_from_the_code():
    hook = _hook()
    from dpfl_app.config import KEYS

    page = hook.fill((PROJECT / "docs" / "reference.md").read_text())
    defaults = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    rows = {m.group(1): m.group(2).split(" | ")
            for m in re.finditer(r"^\| `([a-z-]+)` \| (.+) \|$", page, re.M)}
    assert set(rows) == set(KEYS)
    for name, (default, allowed, _meaning) in rows.items():
        value = defaults[name]
        shown = str(value).lower() if isinstance(value, bool) else (
            f'"{value}"' if isinstance(value, str) else str(value))
        assert default.strip("`") == shown, (name, default, value)
        if KEYS[name].allowed:
            assert allowed == KEYS[name].allowed, name


def test_reference_fails_for_a_key_without_a_row_or_a_row_without_a_key():
    hook = _hook()
    from dpfl_app.config import KEYS

    page = "| key | meaning |\n|---|---|\n" + "".join(f"| `{k}` | words |\n" for k in KEYS)
    values = {k: 1 for k in KEYS}
    hook.fill(page, values=values)
    without_noise = page.replace("| `noise` | words |\n", "")
    with pytest.raises(hook.ReferenceError, match="no row for run-config key.*noise"):
        hook.fill(without_noise, values=values)
    with pytest.raises(hook.ReferenceError, match="'nosie'.*not a run-config key"):
        hook.fill(page + "| `nosie` | words |\n", values=values)
    with pytest.raises(hook.ReferenceError, match="more than one row for noise"):
        hook.fill(page + "| `noise` | again |\n", values=values)


def test_readme_is_a_landing_page():
    assert len(README.splitlines()) <= 300
    for target in re.findall(r"\]\(((?!https?://|#)[^)#]+)(?:#[^)]*)?\)", README):
        assert (PROJECT / target).exists(), target
    # every docs page is on the README's map
    for page in (PROJECT / "docs").glob("*.md"):
        if page.name != "index.md":
            assert f"](docs/{page.name})" in README, page.name


def test_readme_keys_in_brief_show_the_defaults_of_pyproject():
    defaults = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    table = README.split("## The keys in brief", 1)[1].split("\n## ", 1)[0]
    rows = [row.split(" | ")[:2] for row in table.splitlines() if row.startswith("| `")]
    assert len(rows) >= 10
    for keys, shown in rows:
        names = re.findall(r"`([a-z-]+)`", keys)
        values = [tomllib.loads(f"v = {v}")["v"] for v in re.findall(r"`([^`]*)`", shown)]
        assert len(names) == len(values), keys
        for name, value in zip(names, values):
            assert value == defaults[name], (name, value, defaults[name])


@pytest.mark.parametrize("words", [
    'flwr run . --stream --run-config "secure-aggregation=true"',
    'flwr run . --stream --run-config "target-epsilon=8"',
    "flwr run . digits-1437 --run-config recipes/digits-eps2.toml",
    'flwr run . --stream --run-config "audit-canaries=1000"',
    'flwr run . --stream --run-config "target-record-epsilon=4 noise=0"',
    "flwr run . --stream --run-config \"tracking='mlflow'\"",
    "dpfl deploy --nodes 3",
    "dpfl stop-superlink",
])
def test_readme_gives_one_line_to_copy_per_feature(words):
    blocks = "\n".join(README.split("```")[1::2])
    assert words in blocks


def test_readme_recipe_and_plan_commands_name_what_exists():
    """The recipe's file and federation exist, and the planning example does not trigger
    the planner's own warning that δ is not well below 1/N."""
    connections = tomllib.loads((PROJECT / ".flwr" / "config.toml").read_text())["superlink"]
    for connection, recipe in re.findall(r"flwr run \. (\S+) --run-config (recipes/\S+)", README):
        assert connection in connections and (PROJECT / recipe).is_file()
    for text in [README, (PROJECT / "docs" / "privacy.md").read_text()]:
        for args in re.findall(r"^dpfl plan (--population .*)$", text.replace("\\\n", " "), re.M):
            population, delta = (float(re.search(f"--{k} (\\S+)", args).group(1))
                                 for k in ("population", "delta"))
            assert delta < 1 / population / 10, args  # what "well below 1/N" means here
