"""(a) The in-process limit: the app's FedAvg+DP rounds as a plain loop, no Flower.

Everything is the app's own code: the ClientApp's settings and data path
(`config.client_settings`, `node_data.client_data`, so the same partitions and
disk cache), `task.build_model` / `task.train` with the ClientApp's loader
seeds, the client's clip and norm bit as `adaptiveclipping_mod` computes them,
the server's step (`mechanism.dp_fedavg_step`, which the strategy calls), the
accountant, and the server's test-set evaluation. What is left out is exactly
what Flower adds: messages, the SuperLink, Ray actors, logging.

With `deterministic-noise=true` the RNG draws come in the strategy's order
(one Poisson coin per node, then update noise, then count noise), so the
cohorts have the sizes the real app's run with the same seed has.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import torch

from dpfl_app.config import client_settings, data_source, model_spec, validate
from dpfl_app.data.datasets import load_test_data, loader
from dpfl_app.data.node_data import client_data
from dpfl_app.privacy import mechanism
from dpfl_app.privacy.accounting import AccountingModel, PrivacyLedger
from dpfl_app.privacy.randomness import server_generators
from dpfl_app.strategy.large_deployment import deployment
from dpfl_app.strategy.server_optimizer import ServerOptimizer
from dpfl_app.task import build_model, test, train

def local_update(run_config: dict, partition_id: int, population: int,
                 global_state: dict, server_round: int) -> list[np.ndarray]:
    """What the ClientApp's `train` computes for one node, before the mod clips."""
    context = SimpleNamespace(run_config=run_config, node_config={
        "partition-id": partition_id, "num-partitions": population})
    settings = client_settings(context)
    net = build_model(settings.model, settings.num_classes)
    net.load_state_dict(global_state)
    train_set, _ = client_data(settings)
    round_seed = settings.seed + 1000 * server_round  # as client_app.train_fn
    train(net, loader(train_set, settings.batch_size, shuffle=True, seed=round_seed),
          settings.local_epochs, settings.lr)
    return [v.detach().numpy() for v in net.state_dict().values()]


def client_clip(local: list[np.ndarray], global_nd: list[np.ndarray],
                clip: float) -> tuple[list[np.ndarray], int]:
    """adaptiveclipping_mod: w_t + clip(w_local - w_t, C_t), and b_i (1 = not clipped)."""
    delta = [a - g for a, g in zip(local, global_nd)]
    unclipped = int(mechanism.l2_norm(delta) <= clip)
    return [(g + d).astype(g.dtype) for g, d in
            zip(global_nd, mechanism.clip_to_norm(delta, clip))], unclipped


def run_limit(run_config: dict, population: int, rounds: int) -> dict:
    """Run `rounds` rounds in this process, on one torch thread like a client actor.

    Ray sets OMP_NUM_THREADS to an actor's num-cpus (1), so torch runs one
    thread per actor. Two threads here were up to 20x slower on a busy 2-core
    machine for these small models (spin-waiting threads).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_limit(run_config, population, rounds)
    finally:
        torch.set_num_threads(threads)


def _run_limit(run_config: dict, population: int, rounds: int) -> dict:
    """Per-round seconds, split by phase: local training, DP step and accounting, test."""
    cfg = validate(dict(run_config))
    m = cfg["clients"]
    stddev = cfg["clipped-count-stddev"]
    big = deployment(cfg, population)  # as the ServerApp: maybe a simulated deployment
    split = mechanism.split_noise(cfg["noise"], big.clients_per_round,
                                  None if stddev == "auto" else float(stddev))
    generators = server_generators(cfg["seed"] if cfg["deterministic-noise"] else None)
    ledger = PrivacyLedger(AccountingModel(cfg["sampling"], cfg["noise"], big.population,
                                           big.clients_per_round, cfg["target-delta"]),
                           noise_secret=generators.secret)
    rng = generators.sampling
    torch.manual_seed(cfg["seed"])
    net = build_model(*model_spec(cfg))
    keys = list(net.state_dict())
    global_nd = [v.numpy().copy() for v in net.state_dict().values()]
    test_loader = loader(load_test_data(cfg["dataset"], cfg["seed"], **data_source(cfg)),
                         512, False)
    optimizer = ServerOptimizer(cfg["server-optimizer"], global_nd, cfg["server-lr"],
                                cfg["server-momentum"])
    clip, records = cfg["initial-clip"], []
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        if cfg["sampling"] == "poisson":
            cohort = [p for p in range(population) if rng.random() < m / population]
        else:
            cohort = sorted(rng.choice(population, size=m, replace=False).tolist())
        state = {k: torch.from_numpy(v) for k, v in zip(keys, global_nd)}
        models, bits = [], []
        for pid in cohort:
            local = local_update(run_config, pid, population, state, server_round)
            clipped, bit = client_clip(local, global_nd, clip)
            models.append(clipped)
            bits.append(bit)
        trained = time.perf_counter()
        # As the strategy: every round is released, an empty one as pure noise.
        global_nd, _, clip = mechanism.dp_fedavg_step(
            global_nd, models, bits, clip, m, split, generators.noise, server_lr=cfg["server-lr"],
            target_quantile=cfg["target-quantile"], clip_lr=cfg["clip-lr"],
            step=optimizer.step, noise_scale=big.noise_scale)
        ledger.compose_round()
        ledger.epsilons()  # both accountants, as the strategy (their cost is measured)
        epsilon = ledger.epsilon_if_secret()  # seeded noise: the figure with secret noise
        aggregated = time.perf_counter()
        net.load_state_dict({k: torch.from_numpy(v) for k, v in zip(keys, global_nd)})
        _, accuracy = test(net, test_loader)
        end = time.perf_counter()
        records.append({"round": server_round, "cohort": len(cohort),
                        "train_s": trained - start, "dp_s": aggregated - trained,
                        "eval_s": end - aggregated, "round_s": end - start,
                        "test_accuracy": accuracy, "epsilon": epsilon})
    return {"rounds": records, "round_s": steady_state([r["round_s"] for r in records])}


def steady_state(durations: list[float]) -> float:
    """Median round time after the first (which pays one-off loading)."""
    later = durations[1:] or durations
    return float(np.median(later)) if later else float("nan")
