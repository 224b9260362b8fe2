"""End to end: `flwr run .` with noise-at=clients and zero noise reaches noise-at=server's model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpfl_app.secagg import quantize
from tests.flwr_harness import run_each

pytestmark = pytest.mark.e2e


def test_zero_noise_at_the_clients_equals_zero_noise_at_the_server_through_flwr_run(
        federation, tmp_path):
    """Noise 0, every node in the round (fixed sampling of all 10): the two runs differ
    only by the clients' rounding on the rotated grid and the fixed-point quantization."""
    common = "noise=0.0 rounds=1 clients=10 sampling='fixed' secure-aggregation=true"
    runs = run_each(federation, tmp_path, common,
                    {where: f"noise-at='{where}'" for where in ("server", "clients")})
    (server_results, server, _), (client_results, clients, _) = runs["server"], runs["clients"]
    assert client_results["replies"] == [10]
    assert client_results["accounting"]["noise_at"] == "clients"
    assert client_results["accounting"]["survivors"] == [10]
    (s_rec,), (c_rec,) = server_results["rounds"], client_results["rounds"]
    assert c_rec["next_clip_norm"] == pytest.approx(s_rec["next_clip_norm"], rel=1e-12)
    params = client_results["accounting"]["params"]
    clip, lr, m = s_rec["clip_norm"], server_results["config"]["server-lr"], 10
    rounding = m * math.sqrt(params["padded_dim"]) * clip / (params["scale"] * params["clip"])
    bound = lr / m * (rounding + quantize.sum_error_bound(m, server.size, clip)) + 2 * math.sqrt(
        server.size) * float(np.abs(server).max()) * 2.0**-23
    assert 0 < np.linalg.norm(clients - server) <= bound
