"""End to end: `flwr run .` with secure aggregation on and off reaches the same model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpfl_app.secagg import quantize
from tests.flwr_harness import run_each

pytestmark = pytest.mark.e2e


def test_secure_aggregation_on_and_off_end_at_the_same_model(federation, tmp_path):
    """Noise 0, same seed, every node in every round (fixed sampling of all 10), so
    both runs see the same cohorts whatever node IDs the simulation assigns."""
    common = "noise=0.0 rounds=2 clients=10 sampling='fixed' deterministic-noise=true"
    runs = run_each(federation, tmp_path, common,
                    {secure: f"secure-aggregation={secure}" for secure in ("false", "true")})
    for run in runs.values():
        assert "secure aggregation:" not in run.logs  # protocol counts: diagnostics only
    (plain_results, plain, _), (secure_results, secure, _) = runs["false"], runs["true"]
    assert secure_results["replies"] == [10, 10]
    assert [(p["masked_inputs"], p["sum_released"]) for p in secure_results["protocol"]] == [
        (10, True), (10, True)]
    assert [r["next_clip_norm"] for r in secure_results["rounds"]] == [
        r["next_clip_norm"] for r in plain_results["rounds"]]
    # Per round the mean moves by at most server-lr/m times the sum's quantization
    # bound; round 2 trains from that model. Both are far below float32 resolution,
    # so the models agree to storage rounding (2**-23 relative per coordinate, twice).
    lr = plain_results["config"]["server-lr"]
    per_round = lr / 10 * quantize.sum_error_bound(10, plain.size, max(
        r["clip_norm"] for r in plain_results["rounds"]))
    storage = 2 * math.sqrt(plain.size) * float(np.abs(plain).max()) * 2.0**-23
    assert np.linalg.norm(secure - plain) <= 2 * per_round + storage
