"""dpfl_app ServerApp: FedAvg wrapped in correct DP-FedAvg with adaptive clipping.

The run config is validated before anything heavy is imported (torch, the
datasets, dp-accounting): Flower imports this module first, so a bad value
fails within seconds, in one line. Heavy modules are imported inside the
functions that need them.
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from dpfl_app.config import validate
from dpfl_app.run import console, outcome, outputs, tracking
from dpfl_app.run.grid import fast_polling
from dpfl_app.strategy.build import choose_record_model, real_model, start_strategy
from dpfl_app.strategy.large_deployment import deployment  # light: no torch
from dpfl_app.strategy.population import (
    is_simulation, population, population_assumption, population_size)

if TYPE_CHECKING:
    from dpfl_app.strategy.dp_fedavg import DPFedAvgAdaptive

app = ServerApp()
# The run folder's files that a tracker attaches at the end (all DP-covered).
SHAREABLE = ("results.json", "privacy.md", "accuracy.png")


def restore(strategy: DPFedAvgAdaptive, state: dict) -> None:
    """Continue from a checkpoint: same rounds, clip norm, accountant and records.

    The ledger comes from ledger.json when it charged more rounds than the
    checkpoint: a round released just before the crash stays counted.
    """
    from dpfl_app.run import checkpoint

    ledger_state = checkpoint.charged_ledger(state["run_dir"], state["ledger"])
    strategy.ledger.load_state_dict(ledger_state)
    strategy.round_offset = state["round"]
    strategy.clipping_norm = state["clip_norm"]
    strategy.records = list(state["records"])
    strategy.diagnostics = [d for d in outputs.read_diagnostics(state["run_dir"])
                            if d["round"] <= state["round"]]
    strategy.client_eval = [e for e in outputs.read_jsonl(state["run_dir"] / outputs.CLIENT_EVAL_FILE)
                            if e["round"] <= state["round"]]
    if state["rng"] is not None:  # deterministic-noise only; secret generators are never saved
        strategy.sampling_rng.bit_generator.state = state["rng"]["sampling"]
        strategy.rng.bit_generator.state = state["rng"]["noise"]
    # `sgd` has no optimizer and no state (older checkpoints hold torch.optim.SGD's empty one)
    if state.get("server_optimizer") is not None and strategy.server_optimizer is not None:
        strategy.server_optimizer.load_state_dict(state["server_optimizer"])
    if strategy.canaries is not None:
        strategy.canaries.load_state_dict(state["audit"])
    if ledger_state["rounds"] > state["ledger"]["rounds"]:
        log(WARNING, "the interrupted run released %d round(s) after its last checkpoint; "
            "they stay charged, and the redone round(s) are charged again",
            ledger_state["rounds"] - state["ledger"]["rounds"])
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
    from dpfl_app.config import data_source
    from dpfl_app.data.datasets import format_label_histogram, partition_label_counts
    from dpfl_app.run.plots import plot_partitions

    log(INFO, "preparing the %s partitions of %s for %d clients, to show their labels",
        cfg["partitioning"], cfg["dataset"], num_partitions)
    counts = partition_label_counts(cfg["dataset"], cfg["partitioning"], num_partitions,
                                    cfg["dirichlet-alpha"], cfg["seed"], **data_source(cfg))
    log(INFO, "labels per client (%s partitioning):\n%s", cfg["partitioning"],
        format_label_histogram(counts))
    plot_partitions(counts, run_dir / "partitions.png")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, train with DP, account for every round, write results.

    The last log line says whether the run succeeded and where its outputs are.
    """
    console.configure(context.run_config)  # Flower's repeated lines: only with verbose=true
    folder: dict = {"path": None, "resumed": False}
    outcome.keep_timings_out_of_the_log()
    try:
        train(fast_polling(grid), context, folder)  # deployment: replies as they arrive, not every 3 s
    except Exception as err:
        from dpfl_app.strategy.dp_fedavg import NotEnoughNodes  # not before validating

        if "tracker" in folder:
            folder["tracker"].finish(False, [])
        outcome.report_failure(err, folder["path"], folder["resumed"], (NotEnoughNodes,),
                               run_id=context.run_id)
        raise
    finally:
        outputs.settle_timestamps(folder["path"])  # no round timings in file metadata


def train(grid: Grid, context: Context, folder: dict) -> None:
    """The run; `folder` learns the run folder as soon as there is one."""
    cfg = validate(dict(context.run_config))  # before any heavy import: fails in seconds
    tracking.require(cfg)  # the tracker's package, also before training
    import torch
    from flwr.app import ArrayRecord, ConfigRecord

    from dpfl_app.config import model_spec
    from dpfl_app.privacy.record_report import record_level_lines, record_log_text
    from dpfl_app.privacy.report import privacy_report
    from dpfl_app.run import checkpoint
    from dpfl_app.run.recorder import RunRecorder
    from dpfl_app.strategy.dp_fedavg import BudgetExhausted
    from dpfl_app.task import build_model

    state = checkpoint.load(cfg["resume-from"], cfg) if cfg["resume-from"] else None
    online = population(grid, cfg)  # SuperNodes connected at the start
    num_nodes = population_size(cfg, online, state)
    simulation = deployment(cfg, num_nodes)
    if simulation.simulated:
        log(WARNING, "%s", simulation.summary())
    if state:
        initial_model = state["model"]
    else:  # the model the run starts from; its arrays also give d and the optimizer's shapes
        torch.manual_seed(cfg["seed"])
        initial_model = build_model(*model_spec(cfg)).state_dict()
    noise, strategy = start_strategy(cfg, num_nodes, initial_model,
                                     state["noise"] if state else None)
    ftrl = cfg["mechanism"] == "dp-ftrl"
    if ftrl:
        from dpfl_app.strategy.dp_ftrl import epsilon_summary, participation_assumption
        assumption = participation_assumption(strategy.ledger.model, online)
        log(INFO, "%s", epsilon_summary(strategy.ledger.model))
    else:
        assumption = population_assumption(cfg, num_nodes, is_simulation(grid))
        if not cfg["population"] and not is_simulation(grid) and not state:
            log(WARNING, "population=0 in a deployment: N = %d, the SuperNodes connected now, "
                "is published un-noised and NOT covered by the guarantee; set `population`",
                num_nodes)
    accounting_extra = {"update_noise_multiplier": strategy.split.update_noise_multiplier,
                        "clipped_count_stddev": strategy.split.count_stddev,
                        "population_source": assumption}
    model_name, _ = model_spec(cfg)
    log(INFO, "config: %s data (%s partitions, %s model), %d rounds, N=%d SuperNodes, "
        "m=%d per round (%s) | noise z=%.4g (update z_delta=%.4g, count sigma_b=%.3g),"
        " delta=%g, accountant=%s | clip norm C_0=%g, target quantile %g, clip-lr %g | "
        "server-lr=%g, lr=%g, local-epochs=%d, batch-size=%d",
        cfg["dataset"], cfg["partitioning"], model_name, cfg["rounds"], num_nodes,
        cfg["clients"], (f"dp-ftrl, min-separation {cfg['min-separation']}" if ftrl
                         else f"{cfg['sampling']} sampling"), noise, strategy.split.update_noise_multiplier,
        strategy.split.count_stddev, cfg["target-delta"], strategy.ledger.headline.upper(),
        cfg["initial-clip"], cfg["target-quantile"], cfg["clip-lr"],
        cfg["server-lr"], cfg["lr"], cfg["local-epochs"], cfg["batch-size"])
    log(INFO, "%s", assumption)

    if state:
        restore(strategy, state)
        run_dir = state["run_dir"]
        folder.update(path=run_dir, resumed=True)
    else:
        run_dir = outputs.make_run_dir(cfg["output-dir"], context.run_id)
        folder["path"] = run_dir
        show_partitions(cfg, online, run_dir)  # one demo partition per node
    log(INFO, "writing results to %s; exact counts for the operator only in %s", run_dir,
        outputs.DIAGNOSTICS_FILE)
    strategy.on_round_charged = lambda: checkpoint.save_ledger(run_dir,
                                                               strategy.ledger.state_dict())
    record_model = choose_record_model(cfg)
    folder["tracker"] = tracking.open_tracker(cfg, run_dir, resumed=bool(state))
    folder["tracker"].log_config({**cfg, "model": model_name})  # as results.json records it
    recorder = RunRecorder(cfg, run_dir, strategy, accounting_extra,
                           initial=state["initial"] if state else None,
                           real_model=real_model(strategy.ledger.model, simulation)
                           if simulation.simulated else None, tracker=folder["tracker"],
                           record_model=record_model)
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_model),
                       num_rounds=cfg["rounds"] - strategy.round_offset,
                       timeout=cfg["round-timeout"], train_config=ConfigRecord(),
                       evaluate_config=ConfigRecord(), evaluate_fn=recorder.evaluate)
    except BudgetExhausted as stop:
        recorder.stop_reason = f"privacy budget: {stop}"
        log(WARNING, "training stopped early: %s", recorder.stop_reason)
    recorder.write()
    if ftrl:
        from dpfl_app.privacy.ftrl_report import ftrl_privacy_report
        report = ftrl_privacy_report(strategy.ledger, len(strategy.records), recorder.stop_reason)
    elif cfg["noise-at"] == "clients":
        from dpfl_app.privacy.distributed_report import distributed_report
        report = distributed_report(strategy.ledger, len(strategy.records), recorder.stop_reason,
                                    audit=recorder.audit, assumptions=[assumption])
    else:
        report = privacy_report(strategy.ledger, len(strategy.records), recorder.stop_reason,
                                audit=recorder.audit, secure_aggregation=cfg["secure-aggregation"],
                                assumptions=[assumption],
                                simulation=simulation.summary() if simulation.simulated else None,
                                float_residual=recorder.float_residual(),
                                record_level=record_level_lines(
                                    record_model, strategy.ledger.rounds, cfg["record-clip"])
                                if record_model else None,
                                user_level_clip=strategy.user_level_clip)
    outputs.write_atomic(run_dir / "privacy.md", report.encode())
    for line in console.report_lines(report, run_dir / "privacy.md", cfg["verbose"]):
        log(INFO, "%s", line)
    folder["tracker"].finish(True, [run_dir / name for name in SHAREABLE])
    final = recorder.results()["final"]
    outcome.report_success(final["stop_reason"], final["rounds_completed"],
                           final["test_accuracy"], final["epsilon"], cfg["target-delta"], run_dir,
                           final.get("epsilon_this_run"), run_id=context.run_id,
                           record_level=f", {record_log_text(record_model, strategy.ledger.rounds)}"
                           if record_model else "")
