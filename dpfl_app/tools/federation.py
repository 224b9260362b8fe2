"""Drive the real `flwr run .` against a private local SuperLink, then stop it.

Used by the sweep (`dpfl sweep`) and by the end-to-end tests.
Each federation gets its own FLWR_HOME (a copy of the project's
`.flwr/config.toml`) and its own ports, so it never touches a user's SuperLink,
and it stops the SuperLink it started by PID. `flwr run` exits 0 even when the
run fails, so the status comes from `flwr ls --run-id ID --format json`.
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

    def __init__(self, home: Path, num_supernodes: int = 10) -> None:
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        text = (PROJECT / ".flwr" / "config.toml").read_text()
        text = text.replace("num-supernodes = 10", f"num-supernodes = {num_supernodes}")
        (self.home / "config.toml").write_text(text)
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
        return subprocess.run([str(BIN / "flwr"), *args], cwd=PROJECT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def submit(self, *run_configs: str) -> int:
        """Start a run; later run-config strings override earlier ones key by key."""
        args = ["run", ".", self.connection, "--format", "json"]
        for run_config in run_configs:
            if run_config:
                args += ["--run-config", run_config]
        if self.connection == LocalFederation.connection:  # not a real deployment
            self.start_local_superlink()
        out = self.flwr(*args)
        try:
            return int(json.loads(out.stdout)["run-id"])
        except (ValueError, KeyError, TypeError) as err:
            raise FederationError(f"flwr run failed:\n{out.stdout}\n{out.stderr}") from err

    def start_local_superlink(self, timeout: float = 180) -> None:
        """Start the local SuperLink as `flwr run` would, but wait up to `timeout` s.

        `flwr` gives it 15 s and then kills it; on a loaded 2-core machine
        importing Flower alone can take longer. `flwr run` then finds it running.
        """
        if self.superlink_pids():
            return
        script = ("import flwr.cli.local_superlink as m; "
                  f"m.LOCAL_SUPERLINK_STARTUP_TIMEOUT = {float(timeout)}; "
                  "m._start_local_superlink()")
        subprocess.run([sys.executable, "-c", script], cwd=PROJECT, env=self.env,
                       capture_output=True, text=True, timeout=timeout + 60)

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
        """Stop this federation's SuperLink (and its process group) by PID."""
        for pid in self.superlink_pids():
            try:
                os.killpg(os.getpgid(pid), signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while self.superlink_pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self.superlink_pids():
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.home / "local-superlink", ignore_errors=True)
