"""The real ServerApp `main` and ClientApp, wired in one process (no SuperLink).

Covers what needs the whole server but not Flower's transport: resume after
a crash, the budget stop, noise calibration, dropouts, and what may be logged.
"""

from __future__ import annotations

import csv
import json
import logging
import re

import pytest

from dpfl_app.privacy.accounting import AccountingModel, epsilon_after
from dpfl_app.run.outputs import read_diagnostics
from tests.inprocess import ServerCrash, default_run_config, run_server


def _results(out) -> tuple:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir, json.loads((run_dir / "results.json").read_text())


def _config(out, **kw):
    """Secret noise by default (deterministic-noise makes every epsilon inf)."""
    return default_run_config(**{"output-dir": str(out), "deterministic-noise": False, **kw})


def test_resume_after_crash_equals_an_uninterrupted_run(tmp_path):
    straight = _config(tmp_path / "straight", rounds=4, **{"deterministic-noise": True})
    run_server(straight)
    _, expected = _results(tmp_path / "straight")

    crashing = _config(tmp_path / "crash", rounds=4, **{"deterministic-noise": True})
    with pytest.raises(ServerCrash):
        run_server(crashing, crash_after_train_round=2)
    run_dir, partial = _results(tmp_path / "crash")
    assert [r["round"] for r in partial["rounds"]] == [1, 2]
    run_server({**crashing, "resume-from": str(run_dir)})
    _, resumed = _results(tmp_path / "crash")

    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    assert resumed["final"]["epsilon"] == expected["final"]["epsilon"] == "inf"
    assert resumed["final"]["epsilon_if_noise_secret"] == pytest.approx(
        expected["final"]["epsilon_if_noise_secret"], rel=1e-12)
    # deterministic-noise restores the noise RNG too, so the runs are identical.
    assert [r["test_accuracy"] for r in resumed["rounds"]] == \
        [r["test_accuracy"] for r in expected["rounds"]]


def test_resume_refuses_a_changed_privacy_setting(tmp_path):
    cfg = _config(tmp_path, rounds=3)
    with pytest.raises(ServerCrash):
        run_server(cfg, crash_after_train_round=1)
    run_dir, _ = _results(tmp_path)
    with pytest.raises(ValueError, match=r"noise \(0.3 -> 1.0\)"):
        run_server({**cfg, "noise": 1.0, "resume-from": str(run_dir)})
    with pytest.raises(ValueError, match="no checkpoint found"):
        run_server({**cfg, "resume-from": str(tmp_path / "nowhere")})


def test_budget_stop_saves_model_and_says_why(tmp_path):
    model = AccountingModel("poisson", 0.3, 10, 6, 1e-5)
    eps2, eps3 = epsilon_after(model, 2, "pld"), epsilon_after(model, 3, "pld")
    cfg = _config(tmp_path, rounds=5, **{"max-epsilon": (eps2 + eps3) / 2})
    run_server(cfg)
    run_dir, results = _results(tmp_path)
    assert results["final"]["rounds_completed"] == 2
    assert results["final"]["epsilon"] <= cfg["max-epsilon"]
    assert "max-epsilon" in results["final"]["stop_reason"]
    assert (run_dir / "final_model.pt").exists()
    assert "stopped" in (run_dir / "privacy.md").read_text().lower()


def test_target_epsilon_calibrates_the_noise(tmp_path):
    run_server(_config(tmp_path, rounds=3, **{"target-epsilon": 8.0}))
    _, results = _results(tmp_path)
    z = results["accounting"]["noise_multiplier"]
    assert z > 0.3
    assert results["final"]["epsilon"] <= 8.0
    assert results["final"]["epsilon"] == pytest.approx(8.0, rel=0.05)


def test_dropped_clients_keep_the_fixed_denominator(tmp_path):
    cfg = _config(tmp_path, rounds=2, sampling="fixed", clients=6)
    run_server(cfg, drop_nodes={1, 2, 3, 4, 5})
    run_dir, results = _results(tmp_path)
    diagnostics = read_diagnostics(run_dir)  # exact counts: operator only
    for rec, diag in zip(results["rounds"], diagnostics, strict=True):
        assert diag["num_sampled"] == 6  # fixed: exactly m of N=10 slots, all online
        assert diag["num_replies"] < 6  # at least one of 6 sampled from 10 is among the 5 dropped
        assert rec["noise_std"] == pytest.approx(
            results["accounting"]["update_noise_multiplier"] * rec["clip_norm"] / 6)


def test_no_individual_update_norm_or_bit_is_logged_or_written(tmp_path, caplog):
    """Only aggregates leave the server: scan every log record and output file."""
    caplog.set_level(logging.DEBUG)
    run_server(_config(tmp_path, rounds=2, **{"client-eval": True}))
    run_dir, _ = _results(tmp_path)
    texts = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.INFO]
    texts += [p.read_text() for p in run_dir.iterdir() if p.suffix in (".json", ".csv", ".md")]
    for text in texts:
        for private in ("norm_bit", "train-loss", "train_loss", "model update norm"):
            assert private not in text, (private, text[:200])


def test_deterministic_noise_reports_no_guarantee_everywhere(tmp_path, caplog):
    """The seed is in results.json, so the noise can be subtracted: epsilon = inf in
    results.json, rounds.csv, privacy.md and the log; the secret-noise figure is labelled."""
    caplog.set_level(logging.INFO)
    run_server(_config(tmp_path, rounds=2, **{"deterministic-noise": True}))
    run_dir, results = _results(tmp_path)
    model = AccountingModel("poisson", 0.3, 10, 10, 1e-5)  # the default: all 10 every round
    assert results["config"]["seed"] is not None
    assert results["config"]["model"] == "digits-linear"  # the model it trained, not "auto"
    assert results["final"]["epsilon"] == results["final"]["epsilon_rdp"] == "inf"
    assert results["final"]["epsilon_if_noise_secret"] == pytest.approx(
        epsilon_after(model, 2, "pld"), rel=1e-9)
    for rec in results["rounds"]:
        assert rec["epsilon"] == rec["epsilon_rdp"] == rec["epsilon_pld"] == "inf"
        assert rec["epsilon_if_noise_secret"] == pytest.approx(
            epsilon_after(model, rec["round"], "pld"), rel=1e-9)
    with open(run_dir / "rounds.csv", newline="") as f:
        assert {row["epsilon"] for row in csv.DictReader(f)} == {"inf"}
    report = (run_dir / "privacy.md").read_text()
    assert "Guarantee: none (ε = ∞)" in report
    assert "ε if the noise were secret (NOT a guarantee for this run)" in report
    round_lines = [r.getMessage() for r in caplog.records if "test accuracy" in r.getMessage()
                   and "epsilon" in r.getMessage()]
    assert round_lines and all(re.search(r"epsilon (so far )?inf ", line) for line in round_lines)
