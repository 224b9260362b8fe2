"""noise-at=clients in the study engine, against the building blocks it batches.

The cohort's rows go through the clients' own `discrete.integer_updates`
(tests/secagg/test_discrete.py); the shortcuts (one Skellam(n v) draw, the
residue of the integer sum) are exact; with zero noise the round equals the
central round within the quantization bound; the accountant sees the survivors'
noise, and the excess-removal ideal carries exactly t shares.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from dpfl_app.privacy import distributed, distributed_ledger, mechanism, skellam
from dpfl_app.privacy.accounting import AccountingModel
from dpfl_app.privacy.distributed_accounting import DistributedAccountant
from dpfl_app.secagg import discrete, rotation
from dpfl_app.tools.bench import default_run_config
from dpfl_app.tools.study import client_noise as cn

SEED = b"public round seed, 32 bytes long"
CFG = {"target-epsilon": 4.0, "target-delta": 1e-5, "rounds": 40, "clients": 50,
       "sampling": "poisson", "seed": 7, "server-lr": 2.0, "target-quantile": 0.5,
       "clip-lr": 0.2, "noise-bits": 18, "noise-threshold": 0.8,
       # sigma_b = 10: the count's noise takes a small part of the budget
       "clipped-count-stddev": 10.0}
DIM = 300


def _cohort(n, dim=DIM, seed=0):
    rng = np.random.default_rng(seed)
    global_flat = rng.normal(size=dim).astype(np.float32)
    norms = rng.uniform(0.2, 3.0, size=(n, 1))  # some rows above the clip, some below
    rows = rng.normal(size=(n, dim))
    models = (global_flat + rows / np.linalg.norm(rows, axis=1, keepdims=True) * norms)
    return global_flat, models.astype(np.float32), list(rng.integers(0, 2, n))


def test_batched_hadamard_and_rotation_equal_the_single_vector_ones():
    rng = np.random.default_rng(1)
    for size in (1, 2, 8, 512, 2048):
        x = rng.integers(-1000, 1000, size=(3, size)).astype(np.float64)
        expected = np.stack([rotation.hadamard(row) for row in x])
        assert np.array_equal(rotation.hadamard_rows(x), expected)  # integers: exact
        assert np.array_equal(rotation.hadamard(x), expected)  # the butterfly, batched
    x = rng.normal(size=(4, 2410))
    np.testing.assert_allclose(rotation.rotate_rows(x, SEED, 3),
                               np.stack([rotation.rotate(row, SEED, 3) for row in x]),
                               rtol=0, atol=1e-12)


def test_rows_rounding_keeps_the_bound_on_forced_worst_cases():
    """Every row under B, and the fallback towards zero where the redraws cannot fit."""
    dim, scaled_clip = 1024, 300.0
    bound = distributed.rounded_l2_bound(scaled_clip, dim)
    worst = np.full(dim, math.floor(scaled_clip / math.sqrt(dim))) + 0.01
    worst *= scaled_clip / np.linalg.norm(worst)
    rng = np.random.default_rng(2)
    rows = np.vstack([worst, -worst] + [v * scaled_clip / np.linalg.norm(v)
                                        for v in rng.normal(size=(6, dim))])

    class AlwaysUp:
        def random(self, size):
            return np.zeros(size)

    for gen in (rng, AlwaysUp()):
        q = discrete.conditional_round_rows(rows, bound, gen)
        assert all(int(np.sum(r.astype(object) ** 2)) <= math.floor(bound**2) for r in q)
        assert np.all(np.abs(q - rows) < 1)
    q = discrete.conditional_round_rows(rows[:1], bound, AlwaysUp())
    assert np.array_equal(q[0], np.trunc(worst).astype(np.int64))  # the fallback was taken


def test_shortcuts_equal_the_protocols_per_client_residues():
    """shares="each": the modular sum of every client's encoded residues is the residue of
    the integer sum; shares="sum": one Skellam(n v) draw has the summed shares' law."""
    params = distributed.DistributedDpParams(clip=1.0, dim=DIM, scale=80.0, bits=16,
                                             share_variance=40.0, count_share_variance=9.0,
                                             threshold=5)
    global_flat, models, bits = _cohort(8)
    enc = discrete.round_encoding(params, params.clip, SEED, 2)
    deltas = models.astype(np.float64) - global_flat
    rounded = discrete.integer_updates(deltas, enc, np.random.default_rng(4))
    each = cn.ClientNoiseOptions(shares="each")
    signed = cn.noised_integer_sum(rounded, bits, params, each, np.random.default_rng(5))
    rng = np.random.default_rng(5)  # the same shares, drawn in the same order
    residues = []
    for q, bit in zip(rounded, bits):
        share = skellam.noise_share(q.size, params.share_variance, rng)
        count = skellam.noise_share(1, params.count_share_variance, rng)[0]
        residues.append(discrete.to_residues(np.concatenate([q + share, [2 * bit - 1 + count]]),
                                             16))
    assert np.array_equal(discrete.modular_sum(residues, 16), discrete.to_residues(signed, 16))
    # The one-draw shortcut: the noise of the sum has variance n v (4096 x 40 draws).
    zero = np.zeros((8, 4096), dtype=np.int64)
    noise = np.concatenate([cn.noised_integer_sum(zero, [1] * 8, params, cn.ClientNoiseOptions(),
                                                  np.random.default_rng(s))[:-1]
                            for s in range(40)])
    # variance of a sample variance of 163,840 draws: ~2 V^2 / n, so 2% is > 5 sd
    assert np.var(noise) == pytest.approx(8 * params.share_variance, rel=0.02)


def _strategy(cfg: dict, population: int, rng_seed: int, optimizer: str = "sgd"):
    """The ServerApp's client-noise strategy for `cfg` over a model of one flat array of DIM
    values: its plan, ledger and (seeded) noise generator, and `server-optimizer`."""
    from flwr.serverapp.strategy import FedAvg

    from dpfl_app.strategy.client_noise import ClientNoiseDPFedAvg
    from dpfl_app.strategy.server_optimizer import ServerOptimizer

    plan = distributed_ledger.run_plan(cfg, population, DIM, contributors=population)
    model = AccountingModel(cfg["sampling"], plan.split.noise_multiplier, population,
                            cfg["clients"], cfg["target-delta"])
    step = None if optimizer == "sgd" else ServerOptimizer(
        optimizer, [np.zeros(DIM, dtype=np.float32)], cfg["server-lr"], 0.9)
    return ClientNoiseDPFedAvg(
        FedAvg(), plan.split, cfg["clients"], distributed_ledger.DistributedLedger(
            model, plan.params), np.random.default_rng(rng_seed),
        sampling_rng=np.random.default_rng(rng_seed + 1), target_quantile=cfg["target-quantile"],
        clip_lr=cfg["clip-lr"], sampling=cfg["sampling"], server_lr=cfg["server-lr"],
        server_optimizer=step, client_noise=plan.params)


def _round(options=cn.ClientNoiseOptions(), population=100, rng_seed=0, **keys):
    """The study's round with the server's strategy (plan, ledger) for CFG with `keys` changed."""
    cfg = {**CFG, **keys}
    return cn.ClientNoiseRound(cfg, _strategy(cfg, population, rng_seed), DIM, options)


def test_zero_noise_equals_the_central_round_within_the_quantization_bound():
    """Clients' pipeline with no noise against `dp_fedavg_step` with no noise."""
    engine = _round(**{"noise-bits": 20, "noise-threshold": 0.5})
    engine.params = replace(engine.params, share_variance=0.0, count_share_variance=0.0)
    global_flat, models, bits = _cohort(40)
    clip = 0.7
    new, fraction, next_clip, survivors = engine.step(global_flat, models, bits, clip, 1)
    (central,), c_fraction, c_next = mechanism.dp_fedavg_step(
        [global_flat], [[row] for row in models], bits, clip, CFG["clients"],
        mechanism.split_noise(0.0, CFG["clients"]), np.random.default_rng(0),
        server_lr=CFG["server-lr"], target_quantile=CFG["target-quantile"],
        clip_lr=CFG["clip-lr"])
    assert survivors == 40
    assert (fraction, next_clip) == (c_fraction, c_next)  # the count is exact without noise
    enc = discrete.round_encoding(engine.params, clip, cn.round_seed(CFG["seed"]), 1)
    # each client's rounding moves each of d' coordinates by < 1 grid step of 1/gamma_t
    bound = (CFG["server-lr"] / CFG["clients"] * 40 * math.sqrt(engine.params.padded_dim)
             / enc.scale)
    step = np.linalg.norm(central.astype(np.float64) - global_flat)
    error = np.linalg.norm(new.astype(np.float64) - central)
    assert error <= bound
    assert error < 0.05 * step  # and far below the step itself: nothing lost on the way
    assert engine.wraps == 0


def test_the_accountant_sees_the_survivors_and_nothing_below_the_threshold():
    engine = _round(cn.ClientNoiseOptions(survival=0.8), rng_seed=3)
    global_flat, models, bits = _cohort(50)
    survivors, released = [], []
    model = global_flat
    for server_round in range(1, 11):
        new, _, _, n = engine.step(model, models, bits, 0.5, server_round)
        survivors.append(n)
        if n >= engine.params.threshold:
            released.append(n)
            assert not np.array_equal(new, model)
        else:  # withheld: nothing released, the model unchanged
            assert np.array_equal(new, model)
        model = new
    assert engine.ledger.accountant.survivors == released
    assert engine.ledger.withheld_rounds == len(survivors) - len(released) > 0  # both cases
    reference = DistributedAccountant(engine.params, CFG["target-delta"], "poisson",
                                      CFG["clients"] / 100)
    for n in released:
        reference.compose_round(n)
    assert engine.summary()["with_sampling"] == reference.epsilons()["with_sampling"]
    assert engine.summary()["noise_at"] == "clients"


@pytest.mark.parametrize("remove_excess", [False, True])
def test_a_sum_carries_the_survivors_noise_or_the_thresholds_with_excess_removed(remove_excess):
    engine = _round(cn.ClientNoiseOptions(remove_excess=remove_excess),
                    **{"noise-bits": 24, "noise-threshold": 0.5})
    t, n = engine.params.threshold, 40
    global_flat = np.zeros(DIM, dtype=np.float32)
    models = np.zeros((n, DIM), dtype=np.float32)  # zero updates: the release is the noise
    draws = []
    for server_round in range(1, 21):
        new, _, _, _ = engine.step(global_flat, models, [1] * n, 1.0, server_round)
        draws.append(np.asarray(new, dtype=np.float64))
    shares = t if remove_excess else n
    # the noise per model coordinate: sqrt(shares v) / gamma, over m, times the server lr
    expected = CFG["server-lr"] / CFG["clients"] * math.sqrt(
        shares * engine.params.share_variance) / engine.params.scale
    assert np.std(np.concatenate(draws)) == pytest.approx(expected, rel=0.05)  # 6,000 draws
    assert engine.ledger.accountant.survivors == [shares] * 20


CLIENT_NOISE_KEYS = {"secure-aggregation": True, "noise-at": "clients", "noise-bits": 18,
                     "noise-threshold": 0.8}


def _small_config(**keys):
    return default_run_config(**{"rounds": 3, "clients": 20, "target-epsilon": 8.0, "lr": 0.05,
                                 **CLIENT_NOISE_KEYS, **keys})


def test_the_engine_runs_client_noise_from_the_run_config_and_reports_its_accounting():
    from dpfl_app.tools.study.engine import run_study

    study = run_study(_small_config(), 30)
    accounting = study["final"]["accounting"]
    assert accounting["noise_at"] == "clients"
    assert accounting["params"]["threshold"] == 16 and accounting["params"]["bits"] == 18
    survivors = [d["survivors"] for d in study["diagnostics"]]
    assert accounting["survivors"] == [s for s in survivors if s >= 16]
    assert 0 < study["final"]["epsilon"] <= 8.0
    assert study["final"]["epsilon"] == accounting["with_sampling"]
    assert accounting["client_bound"] >= accounting["without_sampling"] > 0
    assert study["rounds"][-1]["epsilon"] == study["final"]["epsilon"]


@pytest.mark.parametrize("keys", [{"sampling": "poisson"},
                                  {"sampling": "fixed", "noise-bits": 20,
                                   "noise-threshold": 0.5, "target-epsilon": 4.0},
                                  {"target-epsilon": 0.0, "noise": 1.5}])
def test_the_study_engine_and_the_server_announce_the_same_parameters(keys):
    """One calibration: the study runs with exactly what the ServerApp's strategy announces
    to the clients for the same config (and accounts with the same z)."""
    from dpfl_app.config import validate
    from dpfl_app.strategy.build import build_strategy, choose_noise
    from dpfl_app.tools.study.engine import run_study

    config = _small_config(rounds=1, **keys)
    cfg = validate(dict(config))
    noise = choose_noise(cfg, 30)
    server = build_strategy(cfg, 30, noise)
    study = run_study(config, 30, report_every=0)
    assert study["final"]["accounting"]["params"] == server.ledger.params.to_dict()
    assert study["noise"] == noise == server.ledger.model.noise_multiplier
    announced = distributed.announced_params(server.announcement)
    assert announced.share_variance == server.ledger.params.share_variance
    assert announced.threshold == study["final"]["accounting"]["params"]["threshold"]


def test_study_options_need_client_noise_in_the_run_config():
    from dpfl_app.tools.study.engine import run_study

    config = default_run_config(**{"rounds": 1, "clients": 20})
    with pytest.raises(ValueError, match="noise-at='clients'"):
        run_study(config, 30, client_noise=cn.ClientNoiseOptions(survival=0.9))


def test_the_sweeps_study_engine_runs_client_noise_from_its_run_config(tmp_path):
    """`dpfl sweep --engine inprocess --run-config "secure-aggregation=true noise-at='clients'"`:
    the keys reach the study engine as they reach a Flower run."""
    import json

    from dpfl_app.tools.sweep import COMPLETED, run_inprocess

    base = _small_config(rounds=2)
    record = run_inprocess({"target-epsilon": 8.0}, 7, tmp_path / "run", base, 30, "test",
                           "eps 8", report_every=0)
    assert record["status"] == COMPLETED and 0 < record["epsilon"] <= 8.0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["final"]["accounting"]["noise_at"] == "clients"
    assert results["final"]["accounting"]["params"]["bits"] == 18


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("cohort", [40, 30])  # t = 40: 30 survivors are withheld
def test_the_study_and_the_strategy_release_the_same_update_and_clip(monkeypatch, optimizer,
                                                                     cohort):
    """The study's round and the ServerApp strategy's `aggregate_train`, fed the same decoded
    noised sum (or a withheld one), release the same model, fraction and next clip, with
    every server optimizer."""
    from flwr.app import Array, ArrayRecord

    from dpfl_app.strategy.dp_fedavg import ClippedSum
    from dpfl_app.strategy.secure_aggregation import SecureDPFedAvgAdaptive

    cfg, clip = CFG, 0.7
    decoded = []
    real_decode = discrete.decode
    monkeypatch.setattr(discrete, "decode",
                        lambda *a: decoded.append(real_decode(*a)) or decoded[-1])
    engine = cn.ClientNoiseRound(cfg, _strategy(cfg, 100, 0, optimizer), DIM,
                                 cn.ClientNoiseOptions())
    engine.params = replace(engine.params, threshold=40)
    global_flat, models, bits = _cohort(cohort)
    study = engine.step(global_flat, models, bits, clip, 1)
    server = _strategy(cfg, 100, 1, optimizer)
    server.clipping_norm = server._round_clip = clip  # pylint: disable=protected-access
    server.current_arrays = ArrayRecord({"w": Array(global_flat)})
    if decoded:  # released: the secure protocol's unmasked, decoded sum
        ((flat, centred),) = decoded
        total = ClippedSum([[flat]], centred + cohort / 2, cohort, 0)
    else:
        total = ClippedSum([], 0, 0, cohort, released=False)
    monkeypatch.setattr(SecureDPFedAvgAdaptive, "clipped_sum", lambda *a: total)
    arrays, _ = server.aggregate_train(1, [])
    record = server.records[-1]
    assert record["sum_released"] is bool(decoded) is (cohort >= 40)
    np.testing.assert_array_equal(arrays["w"].numpy(), study[0])
    assert (record["noisy_unclipped_fraction"], record["next_clip_norm"]) == study[1:3]
    if not decoded:  # withheld: nothing released, no fraction, the clip stays
        assert study[1] is None and study[2] == clip
        np.testing.assert_array_equal(study[0], global_flat)
    assert server.ledger.accountant.survivors == engine.ledger.accountant.survivors


def test_the_engine_runs_client_noise_with_every_server_optimizer():
    """The strategy's release steps `server-optimizer` with client noise too (the app
    accepts it), and so does the study engine."""
    from dpfl_app.tools.study.engine import run_study

    runs = {opt: run_study(_small_config(rounds=2, **{"server-optimizer": opt}), 30,
                           report_every=0) for opt in ("momentum", "adam")}
    for study in runs.values():
        assert study["final"]["accounting"]["noise_at"] == "clients"
        assert 0 < study["final"]["epsilon"] <= 8.0
    assert runs["momentum"]["final"]["test_accuracy"] != runs["adam"]["final"]["test_accuracy"]
