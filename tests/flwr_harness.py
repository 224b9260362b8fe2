"""Run the real `flwr run .` against a private local SuperLink, then stop it.

The logic lives in `dpfl_app.tools.federation`, shared with the noise sweep; the
tests keep importing it from here, with `run_each`, which the end-to-end tests
that compare runs share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dpfl_app.run.outputs import read_diagnostics
from dpfl_app.tools.federation import BIN, PROJECT, FederationError, LocalFederation, RunTimeout

__all__ = ["BIN", "PROJECT", "FederationError", "LocalFederation", "RunTimeout", "FinishedRun",
           "read_run", "run_each"]


class FinishedRun(NamedTuple):
    results: dict  # results.json, plus the operator-only counts "replies" and "protocol"
    model: np.ndarray  # final_model.pt, every tensor flattened into one float64 vector
    logs: str


def read_run(out: Path) -> tuple[dict, np.ndarray]:
    """The run folder under output-dir `out`: its results and final model."""
    import torch  # only the e2e tests read models: the harness itself stays light

    (run_dir,) = [p for p in Path(out).iterdir() if p.is_dir()]
    model = torch.load(run_dir / "final_model.pt", weights_only=True)
    flat = np.concatenate([v.double().numpy().ravel() for v in model.values()])
    results = json.loads((run_dir / "results.json").read_text())
    diagnostics = read_diagnostics(run_dir)  # exact counts: operator-only
    results["replies"] = [d["num_replies"] for d in diagnostics]
    results["protocol"] = [d.get("secure_aggregation") for d in diagnostics]
    return results, flat


def run_each(federation: LocalFederation, tmp_path: Path, common: str,
             variants: dict[str, str], timeout: float = 900) -> dict[str, FinishedRun]:
    """`flwr run .` once per variant, one after the other: the run config is `common`
    plus the variant's keys, with output under tmp_path/<variant name>. Fails with the
    run's last log lines unless every run completes."""
    runs = {}
    for name, config in variants.items():
        out = tmp_path / name
        run_id = federation.submit(f"{common} {config} output-dir='{out}'")
        status = federation.wait(run_id, timeout=timeout)
        logs = federation.logs(run_id)
        assert status == "finished:completed", logs[-3000:]
        runs[name] = FinishedRun(*read_run(out), logs)
    return runs
