"""The privacy audit through the real ServerApp and ClientApp, in one process."""

from __future__ import annotations

import json
import logging

import pytest

from dpfl_app.tools.audit import audit_row
from tests.inprocess import ServerCrash, default_run_config, run_server


def test_an_audit_run_reports_beside_the_accounted_epsilon_and_survives_a_resume(tmp_path,
                                                                                  caplog):
    caplog.set_level(logging.INFO)
    cfg = default_run_config(**{"output-dir": str(tmp_path), "deterministic-noise": True,
                                "rounds": 3, "audit-canaries": 40, "clients": 6})
    with pytest.raises(ServerCrash):
        run_server(cfg, crash_after_train_round=1)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    run_server({**cfg, "resume-from": str(run_dir)})

    results = json.loads((run_dir / "results.json").read_text())
    audit = results["audit"]
    assert audit["canaries"] == audit["unseen_canaries"] == 40
    assert audit["rounds_observed"] == 3  # the resumed run kept round 1's cosines
    assert len(audit["max_cosines"]["inserted"]) == len(audit["max_cosines"]["unseen"]) == 40
    final = results["final"]  # deterministic-noise: compare with the secret-noise figure
    assert audit["accounted_epsilon"] == pytest.approx(
        final.get("epsilon_if_noise_secret", final["epsilon"]))
    # 40 canaries give a wide interval at epsilon ~37 (seeds 42-46: 22 to 57): the
    # estimate may exceed the accounted epsilon by chance, its 95% interval may not.
    assert audit["epsilon"] > 0 and audit["verdict"] in ("below", "above-within-error")
    assert audit["epsilon_ci95"][0] <= audit["accounted_epsilon"]
    assert audit["canaries_per_round"] == pytest.approx(24, abs=6)  # 40 * 6/10 on average
    # `dpfl audit` tabulates the same comparison, not the guaranteed (here infinite) epsilon
    row = audit_row(results, 0.3, 40, 42, 1.0)
    assert row["accounted_epsilon"] == pytest.approx(audit["accounted_epsilon"])
    assert row["accounted_epsilon"] < float("inf")
    assert row["verdict"] == audit["verdict"]

    report = (run_dir / "privacy.md").read_text()
    assert "## Empirical privacy audit" in report and "lower estimate from one run" in report
    assert "not small compared with the population N=10" in report
    messages = [r.getMessage() for r in caplog.records]
    assert any("Canaries change the model a little" in m for m in messages)
    assert any("not small compared with the population" in m and r.levelno == logging.WARNING
               for m, r in zip(messages, caplog.records))


def test_without_canaries_there_is_no_audit(tmp_path):
    run_server(default_run_config(**{"output-dir": str(tmp_path), "rounds": 1}))
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert "audit" not in json.loads((run_dir / "results.json").read_text())
    assert "Empirical privacy audit" not in (run_dir / "privacy.md").read_text()
