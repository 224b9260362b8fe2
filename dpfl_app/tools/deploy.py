"""A complete Flower deployment on 127.0.0.1: one SuperLink, N SuperNodes, the app.

    dpfl deploy --nodes 3 --tls --auth --run-config "rounds=2 clients=2"

does on one machine what deploy/README.md tells the server and the sites to
do on theirs: certificates (deploy/make_certs.sh), SuperNode keys and their
registration, `flower-superlink`, N `flower-supernode`s each with its own
port and node config, `flwr run . local-deployment`, and a teardown that stops
every process it started, by PID. The end-to-end tests drive the same class.

Every process is started in a session of its own, so the processes it spawns
(`flower-superexec`, `flwr-serverapp`, `flwr-clientapp`) can be found, and
stopped, by session id, also when their parent was killed (Linux /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from dpfl_app.tools.federation import BIN, PROJECT, FederationError, LocalFederation, _free_port
from dpfl_app.data.node_data import export_partition
from dpfl_app.tools.cli import HelpFormatter

MAKE_CERTS = PROJECT / "deploy" / "make_certs.sh"
HOST = "127.0.0.1"


class DeploymentError(FederationError):
    """A deployment process did not start, or did not come up in time."""


def session_processes(sessions: set[int]) -> dict[int, str]:
    """Live (non-zombie) processes in `sessions`: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # fields after "(comm)": state ppid pgrp session ...
            state, _, _, session = stat[stat.rindex(")") + 2:].split()[:4]
            if int(session) in sessions and state != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(
                    b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            continue  # the process ended while we looked
    return found


def _has_torch(pid: int) -> bool:
    """Whether process `pid` has mapped torch's C++ library (Linux /proc)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


class LocalDeployment(LocalFederation):
    """SuperLink and SuperNodes on 127.0.0.1, each in its own folder under `workdir`.

    `tls` serves the SuperLink over TLS with a private CA; `auth` (implies TLS)
    accepts only SuperNodes whose public keys were registered with
    `flwr supernode register`. The `flwr` CLI gets its own FLWR_HOME
    (workdir/cli) with one connection, `local-deployment`.
    """

    connection = "local-deployment"
    local_superlink = False  # its own flower-superlink (start_superlink), not Flower's local one

    def __init__(self, workdir: Path, tls: bool = False, auth: bool = False) -> None:
        self.workdir = Path(workdir).resolve()
        super().__init__(self.workdir / "cli")  # the CLI's FLWR_HOME and environment
        self.federation_config = {}  # real SuperNodes, not a simulation
        self.tls, self.auth = tls or auth, auth  # flwr refuses auth without TLS
        self.address = f"{HOST}:{_free_port()}"
        self.certs = self.workdir / "certs"
        self.procs: dict[str, subprocess.Popen] = {}  # "superlink", "node-0", ...
        security = (f'root-certificates = "{self.certs / "ca.crt"}"' if self.tls
                    else "insecure = true")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n'
            f'[superlink.{self.connection}]\naddress = "{self.address}"\n{security}\n'
        )

    # --- processes --------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start `args` in workdir/name (its working directory and FLWR_HOME), logging there."""
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "log.txt", "w") as log:
            proc = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]], cwd=folder, stdout=log,
                stderr=subprocess.STDOUT, env={**self.env, "FLWR_HOME": str(folder)},
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.workdir / name / "log.txt").read_text(errors="replace")

    def start_superlink(self, timeout: float = 60) -> None:
        """Start the SuperLink (Fleet, Control and Runtime APIs on one port); wait for it."""
        if self.tls:
            self.certs.mkdir(parents=True, exist_ok=True)
            subprocess.run(["bash", str(MAKE_CERTS), str(self.certs)], check=True,
                           capture_output=True, timeout=60)
            security = ["--ssl-ca-certfile", str(self.certs / "ca.crt"),
                        "--ssl-certfile", str(self.certs / "server.pem"),
                        "--ssl-keyfile", str(self.certs / "server.key")]
        else:
            security = ["--insecure"]
        host, port = self.address.split(":")
        # The app runs in this environment: no per-run `uv sync` (deploy/README.md §0).
        args = ["flower-superlink", *security, "--disable-runtime-dependency-installation",
                "--host", host, "--port", port]
        proc = self._spawn("superlink", args + ["--enable-supernode-auth"] * self.auth)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        raise DeploymentError(f"the SuperLink did not come up on {self.address} within "
                              f"{timeout}s:\n{self.log('superlink')[-3000:]}")

    def make_key(self, name: str) -> Path:
        """A SuperNode's ECDSA key pair (workdir/keys/name and name.pub)."""
        key = self.workdir / "keys" / name
        key.parent.mkdir(parents=True, exist_ok=True)
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "",
                            "-C", name, "-f", str(key)], check=True, timeout=60)
        return key

    def secagg_identities(self, names: list[str]) -> dict[str, str]:
        """Each member's secure-aggregation identity key and one pinned list, as node-config.

        On one machine the "out of band" exchange is a folder; across sites it is the
        members swapping their public entries (`dpfl secagg-keys`, deploy/README.md).
        """
        from dpfl_app.tools.secagg_keys import new_member, pin  # pylint: disable=import-outside-toplevel

        folder = self.workdir / "identity"
        entries = [new_member(name, folder)[1] for name in names]
        pinned = folder / "pinned-keys.json"
        pin(entries, pinned)
        return {name: f'secagg-identity-key="{folder / name}.pem" '
                      f'secagg-pinned-keys="{pinned}"' for name in names}

    def register(self, public_key: Path) -> None:
        out = self.flwr("supernode", "register", str(public_key), self.connection)
        if "registered successfully" not in out.stdout:
            raise DeploymentError(f"could not register {public_key}:\n{out.stdout}{out.stderr}")

    def start_supernode(self, name: str, node_config: str,
                        register: bool = True) -> subprocess.Popen:
        """A SuperNode with its own Runtime API port; with auth, its key (registered or not)."""
        security = (["--root-certificates", str(self.certs / "ca.crt")] if self.tls
                    else ["--insecure"])
        args = ["flower-supernode", *security, "--superlink", self.address,
                "--port", str(_free_port()), "--node-config", node_config]
        if self.auth:
            key = self.make_key(name)
            if register:
                self.register(key.parent / f"{key.name}.pub")
            args += ["--auth-supernode-private-key", str(key)]
        return self._spawn(name, args)

    def online_nodes(self) -> int:
        out = self.flwr("supernode", "ls", self.connection, "--format", "json")
        try:
            return sum(n["status"] == "online" for n in json.loads(out.stdout)["nodes"])
        except (ValueError, KeyError) as err:
            raise DeploymentError(f"flwr supernode ls failed:\n{out.stdout}{out.stderr}") from err

    def wait_online(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while (online := self.online_nodes()) < count:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}:\n{self.log(n)[-1500:]}" for n in dead)
                raise DeploymentError(f"{online} of {count} SuperNodes online; "
                                      f"exited: {dead or 'none'}\n{logs}")
            time.sleep(1)

    def training_nodes(self) -> list[str]:
        """SuperNodes now training: a `flwr-clientapp` in their session that has loaded
        torch. Only training imports it; the secure-aggregation stages that do not
        train stay torch-free (they cold-start a process per message)."""
        return [name for name, proc in self.procs.items() if name != "superlink"
                and any("flwr-clientapp" in cmd and _has_torch(pid)
                        for pid, cmd in session_processes({proc.pid}).items())]

    def kill(self, name: str) -> None:
        """Crash a process: SIGKILL, no goodbye (its children are left behind)."""
        self.procs[name].kill()
        self.procs[name].wait(timeout=10)

    # --- teardown ---------------------------------------------------------------
    def leftovers(self) -> dict[int, str]:
        """Processes this deployment started, or that they started, still alive."""
        return session_processes({proc.pid for proc in self.procs.values()})

    def stop_runs(self) -> None:
        """`flwr stop` unfinished runs: the SuperLink otherwise waits ~50 s for their streams."""
        if "superlink" not in self.procs or self.procs["superlink"].poll() is not None:
            return
        out = self.flwr("ls", self.connection, "--format", "json", timeout=60)
        try:
            runs = json.loads(out.stdout)["runs"]
        except (ValueError, KeyError):
            return  # no SuperLink to ask: nothing to stop
        for run in runs:
            if not run["status"].startswith("finished"):
                self.flwr("stop", run["run-id"], self.connection, timeout=60)

    def stop(self, grace: float = 20) -> None:
        """Stop runs, SuperNodes, then the SuperLink, and everything they spawned, by PID."""
        self.stop_runs()
        for name in sorted(self.procs, key=lambda n: n == "superlink"):  # SuperLink last
            try:
                os.killpg(self.procs[name].pid, signal.SIGTERM)  # the session's group
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.5)
        # SuperExecs of a killed SuperNode linger up to ~30 s: don't wait for them.
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            proc.wait(timeout=10)  # reap our children

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def rounds_done(output_dir: Path, run_id: int) -> int:
    """Rounds in run `run_id`'s results.json under `output_dir` (0 before the first)."""
    for results in output_dir.glob(f"*-run{run_id}*/results.json"):
        # the run folder is <date>-<time>-run<id>[-<n>]: not run<id>5, another run
        if results.parent.name.partition("-run")[2].split("-")[0] == str(run_id):
            try:
                return len(json.loads(results.read_text())["rounds"])
            except (ValueError, KeyError):
                return 0  # not written yet
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dpfl deploy", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes to start")
    parser.add_argument("--tls", action="store_true", help="TLS with a private CA")
    parser.add_argument("--auth", action="store_true",
                        help="SuperNode authentication (implies --tls)")
    parser.add_argument("--unregistered-node", action="store_true",
                        help="with --auth: also start an unregistered SuperNode, to see it refused")
    parser.add_argument("--node-data", choices=("partitions", "local"), default="partitions",
                        help="local: each node gets a data-path folder (an exported partition)")
    parser.add_argument("--secagg-identities", action="store_true",
                        help="give every SuperNode a pinned secure-aggregation identity key")
    parser.add_argument("--run-config", default="rounds=2 clients=2",
                        help="passed to `flwr run` (output-dir and node-data are set here)")
    parser.add_argument("--workdir", type=Path, default=Path("deployment"),
                        help="folders, logs, certificates, keys and outputs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the run")
    args = parser.parse_args(argv)
    if args.unregistered_node and not args.auth:
        parser.error("--unregistered-node needs --auth (without it every SuperNode is accepted)")
    import datasets

    datasets.disable_progress_bars()  # export_partition's parquet writer
    start = time.monotonic()
    say = lambda text: print(f"[{time.monotonic() - start:6.1f}s] {text}", flush=True)  # noqa: E731
    outputs = args.workdir.resolve() / "outputs"
    with LocalDeployment(args.workdir, tls=args.tls, auth=args.auth) as dep:
        dep.start_superlink()
        say(f"SuperLink on {dep.address} (tls={dep.tls}, auth={dep.auth}); "
            f"logs in {dep.workdir}/<process>/log.txt")
        names = [f"node-{i}" for i in range(args.nodes)]
        identities = dep.secagg_identities(names) if args.secagg_identities else {}
        for i in range(args.nodes):
            if args.node_data == "local":
                site = export_partition(dep.workdir / "sites" / f"site-{i}", "digits", i,
                                        args.nodes)
                node_config = f'data-path="{site}"'
            else:
                node_config = f"partition-id={i} num-partitions={args.nodes}"
            dep.start_supernode(f"node-{i}", " ".join(
                [node_config, identities.get(f"node-{i}", "")]).strip())
        dep.wait_online(args.nodes)
        say(f"{args.nodes} SuperNodes online")
        if args.unregistered_node and args.auth:
            intruder = dep.start_supernode("unregistered", "partition-id=0 num-partitions=1",
                                           register=False)
            code = intruder.wait(timeout=120)
            refusal = [ln for ln in dep.log("unregistered").splitlines() if "[code:" in ln]
            say(f"unregistered SuperNode refused: exit code {code}, {refusal}")
        run_id = dep.submit(args.run_config,
                            f"output-dir='{outputs}' node-data='{args.node_data}'")
        say(f"run {run_id} submitted; watch it with: FLWR_HOME={dep.home} "
            f"flwr log {run_id} {dep.connection}")
        seen = 0

        def progress() -> None:
            nonlocal seen
            if (done := rounds_done(outputs, run_id)) > seen:
                seen = done
                say(f"round {done} done")

        status = dep.wait(run_id, args.timeout, on_poll=progress, interval=3)
        progress()
        say(f"run {run_id}: {status}; results in {outputs}")
    say(f"stopped; processes left: {len(dep.leftovers())}")


if __name__ == "__main__":
    main()
