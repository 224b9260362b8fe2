"""dpfl_app ServerApp: FedAvg wrapped in correct DP-FedAvg with adaptive clipping."""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from dpfl_app.run import checkpoint, outputs
from dpfl_app.config import data_source, model_spec, validate
from dpfl_app.data.datasets import format_label_histogram, partition_label_counts
from dpfl_app.privacy import mechanism
from dpfl_app.privacy.audit import population_warning
from dpfl_app.privacy.accounting import AccountingModel, PrivacyLedger, headline_accountant
from dpfl_app.privacy.calibration import calibrate_noise
from dpfl_app.privacy.report import privacy_report
from dpfl_app.run.plots import plot_partitions
from dpfl_app.run.recorder import RunRecorder
from dpfl_app.strategy.canaries import CanaryAudit, canary_seed
from dpfl_app.strategy.dp_fedavg import BudgetExhausted, DPFedAvgAdaptive, wait_for_nodes
from dpfl_app.strategy.large_deployment import deployment
from dpfl_app.strategy.server_optimizer import ServerOptimizer
from dpfl_app.task import build_model

app = ServerApp()


def choose_noise(cfg: dict, population: int) -> float:
    """`noise`, or the z calibrated to meet `target-epsilon` in `rounds` rounds."""
    if cfg["target-epsilon"] <= 0:
        return cfg["noise"]
    big = deployment(cfg, population)  # a simulated deployment is calibrated for itself
    population, clients = big.population, big.clients_per_round
    # Calibrate with the accountant that will report the run's epsilon.
    headline = headline_accountant(AccountingModel(cfg["sampling"], 1.0, population,
                                                   clients, cfg["target-delta"]))
    z = calibrate_noise(cfg["target-epsilon"], cfg["target-delta"], cfg["rounds"],
                        population, clients, cfg["sampling"], accountant=headline)
    log(INFO, "target-epsilon=%s: calibrated noise multiplier z=%.4f (replaces noise=%s)",
        cfg["target-epsilon"], z, cfg["noise"])
    return z


def build_strategy(cfg: dict, population: int, noise: float) -> DPFedAvgAdaptive:
    """FedAvg (sampling, evaluation) inside our DP wrapper (clipping, noise, accounting)."""
    stddev = cfg["clipped-count-stddev"]
    big = deployment(cfg, population)  # the run's own, or a simulated larger one
    split = mechanism.split_noise(noise, big.clients_per_round,
                                  None if stddev == "auto" else float(stddev))
    if split.raised:
        log(WARNING, "clipped-count-stddev raised from m/20=%.3f to %.3f so that noise z=%.4g"
            " < 2*sigma_b; update noise multiplier z_delta=%.4f", split.default_count_stddev,
            split.count_stddev, noise, split.update_noise_multiplier)
    ledger = PrivacyLedger(AccountingModel(cfg["sampling"], noise, big.population,
                                           big.clients_per_round, cfg["target-delta"]))
    fixed = cfg["sampling"] == "fixed"
    fedavg = FedAvg(
        fraction_train=cfg["clients"] / population if fixed else 1.0,
        min_train_nodes=cfg["clients"] if fixed else 1,
        min_available_nodes=1,
        fraction_evaluate=1.0 if cfg["client-eval"] else 0.0,
        min_evaluate_nodes=1,
    )
    if cfg["deterministic-noise"]:
        log(WARNING, "deterministic-noise=true: the DP noise is reproducible from seed=%d. "
            "Fine for experiments; never deploy with it.", cfg["seed"])
    rng = np.random.default_rng(cfg["seed"] if cfg["deterministic-noise"] else None)
    canaries = audit_canaries(cfg, population)
    return DPFedAvgAdaptive(
        fedavg, split, cfg["clients"], ledger, rng,
        initial_clip=cfg["initial-clip"], target_quantile=cfg["target-quantile"],
        clip_lr=cfg["clip-lr"], sampling=cfg["sampling"], min_replies=cfg["min-replies"],
        node_wait_timeout=cfg["node-wait-timeout"], max_epsilon=cfg["max-epsilon"],
        server_lr=cfg["server-lr"], canaries=canaries,
        server_optimizer=server_optimizer(cfg),
        noise_scale=big.noise_scale, sampling_population=population,
    )


def server_optimizer(cfg: dict) -> ServerOptimizer:
    """`server-optimizer` over the model's arrays (their shapes; values come each step)."""
    like = [v.numpy() for v in build_model(*model_spec(cfg)).state_dict().values()]
    return ServerOptimizer(cfg["server-optimizer"], like, cfg["server-lr"],
                           cfg["server-momentum"])


def audit_canaries(cfg: dict, population: int) -> CanaryAudit | None:
    """The privacy audit's canary clients (Andrew et al., ICLR 2024), if asked for."""
    k = cfg["audit-canaries"]
    if k == 0:
        return None
    rate = cfg["clients"] / population
    log(INFO, "audit-canaries=%d: the server adds %d canary clients, sampled like real ones "
        "(rate %.3g), and estimates epsilon from this run (Andrew et al., ICLR 2024). Canaries "
        "change the model a little: each sampled one adds C_t times a random unit direction to "
        "the sum. The accounted epsilon of the real clients is unchanged.", k, k, rate)
    warning = population_warning(k, population, rate)
    if warning:
        log(WARNING, "%s", warning)
    seed = canary_seed(cfg["seed"] if cfg["deterministic-noise"] else None)
    return CanaryAudit(k, seed, cfg["sampling"], rate)


def restore(strategy: DPFedAvgAdaptive, state: dict) -> None:
    """Continue from a checkpoint: same rounds, clip norm, accountant and records."""
    strategy.ledger.load_state_dict(state["ledger"])
    strategy.round_offset = state["round"]
    strategy.clipping_norm = state["clip_norm"]
    strategy.records = list(state["records"])
    if state["rng"] is not None:
        strategy.rng.bit_generator.state = state["rng"]
    if state.get("server_optimizer") is not None:
        strategy.server_optimizer.load_state_dict(state["server_optimizer"])
    if strategy.canaries is not None:
        strategy.canaries.load_state_dict(state["audit"])
    log(INFO, "resuming after round %d from %s (epsilon so far %.3f)", state["round"],
        state["run_dir"], strategy.ledger.epsilon())


def show_partitions(cfg: dict, num_partitions: int, run_dir) -> None:
    """Log each client's label histogram and save it as partitions.png.

    The server recomputes the demo partitions from the same seed. With
    node-data='local' each site trains on its own files, which the server
    never sees: there is nothing to show.
    """
    if cfg["node-data"] == "local":
        log(INFO, "node-data='local': each SuperNode trains on its own data-path; "
            "no demo partitions to show")
        return
    counts = partition_label_counts(cfg["dataset"], cfg["partitioning"], num_partitions,
                                    cfg["dirichlet-alpha"], cfg["seed"], **data_source(cfg))
    log(INFO, "labels per client (%s partitioning):\n%s", cfg["partitioning"],
        format_label_histogram(counts))
    plot_partitions(counts, run_dir / "partitions.png")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, train with DP, account for every round, write results."""
    cfg = validate(dict(context.run_config))  # fails before anything starts
    state = checkpoint.load(cfg["resume-from"], cfg) if cfg["resume-from"] else None
    population = len(wait_for_nodes(grid, cfg["clients"], cfg["node-wait-timeout"]))
    simulation = deployment(cfg, population)
    if simulation.simulated:
        log(WARNING, "%s", simulation.summary())
    noise = state["noise"] if state else choose_noise(cfg, population)
    strategy = build_strategy(cfg, population, noise)
    accounting = {**strategy.ledger.to_dict(),
                  "update_noise_multiplier": strategy.split.update_noise_multiplier,
                  "clipped_count_stddev": strategy.split.count_stddev}
    log(INFO, "population N=%d SuperNodes, m=%d per round, sampling=%s, z=%.4f "
        "(z_delta=%.4f, sigma_b=%.3f), accountant=%s", population, cfg["clients"],
        cfg["sampling"], noise, strategy.split.update_noise_multiplier,
        strategy.split.count_stddev, strategy.ledger.headline)

    if state:
        restore(strategy, state)
        run_dir, initial_model = state["run_dir"], state["model"]
    else:
        run_dir = outputs.make_run_dir(cfg["output-dir"], context.run_id)
        torch.manual_seed(cfg["seed"])
        initial_model = build_model(*model_spec(cfg)).state_dict()
        show_partitions(cfg, population, run_dir)
    log(INFO, "writing results to %s", run_dir)
    recorder = RunRecorder(cfg, run_dir, strategy, accounting,
                           initial=state["initial"] if state else None)
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_model),
                       num_rounds=cfg["rounds"] - strategy.round_offset,
                       timeout=cfg["round-timeout"], train_config=ConfigRecord(),
                       evaluate_config=ConfigRecord(), evaluate_fn=recorder.evaluate)
    except BudgetExhausted as stop:
        recorder.stop_reason = f"privacy budget: {stop}"
        log(WARNING, "training stopped early: %s", recorder.stop_reason)
    recorder.write()
    report = privacy_report(strategy.ledger, len(strategy.records), recorder.stop_reason,
                            audit=recorder.audit,
                            simulation=simulation.summary() if simulation.simulated else None)
    outputs.write_atomic(run_dir / "privacy.md", report.encode())
    for line in report.splitlines():
        log(INFO, "%s", line)
    log(INFO, "results in %s", run_dir)
