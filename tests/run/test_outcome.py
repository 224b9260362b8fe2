"""A failed run never loses the privacy record of a round it released."""

from __future__ import annotations

import json

import pytest

from dpfl_app.run import outcome
from dpfl_app.run.recorder import RunRecorder
from tests.inprocess import ServerCrash, default_run_config, run_server


def test_a_crash_in_round_1_after_its_release_keeps_the_ledger(tmp_path, monkeypatch, flwr_lines):
    """Round 1 charged, its ledger written, its model evaluated; then a crash before
    the first checkpoint. The old code deleted the whole folder with the ledger."""
    def crash(recorder):
        raise ServerCrash("died before round 1's checkpoint")

    monkeypatch.setattr(RunRecorder, "save_checkpoint", crash)
    out = tmp_path / "out"
    with pytest.raises(ServerCrash):
        run_server(default_run_config(**{"output-dir": str(out), "rounds": 2}))
    (run_dir,) = list(out.iterdir())
    assert json.loads((run_dir / "ledger.json").read_text())["rounds"] == 1
    assert "privacy ledger is kept" in flwr_lines[-1] and "ledger.json" in flwr_lines[-1]
    assert "no outputs were kept" not in flwr_lines[-1]


def test_a_folder_without_a_charged_round_is_still_removed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ledger.json").write_text(json.dumps({"rounds": 0}))
    assert outcome.discard_unfinished(run_dir) and not run_dir.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "ledger.json").write_text(json.dumps({"rounds": 2}))
    assert not outcome.discard_unfinished(kept) and (kept / "ledger.json").exists()
