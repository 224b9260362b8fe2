"""(b), (c) The real app: `flwr run .` on a private local simulation SuperLink, timed.

Round times come from the run folder: the ServerApp rewrites results.json
after every round, so polling its modification (cheap `stat` calls) stamps
each round without touching Flower. Memory is the peak of the summed RSS of
every process that carries this federation's FLWR_HOME in its environment:
SuperLink, SuperExec, the simulation process (ServerApp), Ray's raylet, GCS,
agents and client actors. CPU seconds are summed per program, which shows
where the machine's time went.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from dpfl_app.tools.federation import LocalFederation

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _program(cmdline: bytes) -> str | None:
    """A short name for a process: its script or binary (`raylet`, `flwr-simulation`).

    Ray workers retitle themselves (`ray::ClientAppActor.run`): the method is
    dropped. None for a zombie, whose command line is empty.
    """
    args = [a for a in cmdline.split(b"\0") if a and not a.startswith(b"-")]
    names = [Path(a.decode(errors="replace")).name for a in args[:2]]
    if not names:
        return None
    name = names[1] if len(names) > 1 and names[0].startswith("python") else names[0]
    return name.split(".")[0] if name.startswith("ray::") else name


class TreeSampler(threading.Thread):
    """Polls /proc for the processes of one FLWR_HOME: peak total RSS, CPU per program."""

    def __init__(self, home: Path, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.marker = f"FLWR_HOME={home}".encode() + b"\0"
        self.interval = interval
        self.peak_rss = 0
        self.cpu: dict[tuple[int, bytes], tuple[str, float]] = {}  # (pid, start) -> program, s
        self._ours: dict[tuple[int, bytes], bool] = {}
        self._halt = threading.Event()

    def sample(self) -> None:
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            stat = _read(f"/proc/{entry.name}/stat").rsplit(b")", 1)[-1].split()
            if len(stat) < 22:
                continue
            key = (int(entry.name), stat[19])  # pid and start time: pids get reused
            if key not in self._ours:
                environ = _read(f"/proc/{entry.name}/environ") + b"\0"
                self._ours[key] = self.marker in environ
            if not self._ours[key]:
                continue
            # Re-read: a Ray worker renames itself (setup_worker.py -> ray::ClientAppActor).
            program = (_program(_read(f"/proc/{entry.name}/cmdline"))
                       or self.cpu.get(key, ("?",))[0])
            self.cpu[key] = (program, (int(stat[11]) + int(stat[12])) / TICKS)
            total += int((_read(f"/proc/{entry.name}/statm").split() or [0, 0])[1]) * PAGE
        self.peak_rss = max(self.peak_rss, total)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join()
        by_program: dict[str, float] = defaultdict(float)
        for program, seconds in self.cpu.values():
            by_program[program] += seconds
        return dict(sorted(by_program.items(), key=lambda kv: -kv[1]))


def _rounds_done(run_dir: Path) -> int:
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return -1
    return sum("test_accuracy" in r for r in results["rounds"])


def run_app(home: Path, population: int, run_config: str, rounds: int,
            timeout: float = 900.0, env: dict | None = None,
            client_cpus: float | None = None, ray_cpus: int | None = None) -> dict:
    """One `flwr run .` with `rounds` rounds on `population` SuperNodes; its timings.

    `client_cpus` overrides the CPUs per client actor (1, see .flwr/config.toml);
    `ray_cpus` tells Ray how many CPUs to share out (default: the machine's),
    so that ray_cpus / client_cpus client actors run.
    """
    fed = LocalFederation(home, num_supernodes=population)
    fed.env.update(env or {})
    if client_cpus is not None:
        fed.federation_config["client-resources-num-cpus"] = int(client_cpus)
    if ray_cpus is not None:
        fed.federation_config["init-args-num-cpus"] = int(ray_cpus)
    out = Path(tempfile.mkdtemp(dir=home, prefix="out-"))  # never an older run's folder
    sampler = TreeSampler(home)
    sampler.start()
    launched = time.time()  # wall clock: compared with file modification times
    try:
        run_id = fed.submit(f"rounds={rounds} output-dir='{out}'", run_config)
        submitted = time.time() - launched
        watched = _watch(out, lambda: fed.status(run_id), launched + timeout)
        if watched["status"] == "completed":
            watched["status"] = _wait_finished(fed, run_id)
        elif watched["status"] == "running":
            fed.flwr("stop", str(run_id), "local")
        log_bytes = len(fed.logs(run_id).encode())
    finally:
        cpu = sampler.stop()
        fed.stop()
    stamps = [t - launched for t in watched["round_written"]]
    server_start = watched["server_start"]
    run_dir = next((p for p in out.iterdir() if p.is_dir()), None)
    return {"stage_s": _stage_seconds(run_dir), "status": watched["status"], "submit_s": submitted,
            "server_start_s": server_start - launched if server_start else None,
            "round_done_s": stamps, "first_round_s": stamps[0] if stamps else None,
            "round_s": _steady(stamps), "total_s": watched["ended"] - launched,
            "peak_rss_mb": sampler.peak_rss / 2**20, "cpu_s": cpu, "log_bytes": log_bytes}


def _stage_seconds(run_dir: Path | None) -> dict[str, float]:
    """Secure aggregation: the mean wall time of each exchange after round 1, from the
    operator diagnostics (empty for a plain run)."""
    from dpfl_app.run.outputs import read_diagnostics  # pylint: disable=import-outside-toplevel

    stages: dict[str, list[float]] = defaultdict(list)
    for record in (read_diagnostics(run_dir) if run_dir is not None else [])[1:]:
        for stage, seconds in record.get("secure_aggregation", {}).get(
                "stage_seconds", {}).items():
            stages[stage].append(seconds)
    return {stage: round(sum(v) / len(v), 3) for stage, v in stages.items()}


def _watch(out: Path, status, deadline: float, status_interval: float = 10.0) -> dict:
    """Stamp each round by results.json's modification time, until privacy.md appears.

    The recorder rewrites results.json once per round, so each new mtime is one
    round, timed by the writer itself however late this poller wakes up.
    """
    found = {"status": "running", "server_start": None, "round_written": []}
    finished: list[str] = []  # set by a thread: `flwr ls` takes seconds, stat calls must not wait
    done = threading.Event()  # set when watching ends: no `flwr ls` after that

    def check_status() -> None:  # a failed run writes nothing more: only Flower knows
        # Wake on `done`, not after a blind sleep: once the caller has stopped the
        # SuperLink, a `flwr ls` would start a new one that nobody stops.
        while not done.wait(status_interval) and time.time() < deadline:
            if (current := status()).startswith("finished"):
                finished.append(current)
                return

    checker = threading.Thread(target=check_status, daemon=True)
    checker.start()
    run_dir, last_mtime = None, None
    while time.time() < deadline and not finished:
        time.sleep(0.02)
        if run_dir is None:
            run_dir = next((p for p in out.iterdir() if p.is_dir()), None)
            found["server_start"] = run_dir and run_dir.stat().st_mtime
        if run_dir is not None:
            try:
                mtime = (run_dir / "results.json").stat().st_mtime
            except OSError:
                mtime = None
            if mtime != last_mtime and (count := _rounds_done(run_dir)) > len(
                    found["round_written"]):
                last_mtime = mtime
                if mtime is None or mtime < max(found["round_written"] or [0]):
                    mtime = time.time()  # the run ended: its files got the start time back
                found["round_written"] += [mtime] * (count - len(found["round_written"]))
            if (run_dir / "privacy.md").exists():  # the ServerApp's last write
                found["status"] = "completed"
                break
    found["ended"] = time.time()
    done.set()
    checker.join()  # a `flwr ls` in flight ends before the caller stops the SuperLink
    if finished and found["status"] == "running":
        found["status"] = finished[0]
    return found


def _wait_finished(fed: LocalFederation, run_id: int, timeout: float = 60) -> str:
    """The run's final status, once Flower has recorded it."""
    deadline = time.monotonic() + timeout
    while not (status := fed.status(run_id)).startswith("finished"):
        if time.monotonic() > deadline:
            return status
        time.sleep(1)
    return status


def _steady(stamps: list[float]) -> float | None:
    """Mean time per round after round 1 (which pays start-up): (t_R - t_1) / (R - 1).

    Only the first and last stamps count, so a round the poller saw late (a
    busy machine) shifts no average.
    """
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
