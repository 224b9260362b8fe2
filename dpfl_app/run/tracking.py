"""Experiment tracking (`tracking` key): TensorBoard or MLflow, DP-covered values only.

- `tensorboard`: event files in the run folder's `tensorboard/`; view all runs
  with `tensorboard --logdir <output-dir>`.
- `mlflow`: one MLflow run per run folder, in the experiment "dpfl_app", at
  `tracking-uri`; by default a local SQLite file `<output-dir>/mlflow.db`
  with artifacts in `<output-dir>/mlartifacts` (MLflow 3 refuses its older
  `./mlruns` file store). View with `mlflow ui --backend-store-uri
  sqlite:///<output-dir>/mlflow.db`.

What is logged is what the run folder may share: per round, the columns of
rounds.csv (`outputs.ROUND_COLUMNS`: test loss and accuracy, epsilon from
each accountant, the clip norm, the noised unclipped fraction, the noise's
standard deviation); once, the run config; at the end (MLflow) results.json,
privacy.md and accuracy.png. Never the operator diagnostics (exact cohort
sizes, reply counts, rejections): they are not covered by the guarantee.
Non-finite values (epsilon = inf without noise) are left out, since neither
backend stores them faithfully; the config says why. No timings either: a
round's wall time grows with the clients that trained, so every value is
stamped with the time the run's tracking started (and an MLflow run ends at
the time it started), never with when a round finished.

Each backend is an optional extra (`pip install "dpfl-app[tensorboard]"`,
`"dpfl-app[mlflow]"`), checked before training starts. A tracker that fails
during the run stops tracking with one warning; the run and its files go on.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.supercore import log

from dpfl_app.errors import ConfigError
from dpfl_app.run import console
from dpfl_app.run.outputs import ROUND_COLUMNS

EXPERIMENT = "dpfl_app"
STATE_FILE = "tracking.json"  # the MLflow run a resumed run continues
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # tracking -> module needed


def require(cfg: dict) -> None:
    """Fail before training when the chosen tracker's package is not installed."""
    module = PACKAGES.get(cfg["tracking"])
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"run-config key 'tracking' = {cfg['tracking']!r} needs the {module} package, "
            f"which is not installed: pip install \"dpfl-app[{cfg['tracking']}]\" "
            "(or tracking='none')")


def round_metrics(record: dict) -> dict[str, float]:
    """The finite, DP-covered numbers of one round: rounds.csv's columns, nothing else."""
    values = {key: record[key] for key in ROUND_COLUMNS if key != "round" and key in record}
    return {key: float(v) for key, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    """No tracking (`tracking='none'`); the interface the backends implement."""

    def log_config(self, cfg: dict) -> None:
        """The run config, once per tracked run."""

    def log_round(self, record: dict) -> None:
        """One round's DP-covered values (`round_metrics`), at step = the round."""

    def finish(self, succeeded: bool, files: list[Path]) -> None:
        """End the tracked run; `files` are shareable outputs to attach."""


class SafeTracker(Tracker):
    """Wraps a backend: its first error stops tracking with a warning, never the run."""

    def __init__(self, backend: Tracker, name: str) -> None:
        self.backend, self.name = backend, name

    def _call(self, method: str, *args) -> None:
        if self.backend is None:
            return
        try:
            getattr(self.backend, method)(*args)
        except Exception as err:  # pylint: disable=broad-exception-caught
            log(WARNING, "tracking=%s stopped (%s: %s); the run and its files go on",
                self.name, type(err).__name__, err)
            self.backend = None

    def log_config(self, cfg: dict) -> None:
        self._call("log_config", cfg)

    def log_round(self, record: dict) -> None:
        self._call("log_round", record)

    def finish(self, succeeded: bool, files: list[Path]) -> None:
        self._call("finish", succeeded, files)


class TensorBoardTracker(Tracker):
    """Scalars per round and the config as text, in `<run folder>/tensorboard/`."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.stamp = time.time()  # every event's wall time: no round timings

    def log_config(self, cfg: dict) -> None:
        rows = "\n".join(f"| {key} | {json.dumps(value)} |" for key, value in cfg.items())
        self.writer.add_text("run_config", "| key | value |\n|---|---|\n" + rows,
                             walltime=self.stamp)
        self.writer.flush()

    def log_round(self, record: dict) -> None:
        for key, value in round_metrics(record).items():
            self.writer.add_scalar(key, value, global_step=record["round"], walltime=self.stamp)
        self.writer.flush()

    def finish(self, succeeded: bool, files: list[Path]) -> None:
        self.writer.close()


def default_mlflow_uri(output_dir: str) -> str:
    return "sqlite:///" + str(Path(output_dir).expanduser().resolve() / "mlflow.db")


class MlflowTracker(Tracker):
    """One MLflow run per run folder (a resumed run continues its own)."""

    def __init__(self, cfg: dict, run_dir: Path, resumed: bool) -> None:
        from mlflow.tracking import MlflowClient

        console.configure(cfg)  # mlflow resets its loggers on import
        self.uri = cfg["tracking-uri"] or default_mlflow_uri(cfg["output-dir"])
        self.client = MlflowClient(self.uri)
        self.stamp = int(time.time() * 1000)  # every timestamp of the run: no round timings
        state = Path(run_dir) / STATE_FILE
        self.resumed = resumed and state.exists()
        if self.resumed:
            self.run_id = json.loads(state.read_text())["mlflow_run_id"]
            self.stamp = self.client.get_run(self.run_id).info.start_time
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            artifacts = None if cfg["tracking-uri"] else (
                Path(cfg["output-dir"]).expanduser().resolve() / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, start_time=self.stamp,
                                     run_name=Path(run_dir).name, tags={"run_folder": str(run_dir)})
        self.run_id = run.info.run_id
        state.write_text(json.dumps({"mlflow_run_id": self.run_id, "tracking_uri": self.uri}))

    def log_config(self, cfg: dict) -> None:
        if self.resumed:  # logged by the first part; MLflow params never change
            return
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[
            Param(key, json.dumps(value) if not isinstance(value, str) else value)
            for key, value in cfg.items()])

    def log_round(self, record: dict) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[
            Metric(key, value, self.stamp, record["round"])
            for key, value in round_metrics(record).items()])

    def finish(self, succeeded: bool, files: list[Path]) -> None:
        for path in files:
            if Path(path).exists():
                self.client.log_artifact(self.run_id, str(path))
        end = self.client.get_run(self.run_id).info.start_time  # no duration either
        self.client.set_terminated(self.run_id, "FINISHED" if succeeded else "FAILED",
                                   end_time=end)


def open_tracker(cfg: dict, run_dir: Path, resumed: bool = False) -> Tracker:
    """The run's tracker; a backend that cannot start fails the run before training."""
    if cfg["tracking"] == "none":
        return Tracker()
    require(cfg)
    try:
        backend = (TensorBoardTracker(run_dir) if cfg["tracking"] == "tensorboard"
                   else MlflowTracker(cfg, run_dir, resumed))
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"tracking={cfg['tracking']!r} could not start "
                          f"({type(err).__name__}: {err}); check tracking-uri "
                          f"{cfg['tracking-uri']!r}, or set tracking='none'") from err
    return SafeTracker(backend, cfg["tracking"])
