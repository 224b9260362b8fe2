"""A Ray cluster of several nodes on this machine, with its own ports and temp folder.

`ray start --head` and `ray start --address` per extra node, each with
`--block` so that every process of a node (GCS, raylet, workers, actors)
descends from one `ray start` we started: `stop()` stops those trees by PID.
Never `ray stop`: it stops every Ray process of the user on the machine,
other people's simulations included.

Each node gets free ports of its own (never Ray's defaults: 6379, 10001,
52365, ...), and RAY_TMPDIR points at a private folder, so `ray start`
records this cluster's address there and not in /tmp/ray/ray_current_cluster,
where any plain `ray.init()` on the machine would find and join it.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpfl_app.tools.federation import BIN, alive, process_tree, stop_tree

NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                   "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                   "--runtime-env-agent-port")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRayCluster:
    """`cpus_per_node[0]` on the head node, one more node per further entry."""

    def __init__(self, cpus_per_node: tuple[int, ...] = (1, 1)) -> None:
        # Short: Ray's socket paths under it must fit a Unix socket name (107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.cpus_per_node = cpus_per_node
        self.gcs_port = _free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.env = {**os.environ, "RAY_TMPDIR": str(self.temp_dir),
                    "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}"
                    f"{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []

    def _node_args(self, cpus: int) -> list[str]:
        low = random.randrange(20_000, 60_000, 200)  # a worker-port range of our own
        args = [f"--num-cpus={cpus}", "--num-gpus=0", "--disable-usage-stats",
                f"--min-worker-port={low}", f"--max-worker-port={low + 199}", "--block"]
        return args + [f"{flag}={_free_port()}" for flag in NODE_PORT_FLAGS]

    def start(self, timeout: float = 180) -> None:
        ray = str(BIN / "ray")
        head = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
                f"--ray-client-server-port={_free_port()}"]
        self._spawn(head + self._node_args(self.cpus_per_node[0]), "head")
        self.wait_for_nodes(1, timeout)
        for index, cpus in enumerate(self.cpus_per_node[1:], start=1):
            worker = [ray, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1"]
            self._spawn(worker + self._node_args(cpus), f"node{index}")
        self.wait_for_nodes(len(self.cpus_per_node), timeout)

    def _spawn(self, argv: list[str], name: str) -> None:
        log = open(self.temp_dir / f"{name}.log", "wb")  # noqa: SIM115  (closed with the node)
        self.nodes.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=log,
                                           start_new_session=True))

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        """Until `count` nodes are alive in the GCS (a short-lived driver asks)."""
        code = ("import ray, sys, time\n"
                f"ray.init(address='{self.address}', logging_level='ERROR')\n"
                f"deadline = time.monotonic() + {timeout}\n"
                f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
                "    if time.monotonic() > deadline: sys.exit(1)\n"
                "    time.sleep(1)\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(node.poll() is not None for node in self.nodes):
                raise RuntimeError(f"a Ray node exited: {self.logs()}")
            try:
                done = subprocess.run([sys.executable, "-c", code], env=self.env,
                                      capture_output=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                break
            if done.returncode == 0:
                return
            time.sleep(2)  # the GCS is not up yet
        raise RuntimeError(f"{count} Ray node(s) not up within {timeout}s: {self.logs()}")

    def processes(self) -> list[list[tuple[int, str]]]:
        """Per node: (pid, command line) of every process of its tree."""
        return [[(pid, _cmdline(pid)) for pid in process_tree(node.pid)] for node in self.nodes]

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:]
                         for p in sorted(self.temp_dir.glob("*.log")))

    def stop(self) -> None:
        """Every process of every node, by PID; then anything left with our temp folder."""
        stop_tree([node.pid for node in self.nodes])
        strays = [pid for pid in pids_mentioning(str(self.temp_dir)) if alive([pid])]
        stop_tree(strays, grace=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line names `text` (our private temp folder)."""
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and int(p.name) != os.getpid() and text in _cmdline(int(p.name))]
