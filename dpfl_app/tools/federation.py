"""Drive the real `flwr run .` against a private local SuperLink, then stop it.

Used by the sweep (`dpfl sweep`) and by the end-to-end tests.
Each federation gets its own FLWR_HOME (a copy of the project's
`.flwr/config.toml`) and its own ports (FLWR_LOCAL_SUPERLINK_HTTP_API_PORT, which
also serves the Runtime API, and FLWR_LOCAL_CONTROL_API_PORT: the only ports the
local SuperLink opens), so it never touches a user's SuperLink, and it stops the
SuperLink it started, and every process under it, by PID. Once stopped, it runs
no more `flwr` commands: any of them would start a new SuperLink nobody stops.
`flwr run` exits 0 even when the run fails, so the status comes from
`flwr ls --run-id ID --format json`. The simulation's size goes with each run
(`--federation-config`, flwr 1.42's replacement for the connection's `options.`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

PROJECT = Path(__file__).resolve().parents[2]  # the folder with pyproject.toml
BIN = Path(sys.executable).parent


class FederationError(RuntimeError):
    """`flwr` did not accept a run, or a run did not finish in time."""


class RunTimeout(FederationError):
    """A run was still going at its deadline (it has been stopped)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalFederation:
    """A private FLWR_HOME with a local simulation SuperLink of `num_supernodes`.

    The SuperLink starts with the first `flwr run`; call `stop()` when done.
    """

    connection = "local"  # the `[superlink.<name>]` of config.toml that `flwr` talks to
    local_superlink = True  # `flwr` starts Flower's local SuperLink for this connection

    def __init__(self, home: Path, num_supernodes: int = 10) -> None:
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT / ".flwr" / "config.toml", self.home / "config.toml")
        # Sent with every run: one CPU per client actor (see .flwr/config.toml).
        self.federation_config: dict[str, int | float] = {
            "num-supernodes": num_supernodes, "client-resources-num-cpus": 1,
            "client-resources-num-gpus": 0.0,
        }
        self.stopped = False
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
            # This venv already has every dependency: no per-run `uv sync`.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        if self.stopped:
            raise FederationError(f"`flwr {' '.join(args)}` after stop() would start a new "
                                  "local SuperLink that nobody stops")
        return subprocess.run([str(BIN / "flwr"), *args], cwd=PROJECT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start_local_superlink(self, timeout: float = 180) -> None:
        """Start the local SuperLink as `flwr` would, but with a longer start-up wait.

        `flwr` gives a new local SuperLink 15 s to answer, then kills it; on a
        busy 2-core machine its imports alone can take longer. Flower's own
        start function, run with this federation's environment (ports,
        FLWR_HOME), so every later `flwr` command finds it up.
        """
        code = ("import flwr.cli.local_superlink as local\n"
                f"local.LOCAL_SUPERLINK_STARTUP_TIMEOUT = {float(timeout)}\n"
                "if not local._is_local_superlink_started():\n"
                "    local._start_local_superlink()\n")
        out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=self.env,
                             capture_output=True, text=True, timeout=timeout + 60)
        if out.returncode != 0:
            raise FederationError(f"local SuperLink did not start:\n{out.stdout}\n{out.stderr}")

    def submit(self, *run_configs: str) -> int:
        """Start a run; later run-config strings override earlier ones key by key."""
        if self.local_superlink and not self.superlink_pids():
            self.start_local_superlink()
        args = ["run", ".", self.connection, "--format", "json"]
        if self.federation_config:
            args += ["--federation-config", " ".join(
                f"{key}={value}" for key, value in self.federation_config.items())]
        for run_config in run_configs:
            if run_config:
                args += ["--run-config", run_config]
        out = self.flwr(*args)
        try:
            return int(json.loads(out.stdout)["run-id"])
        except (ValueError, KeyError, TypeError) as err:
            raise FederationError(f"flwr run failed:\n{out.stdout}\n{out.stderr}") from err

    def status(self, run_id: int) -> str:
        out = self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json")
        runs = json.loads(out.stdout)["runs"]
        return runs[0]["status"]

    def wait(self, run_id: int, timeout: float, on_poll: Callable[[], None] | None = None,
             interval: float = 2.0) -> str:
        """Poll until the run finishes; return its status, e.g. "finished:completed".

        Each poll starts a `flwr ls` (about a CPU-second): a long run wants a
        longer `interval`. `on_poll` is called between polls (e.g. progress).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            if on_poll is not None:
                on_poll()
            time.sleep(interval)
        self.flwr("stop", str(run_id), self.connection)
        raise RunTimeout(f"run {run_id} did not finish within {timeout}s")

    def logs(self, run_id: int) -> str:
        out = self.flwr("log", str(run_id), self.connection, "--show", timeout=60)
        return out.stdout + out.stderr

    def superlink_pids(self) -> list[int]:
        # Our FLWR_HOME is on the SuperLink's command line: only ours match.
        out = subprocess.run(["pgrep", "-f", f"flower-superlink.*{self.home}"],
                             capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self) -> None:
        """Stop this federation's SuperLink and every process under it, by PID.

        Flower starts the SuperExec and the simulation (`flwr-simulation`, Ray)
        in sessions of their own, so the SuperLink's process group does not
        hold them: collect the whole tree first, then stop it.
        """
        self.stopped = True
        stop_tree(self.superlink_pids())
        shutil.rmtree(self.home / "local-superlink", ignore_errors=True)


def stop_tree(roots: list[int], grace: float = 20) -> list[int]:
    """SIGTERM `roots` and all their descendants, SIGKILL what is left after `grace` s.

    The tree is collected first: killing a parent re-parents its children.
    Returns the pids that were stopped.
    """
    tree = [pid for root in roots for pid in process_tree(root)]
    signal_all(tree, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    signal_all(alive(tree), signal.SIGKILL)
    return tree


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, parents first."""
    children, tree = _children(), [root]
    for pid in tree:
        tree.extend(children.get(pid, []))
    return tree


def alive(pids: list[int]) -> list[int]:
    """The pids that still run (zombies, already dead, count as gone)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            running.append(pid)
    return running


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
