"""Server-side evaluation after every round, and a run folder that is always current.

After each round the recorder tests the global model on the server's held-out
set (the privacy-safe metric), logs one line per round, and rewrites
results.json, rounds.csv, final_model.pt, the operator diagnostics and
checkpoint.pt atomically. accuracy.png is redrawn at most every
PLOT_INTERVAL_S, and at the end.

The log line and every shareable file carry only DP-covered values; exact
counts go to outputs.DIAGNOSTICS_FILE (operator only).
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord
from flwr.supercore import log

from dpfl_app.run import checkpoint, outputs
from dpfl_app.config import data_source, model_spec
from dpfl_app.data.datasets import load_test_data, loader
from dpfl_app.privacy.record import accounting_record
from dpfl_app.privacy.record_level import RecordLevelModel, record_accounting
from dpfl_app.privacy.record_report import record_fields, record_log_text
from dpfl_app.run.plots import plot_run_accuracy
from dpfl_app.run.tracking import Tracker
from dpfl_app.strategy.dp_fedavg import DPFedAvgAdaptive
from dpfl_app.task import build_model, test

# Drawing accuracy.png takes matplotlib ~0.3-0.5 s, longer than a whole digits
# round (the benchmark's profile: half the ServerApp's time); a plot every
# half minute is enough to watch a run.
PLOT_INTERVAL_S = 30.0


class RunRecorder:
    """Evaluates, logs and persists a run; `evaluate` is the strategy's evaluate_fn."""

    def __init__(self, cfg: dict, run_dir: Path, strategy: DPFedAvgAdaptive,
                 accounting_extra: dict, initial: dict | None = None,
                 real_model=None, tracker: Tracker | None = None,
                 record_model: RecordLevelModel | None = None) -> None:
        self.cfg, self.run_dir, self.strategy = cfg, run_dir, strategy
        # A simulated deployment's run: the AccountingModel of its real clients. Every
        # epsilon the ledger gives is then the simulated deployment's, and says so.
        self.real_model = real_model
        self.tracker = tracker or Tracker()  # DP-covered values only (run/tracking.py)
        self.accounting_extra = accounting_extra  # fixed for the run; the rest is per round
        # Record-level DP-SGD at the sites: its epsilon for a site that trained every round
        # charged so far (the ledger's rounds: a redone round was trained twice).
        self.record_model = record_model
        test_set = load_test_data(cfg["dataset"], cfg["seed"], **data_source(cfg))
        self.test_loader = loader(test_set, 512, False)
        self.initial: dict = initial or {}
        self.model_state: dict | None = None
        self._plotted_at = time.monotonic()
        self._round_started = time.monotonic()  # reset by round 0's evaluation
        self._round_seconds: list[float] = []
        self.stop_reason: str | None = None
        self.audit: dict | None = None  # the privacy audit's results, once the run ends

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Test the global model on the server's held-out set."""
        net = build_model(*model_spec(self.cfg))
        net.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(net, self.test_loader)
        self.model_state = net.state_dict()
        if server_round == 0:
            if not self.initial:  # a resumed run keeps its original round 0
                self.initial = {"test_loss": loss, "test_accuracy": accuracy}
                log(INFO, "round 0: test accuracy %.4f, loss %.4f", accuracy, loss)
        else:
            rec = self.strategy.records[-1]
            rec.update(test_loss=loss, test_accuracy=accuracy)
            if self.record_model is not None:
                rec.update(record_fields(self.record_model, self.strategy.ledger.rounds))
            log(INFO, "%s", self.round_line(rec))
            self.write(final=False)
            self.save_checkpoint()
            self.tracker.log_round(rec)
        self._round_started = time.monotonic()
        return MetricRecord({"test_loss": loss, "test_accuracy": accuracy})

    def round_line(self, rec: dict) -> str:
        """One line per round: progress, accuracy, epsilon, clip norm.

        No reply or cohort counts: they are not part of the analysed release. No
        time either: a round's wall time grows with the clients that trained
        (and an empty round is instant), so it goes to the operator's
        diagnostics (`seconds`), with the estimate of the time left.
        """
        seconds = time.monotonic() - self._round_started
        self._round_seconds.append(seconds)
        left = self.cfg["rounds"] - rec["round"]
        steady = self._round_seconds[1:] or self._round_seconds  # round 1 pays the start-up
        if self.strategy.diagnostics:
            self.strategy.diagnostics[-1].update(
                seconds=round(seconds, 3), seconds_left_estimate=round(
                    left * sum(steady) / len(steady), 1))
        record = self.record_model is not None
        return (f"round {rec['round']}/{self.cfg['rounds']}: "
                f"test accuracy {rec['test_accuracy']:.4f} (loss {rec['test_loss']:.3f}) | "
                f"{'user-level ' if record else ''}{self.epsilon_label()} so far {rec['epsilon']:.3f} at delta "
                f"{self.cfg['target-delta']:g} | "
                + (f"{record_log_text(self.record_model, self.strategy.ledger.rounds)} | "
                   if record else "") +
                (f"clip norm {rec['clip_norm']:.4f} -> {rec['next_clip_norm']:.4f}"
                 if rec["clip_norm"] is not None else "no user-level clip"))

    def float_residual(self) -> dict | None:
        """What numpy's Gaussian sampler adds to (epsilon, delta), bounded (mechanism.py)."""
        from dpfl_app.privacy import mechanism

        strategy = self.strategy
        if strategy.current_arrays is None:
            return None
        dim = sum(int(a.numpy().size) for a in strategy.current_arrays.values())
        return mechanism.run_float_residual(
            strategy.split, strategy.num_sampled_clients, strategy.noise_scale, dim,
            strategy.ledger.rounds, strategy.ledger.epsilon(), self.cfg["target-delta"])

    def epsilon_label(self) -> str:
        return "epsilon" if self.real_model is None else "SIMULATED deployment's epsilon"

    def simulated_fields(self) -> dict:
        """results.json's labels for a simulated deployment, and this run's own epsilon."""
        if self.real_model is None:
            return {}
        from dpfl_app.privacy.accounting import epsilon_after, headline_accountant

        rounds = self.strategy.ledger.rounds
        return {"epsilon_is": "SIMULATED: the simulated deployment's, not this run's",
                "epsilon_this_run": epsilon_after(self.real_model, rounds,
                                                  headline_accountant(self.real_model)),
                "this_run_model": self.real_model.to_dict()}

    def results(self) -> dict:
        done = [r for r in self.strategy.records if "test_accuracy" in r]
        last = done[-1] if done else self.initial
        final = {
            "rounds_completed": len(done),
            "test_accuracy": last.get("test_accuracy"),
            "test_loss": last.get("test_loss"),
            "best_test_accuracy": max((r["test_accuracy"] for r in done), default=None),
            # Every charged round, also one released just before a crash.
            "epsilon": self.strategy.ledger.epsilon(),
            "epsilon_rdp": self.strategy.ledger.epsilon("rdp"),
            "epsilon_pld": self.strategy.ledger.epsilon("pld"),
            "accountant": self.strategy.ledger.headline,
            # deterministic-noise: epsilon above is inf; this is only a comparison figure.
            **({} if self.strategy.ledger.noise_secret else {
                "epsilon_if_noise_secret": self.strategy.ledger.epsilon_if_secret() if done else 0.0}),
            # secure aggregation: epsilon if no client drops out mid-protocol (an assumption)
            **({} if not self.strategy.ledger.model.withheld_inputs else {
                "epsilon_if_no_dropout": self.strategy.ledger.epsilon_if_no_dropout()}),
            **self.simulated_fields(),
            "delta": self.cfg["target-delta"],
            "stop_reason": self.stop_reason or (
                "completed all rounds" if last is not self.initial
                and last["round"] == self.cfg["rounds"] else "in progress or interrupted"),
        }
        accounting = {**accounting_record(self.strategy.ledger), **self.accounting_extra,
                      "user_level_clip": self.strategy.user_level_clip}
        if not self.strategy.user_level_clip:  # record-level DP alone: nothing to claim
            final["user_level_epsilon_claimed"] = False
        if self.record_model is not None:
            rounds = self.strategy.ledger.rounds
            final.update(record_fields(self.record_model, rounds),
                         record_delta=self.record_model.delta)
            accounting["record_level"] = {**record_accounting(self.record_model, rounds),
                                          "clip": self.cfg["record-clip"]}
        accounting["float_residual"] = self.float_residual()
        if self.real_model is not None:  # every epsilon in this file is the simulated one
            accounting["epsilon_is"] = final["epsilon_is"]
        # The model actually trained, not "auto" (the dataset's default)
        config = {**self.cfg, "model": model_spec(self.cfg)[0]}
        results = {"config": config, "accounting": accounting, "initial": self.initial,
                   "rounds": self.strategy.records, "final": final}
        if self.audit is not None:
            results["audit"] = self.audit
        return results

    def write(self, final: bool = True) -> None:
        if final and self.strategy.canaries is not None:  # the estimate needs every round
            self.audit = self.strategy.canaries.summary(
                self.cfg["target-delta"], self.strategy.ledger.epsilon_if_secret(),
                self.strategy.population)
        outputs.write_json(self.run_dir / "results.json", self.results())
        outputs.write_rounds_csv(self.run_dir / "rounds.csv", self.strategy.records)
        outputs.write_diagnostics(self.run_dir, self.strategy.diagnostics)
        if self.strategy.client_eval:  # client-eval=true: not DP, not shareable
            outputs.write_jsonl(self.run_dir / outputs.CLIENT_EVAL_FILE, self.strategy.client_eval)
        if final or time.monotonic() - self._plotted_at >= PLOT_INTERVAL_S:
            plot_run_accuracy(self.strategy.records, self.run_dir / "accuracy.png", self.initial)
            self._plotted_at = time.monotonic()
        if self.model_state is not None:
            outputs.save_model(self.run_dir / "final_model.pt", self.model_state)

    def save_checkpoint(self) -> None:
        strategy = self.strategy
        deterministic = self.cfg["deterministic-noise"]
        checkpoint.save(self.run_dir, {
            "round": strategy.records[-1]["round"],
            "model": self.model_state,
            "clip_norm": strategy.clipping_norm,
            "ledger": strategy.ledger.state_dict(),
            # Only reproducible (seeded) generators; the secret ones never leave memory.
            "rng": {"sampling": strategy.sampling_rng.bit_generator.state,
                    "noise": strategy.rng.bit_generator.state} if deterministic else None,
            "records": strategy.records,
            "initial": self.initial,
            "config": self.cfg,
            "noise": strategy.ledger.model.noise_multiplier,
            # post-processing of released means only: safe to store (momentum, Adam moments)
            "server_optimizer": (strategy.server_optimizer.state_dict()
                                 if strategy.server_optimizer else None),
            "audit": strategy.canaries.state_dict() if strategy.canaries else None,
        })
