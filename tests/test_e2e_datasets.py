"""End to end: `flwr run .` on a local copy of MNIST (synthetic, real schema) via `data-dir`."""

from __future__ import annotations

import json

import pytest
import torch

from tests.data.test_data import N_TEST, write_copy

pytestmark = pytest.mark.e2e


NUM_SUPERNODES = 4  # the `federation` fixture (conftest.py) reads it


def test_mnist_from_data_dir_dirichlet_runs_offline(federation, tmp_path):
    copy = write_copy(tmp_path / "mnist-data", "mnist")  # as `hf download` leaves it
    out = tmp_path / "out"
    run_id = federation.submit(
        f"dataset='mnist' partitioning='dirichlet' rounds=2 clients=2 "
        f"data-dir='{copy}' output-dir='{out}' deterministic-noise=true"
    )  # the harness sets HF_DATASETS_OFFLINE=1: nothing may come from the Hub
    status = federation.wait(run_id, timeout=240)
    assert status == "finished:completed", federation.logs(run_id)[-3000:]

    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["dataset"] == "mnist"
    assert results["config"]["data-dir"] == str(copy)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert 0.0 <= results["final"]["test_accuracy"] <= 1.0
    # the global model is MNIST's CNN, which only runs on 28x28 images: the server
    # tested on the copy's test split, and a tenth of 50 images is a whole number
    state = torch.load(run_dir / "final_model.pt")
    assert state["features.0.weight"].shape == (16, 1, 5, 5)
    assert (results["final"]["test_accuracy"] * N_TEST) % 1 == pytest.approx(0, abs=1e-6)
