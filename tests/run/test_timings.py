"""Round timings count the cohort: they stay out of the shareable log (operator only).

A round's wall time grows with the clients that trained (an empty round is
instant), so the round line printed "(3.8 s, about 15 s left)" was an
un-noised participation signal, and so is Flower's total "finished in 12.34s".
"""

from __future__ import annotations

import re

from dpfl_app.run.outputs import read_diagnostics
from tests.inprocess import default_run_config, run_server

SECONDS = re.compile(r"\d+(\.\d+)? ?s\b")


def test_the_log_has_no_round_times_and_the_diagnostics_have_them(tmp_path, flwr_lines):
    run_server(default_run_config(**{"output-dir": str(tmp_path), "rounds": 2}))
    rounds = [ln for ln in flwr_lines if re.match(r"round [12]/2", ln)]
    assert len(rounds) == 2
    for line in rounds:
        assert not SECONDS.search(line.split("test accuracy")[0]), line
        assert "left" not in line, line
    assert not any("finished in" in ln for ln in flwr_lines)
    # Flower's closing line, where the console filter still shows it, carries no time.
    assert all(ln == "Strategy execution finished" for ln in flwr_lines
               if ln.startswith("Strategy execution"))
    (run_dir,) = list(tmp_path.iterdir())
    diagnostics = read_diagnostics(run_dir)  # operator only
    assert [d["round"] for d in diagnostics] == [1, 2]
    assert all(d["seconds"] >= 0 and "seconds_left_estimate" in d for d in diagnostics)


def test_the_run_folders_file_times_are_all_the_run_start(tmp_path):
    """Files rewritten each round would date the last rounds; afterwards all carry the start."""
    import os
    import time

    run_server(default_run_config(**{"output-dir": str(tmp_path), "rounds": 2}))
    (run_dir,) = list(tmp_path.iterdir())
    start = time.mktime(time.strptime(run_dir.name[:15], "%Y%m%d-%H%M%S"))
    paths = [run_dir, *run_dir.rglob("*")]
    assert {"results.json", "rounds.csv", "privacy.md"} <= {p.name for p in paths}
    assert {os.stat(p).st_mtime for p in paths} == {start}
