"""dpfl_app ServerApp: FedAvg wrapped in correct DP-FedAvg with adaptive clipping.

The run config is validated before anything heavy is imported (torch, the
datasets, dp-accounting): Flower imports this module first, so a bad value
fails within seconds, in one line. Heavy modules are imported inside the
functions that need them.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from dpfl_app.config import validate
from dpfl_app.client.errors import ConfigError
from dpfl_app.run import console, outcome, outputs, tracking
from dpfl_app.run.grid import fast_polling
from dpfl_app.strategy.large_deployment import deployment  # light: no torch

if TYPE_CHECKING:
    from dpfl_app.privacy.accounting import AccountingModel
    from dpfl_app.strategy.canaries import CanaryAudit
    from dpfl_app.strategy.dp_fedavg import DPFedAvgAdaptive

app = ServerApp()
# The run folder's files that a tracker attaches at the end (all DP-covered).
SHAREABLE = ("results.json", "privacy.md", "accuracy.png")


def choose_noise(cfg: dict, population: int) -> float:
    """`noise`, or the z calibrated to meet `target-epsilon` in `rounds` rounds."""
    if cfg.get("mechanism") == "dp-ftrl":  # no population, no sampling: one Gaussian over the run
        from dpfl_app.strategy.dp_ftrl import choose_ftrl_noise
        return choose_ftrl_noise(cfg)
    if cfg["target-epsilon"] <= 0:
        return cfg["noise"]
    from dpfl_app.privacy.accounting import AccountingModel, headline_accountant
    from dpfl_app.privacy.calibration import calibrate_noise

    big = deployment(cfg, population)  # a simulated deployment is calibrated for itself
    population, clients = big.population, big.clients_per_round
    # Calibrate with the accountant that will report the run's epsilon.
    headline = headline_accountant(AccountingModel(cfg["sampling"], 1.0, population,
                                                   clients, cfg["target-delta"]))
    z = calibrate_noise(cfg["target-epsilon"], cfg["target-delta"], cfg["rounds"],
                        population, clients, cfg["sampling"], accountant=headline,
                        withheld_inputs=withheld_inputs(cfg, population, clients))
    log(INFO, "target-epsilon=%s: calibrated noise multiplier z=%.6g (replaces noise=%s)",
        cfg["target-epsilon"], z, cfg["noise"])
    return z


def withheld_inputs(cfg: dict, population: int, clients: int) -> int:
    """W of the accounting model: secure aggregation may withhold a round's whole sum."""
    if not cfg.get("secure-aggregation", False):
        return 0
    from dpfl_app.privacy.accounting import withheld_sum_bound

    return withheld_sum_bound(cfg["sampling"], population, clients)


def choose_record_model(cfg: dict):
    """Each site's record-level DP-SGD (a RecordLevelModel), or None when it is off."""
    from dpfl_app.client.site_ledger import planned_model

    model = planned_model(cfg)
    if model is None:
        return None
    from dpfl_app.privacy.record_level import record_epsilon

    if cfg["target-record-epsilon"] > 0:
        log(INFO, "target-record-epsilon=%s: calibrated record-noise sigma=%.6g (replaces "
            "record-noise=%s); every site calibrates the same sigma itself",
            cfg["target-record-epsilon"], model.noise_multiplier, cfg["record-noise"])
    log(INFO, "record-level DP-SGD at every site: sigma=%.4g, record-clip=%g, Poisson rate "
        "q=%g, %d steps per round; after %d rounds: record-level epsilon %.3f at delta %g for "
        "any record at any site (PLD; RDP %.3f)", model.noise_multiplier, cfg["record-clip"],
        model.sampling_rate, model.steps_per_round, cfg["rounds"],
        record_epsilon(model, cfg["rounds"]), model.delta,
        record_epsilon(model, cfg["rounds"], "rdp"))
    return model


def build_strategy(cfg: dict, population: int, noise: float) -> DPFedAvgAdaptive:
    """FedAvg (sampling, evaluation) inside our DP wrapper (clipping, noise, accounting)."""
    from flwr.serverapp.strategy import FedAvg

    from dpfl_app.privacy import mechanism
    from dpfl_app.privacy.accounting import AccountingModel, PrivacyLedger
    from dpfl_app.client import policy as client_policy
    from dpfl_app.privacy.randomness import server_generators
    from dpfl_app.strategy.dp_fedavg import DPFedAvgAdaptive
    from dpfl_app.strategy.secure_aggregation import SecureDPFedAvgAdaptive

    generators = server_generators(cfg["seed"] if cfg["deterministic-noise"] else None)
    # FedAvg addresses every online node; the strategy keeps the sampled slots.
    fedavg = FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1,
                    fraction_evaluate=1.0, min_evaluate_nodes=1)
    if not cfg["client-eval"]:
        # What FedAvg(fraction_evaluate=0.0) sets, without its warning "Federated
        # evaluation will be skipped" in every run (100 times in a sweep).
        fedavg.fraction_evaluate, fedavg.min_evaluate_nodes = 0.0, 0
    if cfg["deterministic-noise"]:
        log(WARNING, "deterministic-noise=true: the DP noise is reproducible from seed=%d, "
            "so there is NO privacy guarantee: epsilon is reported as inf. Fine for "
            "experiments; never deploy with it.", cfg["seed"])
    if cfg["mechanism"] == "dp-ftrl":
        from dpfl_app.strategy.dp_ftrl import build_ftrl_strategy
        return build_ftrl_strategy(cfg, noise, fedavg, generators, server_optimizer(cfg))
    stddev = cfg["clipped-count-stddev"]
    big = deployment(cfg, population)  # the run's own, or a simulated larger one
    split = mechanism.split_noise(noise, big.clients_per_round,
                                  None if stddev == "auto" else float(stddev))
    if split.raised:
        log(WARNING, "clipped-count-stddev raised from m/20=%.3f to %.3f so that noise z=%.4g"
            " < 2*sigma_b; update noise multiplier z_delta=%.4f", split.default_count_stddev,
            split.count_stddev, noise, split.update_noise_multiplier)
    ledger = PrivacyLedger(AccountingModel(
        cfg["sampling"], noise, big.population, big.clients_per_round, cfg["target-delta"],
        withheld_inputs(cfg, big.population, big.clients_per_round)),
        noise_secret=generators.secret)
    canaries = audit_canaries(cfg, population)
    secure = {"neighbours": cfg["secagg-neighbours"], "stage_timeout": cfg["round-timeout"]}
    cls = SecureDPFedAvgAdaptive if cfg["secure-aggregation"] else DPFedAvgAdaptive
    strategy = cls(
        fedavg, split, cfg["clients"], ledger, generators.noise,
        sampling_rng=generators.sampling,
        initial_clip=cfg["initial-clip"], target_quantile=cfg["target-quantile"],
        clip_lr=cfg["clip-lr"], sampling=cfg["sampling"],
        node_wait_timeout=cfg["node-wait-timeout"], max_epsilon=cfg["max-epsilon"],
        server_lr=cfg["server-lr"], canaries=canaries,
        **(secure if cfg["secure-aggregation"] else {}),
        server_optimizer=server_optimizer(cfg),
        noise_scale=big.noise_scale, sampling_population=population,
    )
    # The secure strategy's smallest summed cohort, if it has one (a client floor).
    ledger.no_dropout_floor = max(2, int(getattr(strategy, "min_cohort", 2)))
    strategy.announcement = client_policy.announcement(
        real_model(ledger.model, big), cfg["rounds"], cfg["secure-aggregation"],
        cfg["deterministic-noise"])
    return strategy


def real_model(model: AccountingModel, big) -> AccountingModel:
    """This run's own clients' model: `model` itself, unless a deployment is simulated.

    A simulated deployment scales the noise on the real cohort's sum by m/m_big:
    the real clients get noise multiplier z * m/m_big, sampled m of the real N.
    """
    from dpfl_app.privacy.accounting import withheld_sum_bound

    if not big.simulated:
        return model
    return model.replace(noise_multiplier=model.noise_multiplier * big.noise_scale,
                         population=big.real_population,
                         clients_per_round=big.real_clients_per_round,
                         withheld_inputs=0 if not model.withheld_inputs else withheld_sum_bound(
                             model.sampling, big.real_population, big.real_clients_per_round))


def population_size(cfg: dict, online: int, state: dict | None) -> int:
    """N for the accountant: `population`, else the node count at start (an assumption)."""
    if state:  # a resumed run keeps the N it was accounted under
        return state["ledger"]["model"]["population"]
    if cfg["population"] == 0:
        return online
    if online > cfg["population"]:
        raise ConfigError(
            f"run-config key 'population' = {cfg['population']} is smaller than the "
            f"{online} SuperNodes connected; set it to at least {online}, "
            "or 0 (= the number connected at the start)")
    return cfg["population"]


def population_assumption(cfg: dict, population: int, simulation: bool = False) -> str:
    """How N was chosen, in words, for the log and privacy.md.

    With population=0 in a deployment, N is an exact count of connected nodes,
    published un-noised (it sets q, and the log and results.json show it): under
    add/remove adjacency one client more changes it, so the guarantee does not
    cover it. In a local simulation the node count is a public setting.
    """
    if cfg["population"]:
        return f"N = {population} is the run-config `population`."
    base = (f"N = {population} is the number of SuperNodes connected at the start "
            f"(run-config population=0). Nodes that join later are only sampled into free "
            f"slots, so none is chosen more often than m/N.")
    if simulation:
        return (f"{base} In this local simulation that number is a public setting "
                f"(the federation's --num-supernodes), not a count of users.")
    return (f"{base} **That count is released un-noised (it sets q = m/N and is published "
            f"here) and is NOT covered by the guarantee**: under add/remove adjacency, one "
            f"client more or less changes it. In a deployment, set run-config `population` "
            f"to a public N (at least the nodes that may connect) to cover it.")


def server_optimizer(cfg: dict):
    """`server-optimizer` over the model's arrays (their shapes; values come each step).

    None for `sgd`: the mechanism's plain step w + server-lr * mean, which equals
    torch.optim.SGD bit for bit (tests/strategy/test_server_optimizer.py). Taking it
    without torch.optim keeps torch._dynamo, which any torch.optim optimizer imports
    on its first call (3 s of imports on 2 cores), off the start of every run.
    """
    if cfg["server-optimizer"] == "sgd":
        return None
    from dpfl_app.config import model_spec
    from dpfl_app.strategy.server_optimizer import ServerOptimizer
    from dpfl_app.task import build_model

    like = [v.numpy() for v in build_model(*model_spec(cfg)).state_dict().values()]
    return ServerOptimizer(cfg["server-optimizer"], like, cfg["server-lr"],
                           cfg["server-momentum"])


def audit_canaries(cfg: dict, population: int) -> CanaryAudit | None:
    """The privacy audit's canary clients (Andrew et al., ICLR 2024), if asked for."""
    k = cfg["audit-canaries"]
    if k == 0:
        return None
    from dpfl_app.privacy.audit import population_warning
    from dpfl_app.strategy.canaries import CanaryAudit, canary_seed

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


def is_simulation(grid: Grid) -> bool:
    """A local simulation: Flower's in-memory grid, whose SuperNodes never change."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def simulation_population(grid: Grid, clients: int, settle_s: float = 0.5,
                          timeout: float = 10.0) -> int:
    """The simulation's SuperNodes, without waiting for more: their number is fixed.

    Flower registers all of them in one loop as the simulation starts; wait
    only until the count is non-zero and steady. Too few is a set-up problem
    with one fix, so the error says exactly what to type.
    """
    from dpfl_app.strategy.dp_fedavg import NotEnoughNodes

    deadline = time.monotonic() + timeout
    count = len(list(grid.get_node_ids()))
    while time.monotonic() < deadline:
        time.sleep(settle_s)
        previous, count = count, len(list(grid.get_node_ids()))
        if count and count == previous:
            break
    if count < clients:
        raise NotEnoughNodes(
            f"this local simulation has {count} SuperNode(s), fewer than clients={clients} "
            f"per round. Give Flower's local simulation more, once: `flwr federation "
            f"simulation-config --num-supernodes {max(10, clients)} "
            f"--client-resources-num-cpus 1`, then run `flwr run .` again (or ask for "
            f"fewer: `flwr run . --run-config clients={max(1, count)}`)"
        )
    return count


def population(grid: Grid, cfg: dict) -> int:
    """N: the SuperNodes the run samples from (a deployment waits for them, boundedly)."""
    from dpfl_app.strategy.dp_fedavg import wait_for_nodes

    if is_simulation(grid):
        return simulation_population(grid, cfg["clients"])
    return len(wait_for_nodes(grid, cfg["clients"], cfg["node-wait-timeout"]))


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
    noise = state["noise"] if state else choose_noise(cfg, num_nodes)
    strategy = build_strategy(cfg, num_nodes, noise)
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
        run_dir, initial_model = state["run_dir"], state["model"]
        folder.update(path=run_dir, resumed=True)
    else:
        run_dir = outputs.make_run_dir(cfg["output-dir"], context.run_id)
        folder["path"] = run_dir
        torch.manual_seed(cfg["seed"])
        initial_model = build_model(*model_spec(cfg)).state_dict()
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
    else:
        report = privacy_report(strategy.ledger, len(strategy.records), recorder.stop_reason,
                                audit=recorder.audit, secure_aggregation=cfg["secure-aggregation"],
                                assumptions=[assumption],
                                simulation=simulation.summary() if simulation.simulated else None,
                                float_residual=recorder.float_residual(),
                                record_level=record_level_lines(
                                    record_model, strategy.ledger.rounds, cfg["record-clip"])
                                if record_model else None)
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
