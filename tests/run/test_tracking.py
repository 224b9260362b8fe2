"""Experiment tracking logs what rounds.csv shares, read back with each backend's own reader.

The runs are the real ServerApp in process (tests/inprocess.py). Each backend
is an optional extra: its test skips, with the reason, where it is not
installed (the `test` extra installs both).
"""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest

from dpfl_app.config import TRACKERS, validate
from dpfl_app.errors import ConfigError
from dpfl_app.run import tracking
from dpfl_app.run.outputs import ROUND_COLUMNS, read_diagnostics
from tests.inprocess import ServerCrash, default_run_config, run_server

# Keys of the operator diagnostics (exact counts, node ids): never tracked.
DIAGNOSTIC_KEYS = {"num_sampled", "num_replies", "num_rejected", "rejected", "cohort"}


def _run_folder(out):
    (run_dir,) = [p for p in out.iterdir() if p.is_dir() and p.name != "mlartifacts"]
    return run_dir, json.loads((run_dir / "results.json").read_text())


def _expected(results: dict) -> dict[str, dict[int, float]]:
    """metric -> {round: value} from results.json: what the tracker must hold."""
    series: dict[str, dict[int, float]] = {}
    for rec in results["rounds"]:
        for key, value in tracking.round_metrics(rec).items():
            series.setdefault(key, {})[rec["round"]] = value
    return series


def test_round_metrics_are_the_shared_columns_and_only_finite():
    record = {"round": 3, "test_accuracy": 0.9, "epsilon": float("inf"), "clip_norm": 1.2,
              "noisy_unclipped_fraction": 0.4, "num_replies": 6, "num_sampled": 7,
              "client_eval_not_dp": {"eval-acc": 0.8}}
    assert tracking.round_metrics(record) == {"test_accuracy": 0.9, "clip_norm": 1.2,
                                              "noisy_unclipped_fraction": 0.4}


def test_the_config_table_and_the_trackers_agree():
    assert TRACKERS == ("none", *tracking.PACKAGES)


def test_a_missing_package_fails_before_training_and_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"'tracking' = 'mlflow' needs the mlflow package.*"
                                          r"pip install \"dpfl-app\[mlflow\]\""):
        tracking.require(validate(default_run_config(tracking="mlflow")))


def test_a_tracker_that_breaks_stops_tracking_with_a_warning_not_the_run(caplog):
    class Broken(tracking.Tracker):
        calls = 0

        def log_round(self, record):
            Broken.calls += 1
            raise OSError("disk full")

    safe = tracking.SafeTracker(Broken(), "mlflow")
    with caplog.at_level(logging.WARNING):
        safe.log_round({"round": 1})
        safe.log_round({"round": 2})
        safe.finish(True, [])
    assert Broken.calls == 1
    assert [r.getMessage() for r in caplog.records] == [
        "tracking=mlflow stopped (OSError: disk full); the run and its files go on"]


def test_tensorboard_holds_every_round_of_results_json_and_the_config(tmp_path):
    pytest.importorskip("tensorboard", reason="tracking=tensorboard needs the tensorboard "
                                              "extra: pip install \"dpfl-app[tensorboard]\"")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_server(default_run_config(**{"output-dir": str(tmp_path), "rounds": 2,
                                     "tracking": "tensorboard"}))
    run_dir, results = _run_folder(tmp_path)
    events = EventAccumulator(str(run_dir / "tensorboard"),
                              size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    expected = _expected(results)
    assert set(events.Tags()["scalars"]) == set(expected) <= set(ROUND_COLUMNS)
    assert {"test_accuracy", "test_loss", "epsilon", "clip_norm",
            "noisy_unclipped_fraction"} <= set(expected)
    for key, by_round in expected.items():
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx(by_round, rel=1e-6), key  # float32 in event files
    # no round timings (a round's time grows with its cohort): one wall time for all
    assert len({e.wall_time for key in expected for e in events.Scalars(key)}) == 1
    (config,) = events.Tensors("run_config/text_summary")
    text = config.tensor_proto.string_val[0].decode()
    assert "| noise | 0.3 |" in text and '| model | "digits-linear" |' in text
    diagnostics = set().union(*(d.keys() for d in read_diagnostics(run_dir)))
    assert not diagnostics & set(events.Tags()["scalars"])


def test_mlflow_continues_its_run_after_a_resume_and_holds_only_shared_values(tmp_path):
    pytest.importorskip("mlflow", reason="tracking=mlflow needs the mlflow extra: "
                                         "pip install \"dpfl-app[mlflow]\"")
    from mlflow.tracking import MlflowClient

    cfg = default_run_config(**{"output-dir": str(tmp_path), "rounds": 2, "tracking": "mlflow",
                                "deterministic-noise": True})
    with pytest.raises(ServerCrash):
        run_server(cfg, crash_after_train_round=1)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name != "mlartifacts"]
    run_server({**cfg, "resume-from": str(run_dir)})
    run_dir, results = _run_folder(tmp_path)

    client = MlflowClient(tracking.default_mlflow_uri(str(tmp_path)))
    (run,) = client.search_runs([client.get_experiment_by_name("dpfl_app").experiment_id])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    expected = _expected(results)
    assert set(run.data.metrics) == set(expected) <= set(ROUND_COLUMNS)
    # deterministic-noise: epsilon is inf (left out); the secret-noise figure is there
    assert "epsilon" not in expected and "epsilon_if_noise_secret" in expected
    stamps = {run.info.start_time, run.info.end_time}
    for key, by_round in expected.items():
        history = client.get_metric_history(run.info.run_id, key)
        assert {m.step: m.value for m in history} == pytest.approx(by_round, rel=1e-12), key
        stamps |= {m.timestamp for m in history}
    assert len(stamps) == 1  # no round timings and no duration, even across the resume
    assert run.data.params["noise"] == "0.3" and run.data.params["model"] == "digits-linear"
    assert run.data.params["resume-from"] == ""  # the first part's config, never rewritten
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"results.json", "privacy.md", "accuracy.png"}
    diagnostics = set().union(*(d.keys() for d in read_diagnostics(run_dir)))
    assert diagnostics and not (diagnostics | DIAGNOSTIC_KEYS) & set(run.data.metrics)
