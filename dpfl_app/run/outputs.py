"""The run folder: results.json, rounds.csv, final_model.pt, privacy.md.

Every file is written atomically (write a temporary file, then rename), so a
run killed mid-write never leaves a truncated or corrupted result behind.

All of these may be shared: they hold only what the DP guarantee covers. The
exact per-round counts and rejection reasons go to DIAGNOSTICS_FILE alone,
whose name says it is for the operator only.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

# Every per-round field of results.json:
# docs/output.md's per-round table lists the same (tests/test_first_run.py).
ROUND_COLUMNS = (
    "round", "test_loss", "test_accuracy", "epsilon", "epsilon_rdp", "epsilon_pld",
    "clip_norm", "next_clip_norm", "noise_std", "noisy_unclipped_fraction",
    "epsilon_if_noise_secret",  # deterministic-noise runs only (their epsilon is inf)
    "rounds_accounted",
    "record_epsilon", "record_epsilon_rdp",  # record-level DP-SGD runs only (unit: one record)
)
# Exact cohort sizes, reply counts and rejected replies with node ids: not
# covered by the DP guarantee (with Poisson sampling the cohort size itself
# reveals participation). Never copy them into a shared file.
DIAGNOSTICS_FILE = "operator-diagnostics-DO-NOT-SHARE.jsonl"
# Client-side evaluation (client-eval=true): computed on private data, not noised.
CLIENT_EVAL_FILE = "client-eval-NOT-DP-DO-NOT-SHARE.jsonl"


def make_run_dir(output_dir: str, run_id: int | str) -> Path:
    """A new folder `<output-dir>/<timestamp>-run<id>`, never reusing one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(output_dir).expanduser().resolve() / f"{stamp}-run{run_id}"
    suffix = 0
    while path.exists():
        suffix += 1
        path = path.with_name(f"{stamp}-run{run_id}-{suffix}")
    path.mkdir(parents=True)
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    # The rename itself must survive a power loss too: sync the folder's entry.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _json_safe(value: Any) -> Any:
    """JSON has no inf/NaN: write them as strings ("inf") rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, payload: dict) -> None:
    write_atomic(path, json.dumps(_json_safe(payload), indent=2).encode())


def write_rounds_csv(path: Path, rounds: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROUND_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rounds)
    write_atomic(path, buffer.getvalue().encode())


def write_diagnostics(run_dir: Path, rounds: list[dict]) -> None:
    """One JSON line per round, for the operator only (DIAGNOSTICS_FILE)."""
    write_jsonl(run_dir / DIAGNOSTICS_FILE, rounds)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(_json_safe(r)) + "\n" for r in rows).encode())


def read_diagnostics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / DIAGNOSTICS_FILE)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_model(path: Path, state_dict: dict) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    write_atomic(path, buffer.getvalue())


def settle_timestamps(run_dir: Path | None) -> None:
    """Give every file and folder of the run the run's start time as its mtime and atime.

    Each round rewrites rounds.csv, results.json, ledger.json and the plots, so
    their modification times would otherwise show when the last rounds ended:
    a timing channel for anyone who receives the folder with its metadata.
    The start time is public already: it is the folder's name.
    """
    if run_dir is None or not Path(run_dir).exists():
        return
    run_dir = Path(run_dir)
    try:
        start = time.mktime(time.strptime(run_dir.name[:15], "%Y%m%d-%H%M%S"))
    except ValueError:  # not a folder make_run_dir named
        start = 0.0
    for folder, _, files in os.walk(run_dir, topdown=False):
        for name in files:
            os.utime(Path(folder) / name, (start, start), follow_symlinks=False)
        os.utime(folder, (start, start))
