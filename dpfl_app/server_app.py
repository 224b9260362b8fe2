"""dpfl_app ServerApp: FedAvg wrapped in correct DP-FedAvg with adaptive clipping."""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from dpfl_app import outputs
from dpfl_app.config import model_for, validate
from dpfl_app.data import load_test_data, loader
from dpfl_app.privacy import mechanism
from dpfl_app.privacy.accounting import AccountingModel, PrivacyLedger, calibrate_noise
from dpfl_app.privacy.report import privacy_report
from dpfl_app.strategy import BudgetExhausted, DPFedAvgAdaptive, wait_for_nodes
from dpfl_app.task import build_model, test

app = ServerApp()


def choose_noise(cfg: dict, population: int) -> float:
    """`noise`, or the z calibrated to meet `target-epsilon` in `rounds` rounds."""
    if cfg["target-epsilon"] <= 0:
        return cfg["noise"]
    z = calibrate_noise(cfg["target-epsilon"], cfg["target-delta"], cfg["rounds"],
                        population, cfg["clients"], cfg["sampling"])
    log(INFO, "target-epsilon=%s: calibrated noise multiplier z=%.4f (replaces noise=%s)",
        cfg["target-epsilon"], z, cfg["noise"])
    return z


class RunRecorder:
    """Server-side evaluation after every round, and the run folder kept current."""

    def __init__(self, cfg: dict, run_dir, strategy: DPFedAvgAdaptive, accounting: dict):
        self.cfg, self.run_dir, self.strategy = cfg, run_dir, strategy
        self.accounting = accounting
        self.test_loader = loader(load_test_data(cfg["dataset"], cfg["seed"]), 512, False)
        self.initial: dict = {}
        self.final_state: dict | None = None
        self.stop_reason: str | None = None

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Test the global model on the server's held-out set (privacy-safe)."""
        net = build_model(model_for(self.cfg))
        net.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(net, self.test_loader)
        self.final_state = net.state_dict()
        if server_round == 0:
            self.initial = {"test_loss": loss, "test_accuracy": accuracy}
            log(INFO, "round 0: test accuracy %.4f, loss %.4f", accuracy, loss)
        else:
            rec = self.strategy.records[-1]
            rec.update(test_loss=loss, test_accuracy=accuracy)
            log(INFO, "round %d/%d: test accuracy %.4f, loss %.4f | clip norm %.4f -> %.4f, "
                "noise std %.5f | replies %d/%d | epsilon %.3f at delta %g",
                rec["round"], self.cfg["rounds"], accuracy, loss, rec["clip_norm"],
                rec["next_clip_norm"], rec["noise_std"], rec["num_replies"],
                self.strategy.num_sampled_clients, rec["epsilon"], self.cfg["target-delta"])
            self.write()
        return MetricRecord({"test_loss": loss, "test_accuracy": accuracy})

    def results(self) -> dict:
        rounds = self.strategy.records
        done = [r for r in rounds if "test_accuracy" in r]
        final = {
            "rounds_completed": len(done),
            "test_accuracy": done[-1]["test_accuracy"] if done else self.initial.get("test_accuracy"),
            "test_loss": done[-1]["test_loss"] if done else self.initial.get("test_loss"),
            "best_test_accuracy": max((r["test_accuracy"] for r in done), default=None),
            "epsilon": self.strategy.ledger.epsilon() if done else 0.0,
            "delta": self.cfg["target-delta"],
            "stop_reason": self.stop_reason or "completed all rounds",
        }
        return {"config": self.cfg, "accounting": self.accounting, "initial": self.initial,
                "rounds": rounds, "final": final}

    def write(self) -> None:
        outputs.write_json(self.run_dir / "results.json", self.results())
        outputs.write_rounds_csv(self.run_dir / "rounds.csv", self.strategy.records)
        if self.final_state is not None:
            outputs.save_model(self.run_dir / "final_model.pt", self.final_state)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, train with DP, account for every round, write results."""
    cfg = validate(dict(context.run_config))  # fails before anything starts
    population = len(wait_for_nodes(grid, cfg["clients"], cfg["node-wait-timeout"]))
    noise = choose_noise(cfg, population)
    split = mechanism.split_noise(
        noise, cfg["clients"],
        None if cfg["clipped-count-stddev"] == "auto" else float(cfg["clipped-count-stddev"]),
    )
    if split.raised:
        log(WARNING, "clipped-count-stddev raised from m/20=%.3f to %.3f so that noise z=%s "
            "< 2*sigma_b; update noise multiplier z_delta=%.4f", split.default_count_stddev,
            split.count_stddev, noise, split.update_noise_multiplier)
    ledger = PrivacyLedger(AccountingModel(cfg["sampling"], noise, population, cfg["clients"],
                                           cfg["target-delta"]))
    accounting = {**ledger.to_dict(), "update_noise_multiplier": split.update_noise_multiplier,
                  "clipped_count_stddev": split.count_stddev}
    log(INFO, "population N=%d SuperNodes, m=%d per round, sampling=%s, z=%.4f "
        "(z_delta=%.4f, sigma_b=%.3f)", population, cfg["clients"], cfg["sampling"], noise,
        split.update_noise_multiplier, split.count_stddev)

    fixed = cfg["sampling"] == "fixed"
    fedavg = FedAvg(
        fraction_train=cfg["clients"] / population if fixed else 1.0,
        min_train_nodes=cfg["clients"] if fixed else 1,
        min_available_nodes=1,
        fraction_evaluate=1.0 if cfg["client-eval"] else 0.0,
        min_evaluate_nodes=1,
    )
    rng = np.random.default_rng(cfg["seed"] if cfg["deterministic-noise"] else None)
    if cfg["deterministic-noise"]:
        log(WARNING, "deterministic-noise=true: the DP noise is reproducible from seed=%d. "
            "Fine for experiments; never deploy with it.", cfg["seed"])
    strategy = DPFedAvgAdaptive(
        fedavg, split, cfg["clients"], ledger, rng,
        initial_clip=cfg["initial-clip"], target_quantile=cfg["target-quantile"],
        clip_lr=cfg["clip-lr"], sampling=cfg["sampling"], min_replies=cfg["min-replies"],
        node_wait_timeout=cfg["node-wait-timeout"], max_epsilon=cfg["max-epsilon"],
        server_lr=cfg["server-lr"],
    )
    run_dir = outputs.make_run_dir(cfg["output-dir"], context.run_id)
    log(INFO, "writing results to %s", run_dir)
    recorder = RunRecorder(cfg, run_dir, strategy, accounting)

    torch.manual_seed(cfg["seed"])
    initial = ArrayRecord(build_model(model_for(cfg)).state_dict())
    try:
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg["rounds"],
                       timeout=cfg["round-timeout"], train_config=ConfigRecord(),
                       evaluate_config=ConfigRecord(), evaluate_fn=recorder.evaluate)
    except BudgetExhausted as stop:
        recorder.stop_reason = f"privacy budget: {stop}"
        log(WARNING, "training stopped early: %s", recorder.stop_reason)
    recorder.write()
    report = privacy_report(ledger, len(strategy.records), recorder.stop_reason)
    outputs.write_atomic(run_dir / "privacy.md", report.encode())
    for line in report.splitlines():
        log(INFO, "%s", line)
    log(INFO, "results in %s", run_dir)
