"""The study engine: the app's DP-FedAvg rounds in one process, cohorts trained in one batch.

What runs is the app's own code: the run-config validation, `strategy.build`'s
start of a run (`start_strategy`: the noise calibration `choose_noise` and the strategy
construction `build_strategy`: the noise split, the `PrivacyLedger`, the seeded RNG), the
strategy's cohort sampling (`strategy.sampling.SlotSampler`), the ClientApp's data
(`node_data.client_data`) and loader seeds, the clip and norm bit of Flower's
`adaptiveclipping_mod`, the server's clip (`mechanism.clipped_sum`: `clip_to_norm`
of the cohort as one matrix; neither where the strategy has no user-level clip,
`config.user_level_clip_on`), the strategy's own `release` (dp-fedavg's
`dp_fedavg_release`, or dp-ftrl's correlated noise) with its `server-optimizer`
step (dp-ftrl: server momentum in the factorization's workload, as in the
ServerApp) and the server's test-set evaluation (`task.test`). What is left out is what Flower
adds: messages, the SuperLink, actors. With `deterministic-noise=true` it
draws from the RNG in the strategy's order, so it samples the same cohorts and
adds the same noise as the ServerApp with the same seed (nodes in partition
order, as in tests/inprocess.py).

`holdout="validation"` splits the server's test set in two (seeded): the run
reports accuracy on one half for tuning and keeps the other for the final
report, since tuning on the data one reports is itself a release (Papernot &
Steinke 2022, "Hyperparameter Tuning with Renyi Differential Privacy").
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import torch

from dpfl_app.config import client_settings, data_source, model_spec, validate
from dpfl_app.data.datasets import Tensors, load_test_data
from dpfl_app.data.node_data import client_data
from dpfl_app.privacy.accounting import AccountingModel, epsilon_after, max_rounds_within
from dpfl_app.privacy.mechanism import clipped_sum
from dpfl_app.privacy.record_report import record_fields
from dpfl_app.strategy.build import choose_record_model, start_strategy
from dpfl_app.strategy.server_optimizer import ServerOptimizer
from dpfl_app.tools.study.record_dp import CohortDpSgd, record_level_training
from dpfl_app.task import build_model, test
from dpfl_app.tools.study.client_noise import ClientNoiseOptions, ClientNoiseRound
from dpfl_app.tools.study.vectorised import VECTORISED_MODELS, CohortTrainer

ENGINE = "inprocess"
HOLDOUTS = ("test", "validation")
# Keys that change which examples each client holds (and so the cached partitions).
DATA_KEYS = ("dataset", "partitioning", "dirichlet-alpha", "seed", "data-dir",
             "image-column", "label-column")


_DATA_CACHE: dict[tuple, list[Tensors]] = {}


def population_data(run_config: dict, population: int) -> list[Tensors]:
    """Every client's training tensors, read once per data setting through the ClientApp's
    own data path (its settings, partitioner and client split)."""
    key = (population, *((k, run_config[k]) for k in DATA_KEYS))
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one population at a time: a sweep varies the rest
        _DATA_CACHE[key] = [client_data(client_settings(SimpleNamespace(
            run_config=run_config, node_config={"partition-id": pid,
                                                "num-partitions": population})))[0]
            for pid in range(population)]
    return _DATA_CACHE[key]


def evaluation_sets(cfg: dict, holdout: str) -> dict[str, Tensors]:
    """{"test": ...} or, for tuning, {"validation": half, "test": the other half}."""
    full = load_test_data(cfg["dataset"], cfg["seed"], **data_source(cfg))
    if holdout == "test":
        return {"test": full}
    order = torch.randperm(len(full.labels), generator=torch.Generator().manual_seed(cfg["seed"]))
    half = len(order) // 2
    return {name: Tensors(full.images[idx], full.labels[idx])
            for name, idx in (("validation", order[:half]), ("test", order[half:]))}


def flatten(state: dict[str, torch.Tensor], stacked: bool = False) -> torch.Tensor:
    """All arrays as one vector (per client when `stacked`), in state-dict order.

    The mechanism treats the model as one vector: the clip uses the global L2
    norm and the noise is i.i.d. per coordinate, drawn layer after layer, which
    is the same stream as one draw over the concatenation. One row per client
    lets the server clip the whole cohort in one matrix operation.
    """
    return torch.cat([v.flatten(1 if stacked else 0) for v in state.values()], -1)


def unflatten(vector: np.ndarray, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sizes = [v.numel() for v in like.values()]
    parts = torch.from_numpy(vector).split(sizes)
    return {k: part.view_as(v) for (k, v), part in zip(like.items(), parts)}


def mod_clip(local: torch.Tensor, global_flat: torch.Tensor,
             clip: float) -> tuple[np.ndarray, list[int]]:
    """Flower's `adaptiveclipping_mod` for every client at once (rows of `local`):
    w_t + clip(w_i - w_t, C_t), and b_i = 1 when the update was not clipped."""
    delta = local - global_flat
    norms = delta.double().square().sum(1).sqrt()
    scale = torch.clamp(clip / norms, max=1.0)
    clipped = global_flat + delta * scale.unsqueeze(1).to(delta.dtype)
    return clipped.numpy(), (scale >= 1.0).int().tolist()


def evaluate(net, state: dict, sets: dict[str, Tensors]) -> dict[str, float]:
    """`task.test` on the server's batches of 512, sliced from the tensors: the batches
    `loader(data, 512, False)` yields, without its per-example indexing and collation."""
    net.load_state_dict(state)
    return {f"{name}_accuracy": test(net, [(data.images[i:i + 512], data.labels[i:i + 512])
                                           for i in range(0, len(data.labels), 512)],
                                     device="cpu")[1]
            for name, data in sets.items()}


def run_study(run_config: dict, population: int, holdout: str = "test",
              on_round=None, *, report_every: int = 1,
              client_noise: ClientNoiseOptions | None = None) -> dict:
    """One run of `rounds` rounds over `population` clients; results.json's shape plus
    `engine`. `on_round(record)` is called after each round.

    `report_every=k` evaluates the model and reads the ledger's epsilon after every
    k-th round and the last (1: every round, as a Flower run reports; 0: the last
    only, for a sweep's table or a benchmark). The rounds between carry their clip
    norms and timings only: nothing is computed that nobody reads.

    With `noise-at = "clients"` (and `noise-bits`, `noise-threshold`) in the config, as
    in a Flower run, the clients' rotation, rounding and Skellam shares under a modular
    sum replace the server's noise (tools/study/client_noise.py), with the parameters
    and the ledger of the strategy the ServerApp builds. `client_noise` sets what only
    a study simulates there (survival, the excess-removal ideal, per-client draws).
    """
    if holdout not in HOLDOUTS:
        raise ValueError(f"holdout={holdout!r}; allowed: {', '.join(HOLDOUTS)}")
    if isinstance(report_every, bool) or not isinstance(report_every, int) or report_every < 0:
        raise ValueError(f"report_every={report_every!r}; allowed: an integer >= 0")
    cfg = validate(dict(run_config))
    if cfg["node-data"] != "partitions":
        raise ValueError("the study engine needs demo partitions (node-data='partitions')")
    if cfg.get("audit-canaries", 0):  # canaries join the strategy's sum; not simulated here
        raise ValueError("audit-canaries: the study engine runs no privacy audit; use flwr")
    if client_noise is not None and cfg["noise-at"] != "clients":
        raise ValueError("client_noise options need noise-at='clients' in the run config")
    if cfg["noise-at"] == "clients" and cfg["max-epsilon"] > 0:  # a run stops per survivors
        raise ValueError("noise-at=clients: the study engine runs it with max-epsilon=0 "
                         "(the rounds a Flower run completes depend on its survivors)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is fastest on a shared machine
    try:
        return _run(cfg, dict(run_config), population, holdout, on_round, report_every,
                    client_noise)
    finally:
        torch.set_num_threads(threads)


def distributed_final(distributed: ClientNoiseRound) -> dict:
    """The final figures of a noise-at=clients run: the strategy ledger's, amplified."""
    summary = distributed.summary()
    return {"epsilon": summary["with_sampling"] if summary["rounds"] else 0.0,
            "accountant": "skellam-rdp", "accounting": summary}


def planned_rounds(cfg: dict, ledger) -> int:
    """The rounds the run will complete: `rounds`, or fewer where `max-epsilon` stops it.

    The strategy checks `ledger.would_exceed` before each round; epsilon grows with
    the rounds, so the first round that would exceed the budget is known before the
    run starts, with a binary search instead of one accountant call per round.
    """
    if cfg["max-epsilon"] <= 0:
        return cfg["rounds"]
    if not isinstance(ledger.model, AccountingModel):  # dp-ftrl: its own ledger's rule
        return next((k for k in range(cfg["rounds"]) if ledger.would_exceed(
            cfg["max-epsilon"], k + 1)), cfg["rounds"])
    return max_rounds_within(ledger.model, cfg["max-epsilon"], cfg["rounds"], ledger.headline)


def _run(cfg: dict, run_config: dict, population: int, holdout: str, on_round,
         report_every: int, client_noise: ClientNoiseOptions | None) -> dict:
    start = time.perf_counter()
    torch.manual_seed(cfg["seed"])  # the ServerApp's initial model
    net = build_model(*model_spec(cfg))
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    # The ServerApp's start: noise (noise-at=clients: z of the clients' shares at t, planned
    # once for this model's d), split, ledger, RNG.
    noise, strategy = start_strategy(cfg, population, state)
    ledger, m = strategy.ledger, cfg["clients"]
    sampling_rng, sampler = strategy.sampling_rng, strategy.sampler  # cohorts, as the strategy
    # Accounting happens once, here: epsilon depends on the configuration and the
    # number of rounds only, both known now (the accountant's cache keeps the value).
    if strategy.server_optimizer is not None:  # the engine steps one flat vector: the same
        # optimizer over it (momentum and Adam are elementwise, so the same step)
        strategy.server_optimizer = ServerOptimizer(
            cfg["server-optimizer"], [flatten(state).numpy()], cfg["server-lr"],
            cfg["server-momentum"])
    distributed = None  # noise-at=clients: the server's announced shares and its ledger
    if cfg["noise-at"] == "clients":
        distributed = ClientNoiseRound(cfg, strategy, flatten(state).numel(),
                                       client_noise or ClientNoiseOptions())
        planned = cfg["rounds"]
    else:
        planned = planned_rounds(cfg, ledger)
        if isinstance(ledger.model, AccountingModel):  # dp-ftrl's ledger computes its own
            epsilon_after(ledger.model, planned, ledger.headline)
    trainer = CohortTrainer(build_model(*model_spec(cfg)),
                            vectorised=model_spec(cfg)[0] in VECTORISED_MODELS)
    record_model = choose_record_model(cfg)  # None: record-level DP-SGD off
    dp_trainer = CohortDpSgd(build_model(*model_spec(cfg))) if record_model else None
    data = population_data(run_config, population)
    trainer.warm_up(data[0])
    sets = evaluation_sets(cfg, holdout)
    initial = evaluate(net, state, sets)
    records, stop_reason, clip = [], "completed all rounds", strategy.clipping_norm
    diagnostics = []  # exact cohort sizes: kept apart from results, as in a Flower run
    loop_start, loop_cpu = time.perf_counter(), time.process_time()
    for server_round in range(1, cfg["rounds"] + 1):
        if server_round > planned:
            stop_reason = f"privacy budget: round {server_round} would exceed max-epsilon"
            break
        began = time.perf_counter()
        # The strategy's own slot sampler; population slot p holds client p.
        chosen, _ = sampler.sample(range(population), sampling_rng)
        cohort = sorted(chosen)
        round_clip = clip
        # As the strategy: every round is released, an empty cohort as pure noise.
        global_flat = flatten(state)
        models, bits = np.zeros((0, global_flat.numel()), dtype=np.float32), []
        if cohort:
            if record_model is not None:  # each site's DP-SGD, seeded per site and round
                local = record_level_training(dp_trainer, state, [data[p] for p in cohort],
                                              cohort, cfg, record_model, server_round)
            else:
                local = trainer.train(state, [data[p] for p in cohort], cfg["local-epochs"],
                                      cfg["batch-size"], cfg["lr"],
                                      cfg["seed"] + 1000 * server_round)
            if strategy.user_level_clip:
                models, bits = mod_clip(flatten(local, stacked=True), global_flat, clip)
            else:  # record-level DP alone (config.user_level_clip_on): sent unclipped
                models = flatten(local, stacked=True).numpy()
        trained = time.perf_counter()
        if distributed is not None:  # the clients' shares under the modular sum
            new_model, unclipped_fraction, clip, survivors = distributed.step(
                global_flat.numpy(), models, bits, clip, server_round)
        else:
            # The server's clip of every delta as one matrix operation, then the strategy's
            # own release of the sum (its split, RNG, server step; dp-ftrl: correlated
            # noise), as under secure aggregation: `dp_fedavg_step` with the cohort summed.
            rows = models - global_flat.numpy()
            deltas = [] if not cohort else [[rows.sum(0, dtype=np.float64) if clip is None
                                             else clipped_sum(rows, clip)]]
            (new_model,), unclipped_fraction, clip = strategy.release(
                [global_flat.numpy()], deltas, sum(bits), len(bits), clip, m)
            ledger.compose_round()
        state = unflatten(new_model, state)
        stepped = time.perf_counter()
        record = {"round": server_round, "clip_norm": round_clip, "next_clip_norm": clip,
                  "noisy_unclipped_fraction": unclipped_fraction}
        reported = server_round == planned or (report_every and server_round % report_every == 0)
        if reported:
            record["epsilon"] = ledger.epsilon_if_secret()  # noise-at=clients: with sampling
            if record_model:
                record.update(record_fields(record_model, ledger.rounds))
        accounted = time.perf_counter()
        if reported:
            record.update(evaluate(net, state, sets))
        end = time.perf_counter()
        # Phases: local training and clip; server step; accounting; server evaluation.
        record.update(train_s=trained - began, dp_s=stepped - trained,
                      account_s=accounted - stepped, eval_s=end - accounted, round_s=end - began)
        records.append(record)
        diagnostics.append({"round": server_round, "num_sampled": len(cohort),
                            **({"survivors": survivors} if distributed else {})})
        if on_round:
            on_round(record)
    loop_end, loop_cpu = time.perf_counter(), time.process_time() - loop_cpu
    last = records[-1] if records else initial
    accuracy = [r["test_accuracy"] for r in records if "test_accuracy" in r]
    final = {"rounds_completed": len(records), "test_accuracy": last["test_accuracy"],
             "best_test_accuracy": max(accuracy, default=None),
             # A study's noise is seeded, so its own outputs carry no guarantee: its
             # epsilon is the accounted one of the same configuration with secret noise.
             "epsilon": ledger.epsilon_if_secret() if records else 0.0,
             "epsilon_meaning": "accounted for this configuration run with secret noise",
             "accountant": ledger.headline,
             **(distributed_final(distributed) if distributed else {}),
             "delta": cfg["target-delta"], "stop_reason": stop_reason,
             **(record_fields(record_model, ledger.rounds) if record_model else {}),
             # Set-up (calibration, accounting, data, model, warm-up, the initial
             # evaluation), then the rounds with their reported evaluations.
             "setup_s": loop_start - start, "loop_s": loop_end - loop_start,
             "loop_cpu_s": loop_cpu,  # the process's CPU time: less sensitive to load
             "wall_s": time.perf_counter() - start}
    if holdout == "validation":
        final["validation_accuracy"] = last["validation_accuracy"]
    return {"engine": ENGINE, "config": cfg, "noise": noise, "population": population,
            "holdout": holdout, "initial": initial, "rounds": records, "final": final,
            "diagnostics": diagnostics}
