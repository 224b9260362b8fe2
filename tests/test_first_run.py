"""A newcomer's first hour: install floor, plain `flwr run .`, fast bad input, honest endings."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from dpfl_app.errors import ConfigError
from dpfl_app.run import outcome
from dpfl_app.tools.federation import FederationError, LocalFederation, alive
from tests.fresh_python import run_python

PROJECT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((PROJECT / "pyproject.toml").read_text())
README = (PROJECT / "README.md").read_text()
# The documentation site (mkdocs.yml): the README is its landing page.
DOCS = {p.name: p.read_text() for p in sorted((PROJECT / "docs").glob("*.md"))}
PYTHONS = [f"3.{minor}" for minor in range(6, 20)]


def _floor(spec: str) -> str:
    """The oldest Python 3.x a Requires-Python specifier allows."""
    return next(v for v in PYTHONS if SpecifierSet(spec).contains(v + ".0"))


# --- 1. the Python floor ---------------------------------------------------------
def test_requires_python_is_the_floor_of_the_installed_dependencies():
    ours = _floor(PYPROJECT["project"]["requires-python"])
    floors = {}
    for line in PYPROJECT["project"]["dependencies"]:
        name = Requirement(line).name
        spec = importlib.metadata.metadata(name).get("Requires-Python") or ">=3.0"
        floors[name] = _floor(spec)
    highest = max(floors.values(), key=lambda v: int(v.split(".")[1]))
    # Not lower (pip would install us where a dependency cannot run), not higher (no reason).
    assert ours == highest, f"requires-python floor {ours}; dependencies need {floors}"


# --- 3. bad values fail fast: validating imports no torch ------------------------------
def test_validating_a_run_config_imports_no_torch():
    res = run_python("""
        import sys, tomllib
        from dpfl_app.config import validate
        from dpfl_app.errors import ConfigError
        cfg = tomllib.load(open("pyproject.toml", "rb"))["tool"]["flwr"]["app"]["config"]
        validate(cfg)
        try:
            validate({**cfg, "noise": -1.0})
        except ConfigError as err:
            print("ERR", err)
        heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "dp_accounting",
                                                                  "datasets", "sklearn"})
        print("HEAVY", heavy)
    """)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout, res.stdout
    assert "ERR run-config key 'noise' = -1.0" in res.stdout


def test_server_app_rejects_a_bad_value_in_one_line_before_importing_torch():
    res = run_python("""
        import logging, sys, tomllib
        from flwr.app import Context, RecordDict
        from dpfl_app.server_app import main
        lines = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())
        logging.getLogger("flwr").addHandler(handler)
        cfg = tomllib.load(open("pyproject.toml", "rb"))["tool"]["flwr"]["app"]["config"]
        ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={**cfg, "noise": -1.0})
        try:
            main(None, ctx)  # the grid is never touched before validation
        except Exception as err:
            print("RAISED", type(err).__name__)
        print("TORCH", "torch" in sys.modules)
        print("LAST", lines[-1])
    """)
    assert res.returncode == 0, res.stderr
    assert "RAISED ConfigError" in res.stdout and "TORCH False" in res.stdout, res.stdout
    last = res.stdout.split("LAST ", 1)[1].strip()
    assert last.startswith("run FAILED: run-config key 'noise' = -1.0 is invalid; allowed: "
                           "a number >= 0"), last
    assert "\n" not in last


def test_validation_needs_no_torch_but_knows_every_model():
    from dpfl_app.config import MODEL_NAMES
    from dpfl_app.task import MODELS

    assert tuple(MODELS) == MODEL_NAMES


def test_flower_traceback_for_an_input_error_is_dropped_but_kept_for_bugs():
    brief = outcome.BriefErrors((ConfigError,))
    for err, kept in ((ConfigError("bad"), False), (RuntimeError("bug"), True)):
        record = logging.LogRecord("flwr", logging.ERROR, __file__, 1,
                                   "%s raised an exception", ("Simulation",),
                                   (type(err), err, None))
        assert brief.filter(record)
        assert (record.exc_info is not None) == kept


# --- 2. a simulation too small for `clients` says what to type, at once ---------------
def test_too_small_simulation_fails_at_once_with_the_command_to_type():
    from flwr.superlink.grid import InMemoryGrid

    from dpfl_app.run.grid import fast_polling
    from dpfl_app.strategy.population import is_simulation, simulation_population
    from dpfl_app.strategy.dp_fedavg import NotEnoughNodes

    class TwoNodeSimulation(InMemoryGrid):  # Flower's default local federation
        def __init__(self) -> None:  # no state: only the node ids are asked for
            self.polls, self.pull_interval = 0, 0.1

        def get_node_ids(self):
            self.polls += 1
            return [11, 12]

    simulation = TwoNodeSimulation()
    grid = fast_polling(simulation)  # what the ServerApp hands its run: still a simulation
    assert grid is not simulation and is_simulation(grid)
    with pytest.raises(NotEnoughNodes) as err:
        simulation_population(grid, clients=6, settle_s=0.01)
    # no waiting for nodes that cannot come: the count is read until it is steady
    assert simulation.polls <= 3
    message = str(err.value)
    assert "has 2 SuperNode(s)" in message and "clients=6" in message
    assert "flwr federation simulation-config --num-supernodes 10" in message
    assert "--run-config clients=2" in message


# --- 3. a virtual environment inside the project slows every `flwr run` ------------------
def test_flower_lists_files_under_the_app_that_gitignore_excludes(tmp_path):
    """Why the README installs outside the project: Flower's bundle builder walks every
    file under the app, a `.venv` too, before `.gitignore` drops them (49,000 files and
    6 s a run with PyTorch's default wheel). If Flower starts pruning ignored folders,
    this fails, and the README's advice can go."""
    from flwr.cli.utils import collect_files

    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "torch.py").write_text("")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    assert ".venv/lib/torch.py" in collect_files(tmp_path)


def test_readme_and_docs_install_every_environment_outside_the_project():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"python3? -m venv ~", quick)
    texts = [README, (PROJECT / "deploy" / "README.md").read_text(), *DOCS.values()]
    for block in (block for text in texts for block in text.split("```")[1::2]):
        for venv in re.findall(r"python3? -m venv (\S+)", block):
            assert venv.startswith(("~", "/", "$")), venv


# --- 5. how a run ends ------------------------------------------------------------------
def _capture_flwr_log() -> tuple[list[str], logging.Handler]:
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("flwr").addHandler(handler)
    return lines, handler


def test_failed_run_leaves_no_run_folder_and_says_so(tmp_path, monkeypatch):
    from tests.inprocess import default_run_config, run_server

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # as on a machine without the Hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "out"
    lines, handler = _capture_flwr_log()
    try:
        with pytest.raises(Exception):
            run_server(default_run_config(**{"dataset": "mnist", "output-dir": str(out)}))
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())
    assert lines[-1].startswith("run FAILED: ") and "no outputs were kept" in lines[-1]


def test_successful_run_ends_with_success_and_its_folder(tmp_path):
    from tests.inprocess import default_run_config, run_server

    out = tmp_path / "out"
    lines, handler = _capture_flwr_log()
    try:
        run_server(default_run_config(**{"rounds": 2, "output-dir": str(out)}))
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    (run_dir,) = out.iterdir()
    assert lines[-1].startswith("run SUCCEEDED (completed all rounds): 2 rounds")
    assert lines[-1].endswith(f"; `flwr ls` status finished:completed (run 1); outputs in {run_dir}")
    rounds = [ln for ln in lines if ln.startswith("round ") and not ln.startswith("round 0")]
    assert len(rounds) == 2
    for line in rounds:  # round, accuracy, epsilon so far, clip norm; no counts, no times
        assert re.match(r"round \d/2: test accuracy 0\.\d{4} .*\| epsilon "
                        r"so far \d+\.\d{3} at delta 1e-05 \| clip norm \d\.\d{4} -> ", line), line
        assert "repl" not in line and "kept" not in line
    assert not any("0.32999999999999996" in ln or "num-examples'" in ln for ln in lines)


# --- 4, 9. SuperLinks: our own, stopped by PID, never restarted ---------------------------
def test_a_stopped_federation_runs_no_more_flwr_commands(tmp_path):
    fed = LocalFederation(tmp_path / "home")
    fed.stop()  # nothing was started
    with pytest.raises(FederationError, match="would start a new local SuperLink"):
        fed.status(1)


def _fake_superlink(tmp_path: Path, name: str, marker: str, port: int = 0):
    """A process whose command line reads `<name> ... <marker>`, listening on `port` when
    given, with a child in a session of its own (as Flower's SuperExec and simulation)."""
    pid_file = tmp_path / f"{name}-child.pid"
    fake = textwrap.dedent(f"""
        import socket, subprocess, sys, time
        if {port}:
            server = socket.socket()
            server.bind(("127.0.0.1", {port}))
            server.listen()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                                 start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(300)
    """)
    link = subprocess.Popen([sys.executable, "-c", fake, name, marker], start_new_session=True)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and link.poll() is None
        time.sleep(0.1)
    return link, int(pid_file.read_text())


def _kill(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_stop_takes_processes_that_left_the_superlinks_session(tmp_path):
    """Flower's SuperExec and flwr-simulation run in sessions of their own."""
    fed = LocalFederation(tmp_path / "home")
    link, child = _fake_superlink(tmp_path, "flower-superlink", str(fed.home))
    try:
        assert fed.superlink_pids() == [link.pid]
        fed.stop()
        link.wait(timeout=30)
        assert alive([link.pid, child]) == []
    finally:
        _kill(link.pid, child)


def test_stop_superlink_command_stops_only_the_superlink_on_its_port(tmp_path):
    from dpfl_app.tools.federation import _free_port
    from dpfl_app.tools.stop_superlink import main as stop_superlink

    port, other_port = _free_port(), _free_port()
    link, child = _fake_superlink(tmp_path, "flower-superlink", "ours", port)
    other, other_child = _fake_superlink(tmp_path, "something-else", "theirs", other_port)
    try:
        assert stop_superlink(["--port", str(other_port)]) == 1  # not a SuperLink: untouched
        assert stop_superlink(["--port", str(port)]) == 0
        link.wait(timeout=30)
        assert alive([link.pid, child]) == []
        assert alive([other.pid, other_child]) == [other.pid, other_child]
    finally:
        _kill(link.pid, child, other.pid, other_child)


def test_bench_status_thread_never_calls_flwr_after_the_watch(tmp_path):
    from dpfl_app.tools.bench.simulation import _watch

    run_dir = tmp_path / "out" / "run"
    run_dir.mkdir(parents=True)
    calls: list[float] = []

    def status() -> str:
        calls.append(time.monotonic())
        time.sleep(0.05)  # `flwr ls` takes a while
        return "running"

    threading.Timer(0.5, (run_dir / "privacy.md").touch).start()  # the run ends
    found = _watch(tmp_path / "out", status, time.time() + 60, status_interval=0.05)
    assert found["status"] == "completed" and calls
    seen = len(calls)
    time.sleep(0.5)  # the old thread slept, then called `flwr ls` once the SuperLink was gone
    assert len(calls) == seen
    assert not [t for t in threading.enumerate() if t.name != "MainThread" and t.daemon
                and "check_status" in repr(getattr(t, "_target", ""))]


# --- the README agrees with the code --------------------------------------------------
def test_readme_per_round_table_lists_the_rounds_csv_columns():
    from dpfl_app.run.outputs import ROUND_COLUMNS

    table = DOCS["output.md"].split("Per-round record in `results.json`", 1)[1].split("\n\n", 2)[1]
    fields = set()
    for row in table.splitlines()[2:]:
        fields |= set(re.findall(r"`([a-z_]+)`", row.split("|")[1]))
    assert fields - {"client_eval_not_dp"} == set(ROUND_COLUMNS)


def test_readme_main_command_is_plain_flwr_run_and_stops_nothing_by_name():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [ln.strip() for ln in quick.splitlines() if ln.strip().startswith("flwr run")]
    assert "flwr run . --stream" in commands, commands
    assert "FLWR_HOME" not in quick.split("```", 2)[1]  # not in the three commands
    # stopping by name would stop other users' SuperLinks: no page ever suggests it; the
    # Quick start says how to stop it by PID
    assert "dpfl stop-superlink" in quick
    for text in [README, (PROJECT / "deploy" / "README.md").read_text(), *DOCS.values()]:
        assert "pkill -f flower" not in text and "killall" not in text


def test_troubleshooting_lists_every_run_config_key():
    from dpfl_app.config import KEYS

    paragraph = DOCS["troubleshooting.md"].split("## `Invalid run configuration`", 1)[1]
    paragraph = paragraph.split("\n## ", 1)[0]
    assert set(re.findall(r"`([a-z-]+)`", paragraph)) >= set(KEYS)


USER_FACING = ["README.md", "deploy/README.md", "pyproject.toml", ".flwr/config.toml", "mkdocs.yml",
               *[f"docs/{name}" for name in DOCS], "docs/hooks/run_config.py",
               *[str(p.relative_to(PROJECT)) for p in (PROJECT / "dpfl_app").rglob("*.py")]]


@pytest.mark.parametrize("path", USER_FACING)
def test_user_facing_text_cites_only_public_sources(path):
    text = (PROJECT / path).read_text()
    assert not re.findall(r"[Ss]eeds?'? 0\d\d|dp-notes|the seeds'", text)


# The recipes' connection carries its SuperNode count (the recipes need 1,437),
# which flwr 1.42 can only read from `options.`; the connections a first run
# and a deployment use carry none, so their runs print no deprecation warning.
SIZED_CONNECTIONS = {"digits-1437", "digits-10"}  # the recipes: one command each


def test_deprecated_connection_options_are_gone():
    config = tomllib.loads((PROJECT / ".flwr" / "config.toml").read_text())
    for name, connection in config["superlink"].items():
        if isinstance(connection, dict):
            assert ("options" in connection) == (name in SIZED_CONNECTIONS), name
            assert "address" in connection, name


# --- 2 end to end: plain `flwr run .` from an empty FLWR_HOME --------------------------
@pytest.mark.e2e
def test_plain_flwr_run_from_an_empty_flwr_home(tmp_path):
    """Flower's default local federation (2 SuperNodes): one line says what to type;
    after the README's one-time set-up, the same plain `flwr run .` trains."""
    fed = LocalFederation(tmp_path / "home")  # private ports; stopped by PID below
    (fed.home / "config.toml").unlink()  # empty FLWR_HOME: flwr writes its own default
    fed.federation_config = {}  # plain `flwr run .`: no --federation-config
    out = tmp_path / "out"
    try:
        run_id = fed.submit(f"rounds=1 output-dir='{out}'")
        assert fed.wait(run_id, timeout=300) == "finished:failed"
        logs = fed.logs(run_id)
        failed = [ln for ln in logs.splitlines() if "run FAILED" in ln]
        assert len(failed) == 1 and "flwr federation simulation-config --num-supernodes 10" \
            in failed[0], logs[-3000:]
        assert "Traceback" not in logs, logs[-3000:]
        assert not out.exists() or not list(out.iterdir())

        setup = fed.flwr("federation", "simulation-config", "--num-supernodes", "10",
                         "--client-resources-num-cpus", "1")
        assert setup.returncode == 0, setup.stdout + setup.stderr
        run_id = fed.submit(f"rounds=1 output-dir='{out}'")
        assert fed.wait(run_id, timeout=600) == "finished:completed"
        logs = fed.logs(run_id)
        assert "round 1/1: " in logs and "run SUCCEEDED" in logs, logs[-3000:]
        assert "deprecated" not in logs
        assert json.loads((next(out.iterdir()) / "results.json").read_text())[
            "accounting"]["population"] == 10
    finally:
        fed.stop()
    assert not fed.superlink_pids()
