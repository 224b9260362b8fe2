"""Crash-safe checkpoints: everything needed to resume a run without recounting.

One file per run folder, `checkpoint.pt`, rewritten atomically after every
round. It holds only tensors and plain Python values and is read back with
`torch.load(weights_only=True)`, so loading a checkpoint never runs pickled
code.

The noise RNG state is stored only for `deterministic-noise` runs (where it
follows from the seed anyway). For real runs the RNG is seeded from OS entropy
and its state stays in memory: with it, anyone holding the checkpoint could
regenerate the noise already added and strip it from the released models. A
resumed real run draws fresh OS entropy, which is just as private.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from dpfl_app.errors import ConfigError
from dpfl_app.run.outputs import write_atomic, write_json

FILENAME = "checkpoint.pt"
LEDGER_FILENAME = "ledger.json"
VERSION = 2
# Keys that may differ between the interrupted run and its resumption. Every
# other key changes what the accountant or the model means, so it must match.
RESUMABLE_CHANGES = frozenset(
    {"resume-from", "round-timeout", "node-wait-timeout", "output-dir", "client-eval"}
)


def save(run_dir: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"version": VERSION, **state}, buffer)
    write_atomic(run_dir / FILENAME, buffer.getvalue())


def save_ledger(run_dir: Path, ledger_state: dict) -> None:
    """Store the ledger durably (write_atomic fsyncs the file and the folder)."""
    write_json(run_dir / LEDGER_FILENAME, ledger_state)


def charged_ledger(run_dir: Path, checkpoint_ledger: dict) -> dict:
    """The ledger to resume with: ledger.json when it charged more rounds than the checkpoint."""
    path = Path(run_dir) / LEDGER_FILENAME
    if not path.exists():
        return checkpoint_ledger
    stored = json.loads(path.read_text())
    return stored if stored.get("rounds", 0) > checkpoint_ledger["rounds"] else checkpoint_ledger


def checkpoint_path(resume_from: str) -> Path:
    """`resume-from` may name the checkpoint file or the run folder holding it."""
    path = Path(resume_from).expanduser().resolve()
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise ConfigError(
            f"run-config key 'resume-from' = {resume_from!r}: no checkpoint found at "
            f"{path}; give a run folder from output-dir or its {FILENAME}"
        )
    return path


def load(resume_from: str, cfg: dict) -> dict:
    """Read a checkpoint and check it can continue under `cfg`."""
    path = checkpoint_path(resume_from)
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ConfigError(f"resume-from: {path} is not a readable checkpoint ({err})") from err
    if state.get("version") != VERSION:
        raise ConfigError(f"resume-from: {path} has version {state.get('version')}, "
                          f"expected {VERSION}")
    old = state["config"]
    changed = sorted(k for k in cfg if k not in RESUMABLE_CHANGES and old.get(k) != cfg[k])
    if changed:
        raise ConfigError(
            "resume-from: the run config differs from the checkpoint's in "
            + ", ".join(f"{k} ({old.get(k)!r} -> {cfg[k]!r})" for k in changed)
            + f"; only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume"
        )
    if state["round"] >= cfg["rounds"]:
        raise ConfigError(f"resume-from: the checkpoint already completed all "
                          f"{cfg['rounds']} rounds; nothing to resume")
    state["run_dir"] = path.parent
    return state
