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


@pytest.mark.parametrize("factor, canary_count", [(1.0, 1000), (0.1, 500)])
def test_the_canary_audit_stays_below_the_accounted_epsilon_and_flags_a_tenth_of_the_noise(
        tmp_path, monkeypatch, factor, canary_count):
    """Canaries join the decoded sum, so they see exactly the survivors' noise, the noise
    the round is accounted with (a canary cannot hold SecAgg keys; as a client without a
    share it is the honest equivalent: the noise it sees is what any client's input sees).
    Clients that add a tenth of their share variance must be caught: the estimate's 95 %
    interval then lies above the accounted epsilon. Seeds fixed: shares and canaries (the
    rounding and the rotation seed come from the OS, so the estimate still varies).

    Why these canary counts. The fit gives each set of statistics its own standard
    deviation, and at delta = 1e-5 a small mismatch between the two counts for a lot: at
    this run's separation (0.35 standard deviations, an equal-variance epsilon of 1.34) a
    4.5 % mismatch, the sampling error of 500 canaries, reads 2.1. With 200 canaries one
    honest run in 8 was flagged "above" (the interval's lower end 2.27 > 1.92). With 1000,
    16 honest runs gave lower ends of 0.92-1.67 (mean 1.32, sd 0.18: 1.92 is 3.3 sd away);
    with 500 and a tenth of the noise, 8 runs gave 2.91-3.43 (1.92 is 7 sd below). 1000
    canaries dilute a tenth of the noise too much to flag it as clearly (2.45-2.56)."""
    from dpfl_app.client import client_noise
    from dpfl_app.strategy import canaries

    rng = np.random.default_rng(2026)
    share = client_noise.skellam.noise_share
    monkeypatch.setattr(client_noise.skellam, "noise_share",
                        lambda size, variance, _=None: share(size, variance * factor, rng))
    monkeypatch.setattr(canaries, "canary_seed", lambda _: 7)
    # Poisson with m = N = 10 (q = 1: no amplification), one round, z = 2
    run_server(_config(tmp_path, "out", noise=2.0, sampling="poisson",
                       **{"audit-canaries": canary_count}, **CLIENT_NOISE))
    results, _, _ = _outputs(tmp_path, "out")
    audit = results["audit"]
    assert audit["accounted_epsilon"] == pytest.approx(results["final"]["epsilon"])
    if factor == 1.0:
        assert audit["verdict"] in ("below", "above-within-error")
        assert audit["epsilon_ci95"][0] <= audit["accounted_epsilon"]
    else:
        assert audit["verdict"] == "above"
        assert audit["epsilon_ci95"][0] > audit["accounted_epsilon"]


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


@pytest.mark.parametrize("keys", [{"target-epsilon": 8.0, "server-optimizer": "adam"},
                                  {"noise": 1.5}])
def test_a_run_starts_with_one_plan_and_no_model_built_for_d(monkeypatch, keys):
    """`build.start_strategy`, as the ServerApp and the study engine start a run: the clients'
    shares are planned once (the calibration ran twice: for z, then for the ledger), and d
    and the server optimizer's shapes come from the initial model (each built a model)."""
    from dpfl_app import task
    from dpfl_app.config import model_spec, validate
    from dpfl_app.privacy import distributed_ledger
    from dpfl_app.strategy import client_noise
    from dpfl_app.strategy.build import choose_noise, start_strategy

    cfg = validate(default_run_config(**{**CLIENT_NOISE, "clients": 20, **keys}))
    initial = task.build_model(*model_spec(cfg)).state_dict()
    dim = sum(v.numel() for v in initial.values())
    expected_noise = choose_noise(cfg, 30)
    expected = client_noise.plan_for(cfg, 30, dim, expected_noise)
    plans = []
    real = distributed_ledger.run_plan
    monkeypatch.setattr(distributed_ledger, "run_plan",
                        lambda *a, **k: plans.append(a) or real(*a, **k))

    def no_model(*_):
        raise AssertionError("start_strategy built a model")

    monkeypatch.setattr(task, "build_model", no_model)
    noise, strategy = start_strategy(cfg, 30, initial)
    assert len(plans) == 1 and plans[0][2] == dim
    assert noise == expected_noise == strategy.ledger.model.noise_multiplier
    assert strategy.ledger.params == expected.params
    assert (strategy.server_optimizer is None) == (cfg["server-optimizer"] == "sgd")
