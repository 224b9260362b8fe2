"""noise-at=clients through the real ServerApp and ClientApp, in one process."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dpfl_app.privacy import distributed_accounting as dacc
from dpfl_app.privacy.distributed import DistributedDpParams
from dpfl_app.run.outputs import read_diagnostics
from dpfl_app.secagg import quantize
from tests.inprocess import default_run_config, run_server

CLIENT_NOISE = {"secure-aggregation": True, "noise-at": "clients"}


def _config(tmp_path, name, **overrides):
    base = {"output-dir": str(tmp_path / name), "rounds": 1, "sampling": "fixed",
            "clients": 10}
    return default_run_config(**{**base, **overrides})


def _outputs(tmp_path, name):
    (run_dir,) = list((tmp_path / name).iterdir())
    model = torch.load(run_dir / "final_model.pt", weights_only=True)
    return json.loads((run_dir / "results.json").read_text()), model, run_dir


def _flat(model) -> np.ndarray:
    return np.concatenate([v.double().numpy().ravel() for v in model.values()])


def _params(accounting) -> DistributedDpParams:
    p = accounting["params"]
    return DistributedDpParams(p["clip"], p["dim"], p["scale"], p["bits"], p["share_variance"],
                               p["count_share_variance"], p["threshold"], p["beta"])


def test_zero_noise_at_the_clients_equals_zero_noise_at_the_server_within_the_rounding(tmp_path):
    run_server(_config(tmp_path, "server", noise=0.0, **{"secure-aggregation": True}))
    grid = run_server(_config(tmp_path, "clients", noise=0.0, **CLIENT_NOISE))
    assert {m.metadata.message_type for m in grid.sent} == {
        "query.secagg_enrol", "query.secagg_share_keys", "train.secagg",
        "query.secagg_consistency", "query.secagg_unmask"}
    train = [m for m in grid.sent if m.metadata.message_type == "train.secagg"]
    config = train[0].content["config"]
    assert config["dp-noise-at"] == "clients" and len(config["dp-rotation-seed"]) == 32
    server, a, _ = _outputs(tmp_path, "server")
    clients, b, _ = _outputs(tmp_path, "clients")
    (s_rec,), (c_rec,) = server["rounds"], clients["rounds"]
    assert c_rec["sum_released"] is True
    assert c_rec["next_clip_norm"] == pytest.approx(s_rec["next_clip_norm"], rel=1e-12)
    a, b = _flat(a), _flat(b)
    params = _params(clients["accounting"])
    assert params.share_variance == 0 and clients["final"]["epsilon"] == "inf"
    m, lr, clip = 10, server["config"]["server-lr"], s_rec["clip_norm"]
    # Each client's rounding moves each of the d' rotated coordinates by < 1 grid step
    # (1/gamma_t = C_t/(gamma C) in model units); the server path's own bound; float32.
    rounding = m * math.sqrt(params.padded_dim) * clip / params.scale
    bound = lr / m * (rounding + quantize.sum_error_bound(m, a.size, clip)) + math.sqrt(
        a.size) * float(np.abs(a).max()) * 2.0**-22
    assert 0 < np.linalg.norm(a - b) <= bound
    assert np.linalg.norm(a - b) < 1e-3 * np.linalg.norm(a)


def test_rounds_are_accounted_with_the_survivors_noise_down_to_the_threshold(tmp_path):
    """m = 10, t = 8: two dropouts leave 8 survivors (released, 8 shares accounted);
    three leave 7 (withheld: nothing released, nothing charged, the model stays)."""
    run_server(_config(tmp_path, "eight", noise=1.0, rounds=1, **CLIENT_NOISE),
               drop_at={"train.secagg": {1, 2}})
    results, _, run_dir = _outputs(tmp_path, "eight")
    acc = results["accounting"]
    assert acc["noise_at"] == "clients" and acc["threshold"] == 8 and acc["survivors"] == [8]
    params = _params(acc)
    expected = dacc.DistributedAccountant(params, 1e-5, "fixed", 1.0)
    expected.compose_round(8)
    assert results["final"]["epsilon"] == pytest.approx(expected.epsilons()["with_sampling"])
    everyone = dacc.DistributedAccountant(params, 1e-5, "fixed", 1.0)
    everyone.compose_round(10)
    assert results["final"]["epsilon"] > everyone.epsilons()["with_sampling"] * 1.05
    (rec,) = results["rounds"]
    assert rec["noise_std"] == pytest.approx(
        math.sqrt(8 * params.share_variance) * rec["clip_norm"] / params.scale / 10)
    assert rec["epsilon_client_bound"] == pytest.approx(
        dacc.client_epsilon(params, 1, 1e-5, "fixed"))
    for key in ("bits", "scaled_clip", "noise_per_client", "with_sampling", "without_sampling",
                "client_bound"):
        assert key in acc
    (diag,) = read_diagnostics(run_dir)
    assert diag["secure_aggregation"]["sum_released"] and diag["num_replies"] == 8
    # the decode gave the model's d values; the noised sum's largest value, against 2^(b-1)
    used = diag["client_noise"]
    assert used["decoded_values"] == params.dim
    assert used["half_modulus"] == 2 ** (params.bits - 1) and 0 < used["largest_centred"]

    report = (run_dir / "privacy.md").read_text()  # both figures, and the clients' bound
    assert "trusting the server's sampling" in report and "Without trusting" in report
    assert "own bound" in report and f"{params.bytes_per_client} bytes per client" in report
    assert acc["with_sampling"] <= acc["without_sampling"] <= acc["client_bound"]

    run_server(_config(tmp_path, "seven", noise=1.0, rounds=1, **CLIENT_NOISE),
               drop_at={"train.secagg": {1, 2, 3}})
    results, model, run_dir = _outputs(tmp_path, "seven")
    (rec,) = results["rounds"]
    assert rec["sum_released"] is False and rec["noisy_unclipped_fraction"] is None
    assert rec["next_clip_norm"] == rec["clip_norm"]
    assert results["accounting"]["survivors"] == [] and results["accounting"]["withheld_rounds"] == 1
    assert results["final"]["epsilon"] == 0.0
    # nothing released: the model is the initial one (same test loss as round 0)
    assert rec["test_loss"] == results["initial"]["test_loss"]
    (diag,) = read_diagnostics(run_dir)
    assert diag["secure_aggregation"]["sum_released"] is False


def test_a_client_refuses_when_its_own_bound_exceeds_its_max_epsilon(tmp_path):
    cfg = _config(tmp_path, "out", noise=1.0, rounds=1, **CLIENT_NOISE)
    strict = {node: {"max-epsilon": 5.0} for node in (1, 2, 3)}
    run_server(cfg, node_config=strict)
    results, _, run_dir = _outputs(tmp_path, "out")
    params = _params(results["accounting"])
    own = dacc.client_epsilon(params, 1, 1e-5, "fixed")
    assert own > 5.0
    reasons = [r["reason"] for d in read_diagnostics(run_dir) for r in d["rejected"]]
    first = [r for r in reasons if "secagg_share_keys" in r]
    assert len(first) == 3 and all("own epsilon" in r and "max-epsilon=5.0" in r
                                       for r in first)
    # the 7 others then refuse to sign a survivor set below t = 8: nothing is unmasked
    consistency = [r for r in reasons if "secagg_consistency" in r]
    assert len(consistency) == 7 and all("fewer than the 8" in r for r in consistency)
    assert results["accounting"]["survivors"] == []  # withheld
    lenient = {node: {"max-epsilon": own * 1.01} for node in range(1, 11)}
    run_server(_config(tmp_path, "ok", noise=1.0, rounds=1, **CLIENT_NOISE),
               node_config=lenient)
    results, _, _ = _outputs(tmp_path, "ok")
    assert results["accounting"]["survivors"] == [10]


@pytest.mark.parametrize("factor", [1.0, 0.1])
def test_the_canary_audit_stays_below_the_accounted_epsilon_and_flags_a_tenth_of_the_noise(
        tmp_path, monkeypatch, factor):
    """Canaries join the decoded sum, so they see exactly the survivors' noise, the noise
    the round is accounted with (a canary cannot hold SecAgg keys; as a client without a
    share it is the honest equivalent: the noise it sees is what any client's input sees).
    Clients that add a tenth of their share variance must be caught: the estimate's 95 %
    interval then lies above the accounted epsilon. Seeds fixed: shares and canaries."""
    from dpfl_app.client import client_noise
    from dpfl_app.strategy import canaries

    rng = np.random.default_rng(2026)
    share = client_noise.skellam.noise_share
    monkeypatch.setattr(client_noise.skellam, "noise_share",
                        lambda size, variance, _=None: share(size, variance * factor, rng))
    monkeypatch.setattr(canaries, "canary_seed", lambda _: 7)
    # Poisson with m = N = 10 (q = 1: no amplification), one round, z = 2, 200 canaries
    run_server(_config(tmp_path, "out", noise=2.0, sampling="poisson",
                       **{"audit-canaries": 200}, **CLIENT_NOISE))
    results, _, _ = _outputs(tmp_path, "out")
    audit = results["audit"]
    assert audit["accounted_epsilon"] == pytest.approx(results["final"]["epsilon"])
    if factor == 1.0:
        assert audit["verdict"] in ("below", "above-within-error")
        assert audit["epsilon_ci95"][0] <= audit["accounted_epsilon"]
    else:
        assert audit["verdict"] == "above" and audit["epsilon"] > 2 * audit["accounted_epsilon"]


def test_the_server_reads_only_packed_b_bit_inputs():
    """A masked input travels as ceil((d' + 1) b / 8) bytes (what `bytes_per_client` reports);
    the old 64-bit words, or a wrong length, are malformed (the in-process runs above show
    that the clients send what the server reads)."""
    from dpfl_app.secagg import discrete
    from dpfl_app.strategy.client_noise import ClientNoiseDPFedAvg

    params = DistributedDpParams(clip=1.0, dim=650, scale=100.0, bits=18, share_variance=1.0,
                                 count_share_variance=1.0, threshold=8)
    strategy = ClientNoiseDPFedAvg.__new__(ClientNoiseDPFedAvg)  # read_input needs only this
    strategy.client_noise = params
    residues = np.random.default_rng(0).integers(0, 2**18, size=1025, dtype=np.uint64)
    packed = discrete.pack(residues, 18)
    assert packed.size == params.bytes_per_client
    assert np.array_equal(strategy.read_input(packed, 650), residues)
    assert strategy.read_input(residues, 650) is None
    assert strategy.read_input(packed[:-1], 650) is None
