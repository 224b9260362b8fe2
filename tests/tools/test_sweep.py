"""The noise sweep: table aggregation and plots without Flower, then one real tiny sweep."""

from __future__ import annotations

import csv
import json
import math

import pytest

from dpfl_app.tools import sweep
from dpfl_app.tools.federation import LocalFederation
from dpfl_app.run.plots import plot_run_accuracy, run_series
from dpfl_app.tools.sweep_report import frontier, markdown, round_curves, summarize, write_outputs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000


def _run(noise, seed, accuracy, epsilon, rounds=(0, 1, 2), wall=10.0):
    """A completed run's record, as `sweep.run_one` makes it."""
    return {"noise": noise, "seed": seed, "status": "finished:completed", "error": None,
            "wall_s": wall, "final_accuracy": accuracy[-1], "best_accuracy": max(accuracy),
            "epsilon": epsilon, "delta": 1e-5, "rounds": list(rounds), "accuracy": accuracy}


def _failed(noise, seed, error="finished:failed: ConfigError: bad noise"):
    return {"noise": noise, "seed": seed, "status": "finished:failed", "error": error,
            "wall_s": 4.0}


RUNS = [
    _run(0.0, 42, [0.1, 0.6, 0.8], math.inf),
    _run(0.0, 43, [0.1, 0.7, 0.9], math.inf),
    _run(1.0, 42, [0.1, 0.3, 0.5], 4.0, wall=20.0),
    _failed(1.0, 43),
    _failed(-1.0, 42),
]
META = {"command": "dpfl sweep --noise 0,1", "run_config": "", "repeats": 2,
        "seeds": [42, 43], "supernodes": 10, "machine": "test", "elapsed_s": 60.0}


def test_summarize_means_and_sample_std_over_completed_repeats():
    zero, one, bad = summarize(RUNS)
    assert zero["noise"] == 0.0 and zero["status"] == "ok" and zero["runs_ok"] == 2
    assert zero["final_accuracy_mean"] == pytest.approx(0.85)
    assert zero["final_accuracy_std"] == pytest.approx(math.sqrt(0.005))  # n - 1
    assert zero["best_accuracy_mean"] == pytest.approx(0.85)
    assert zero["epsilon"] == math.inf and zero["error"] == ""
    # one repeat failed: the row averages the other, and keeps the error
    assert one["status"] == "partial" and (one["runs_ok"], one["runs"]) == (1, 2)
    assert one["final_accuracy_mean"] == 0.5 and one["final_accuracy_std"] == 0.0
    assert one["wall_s_mean"] == 12.0 and "ConfigError" in one["error"]
    assert bad["status"] == "failed" and bad["final_accuracy_mean"] is None
    assert bad["epsilon"] is None and "ConfigError" in bad["error"]


def test_curves_and_frontier_use_only_completed_runs_and_noise_zero_as_reference():
    curves = round_curves(RUNS)
    assert list(curves) == ["noise 0", "noise 1"]  # the failed setting has no curve
    assert curves["noise 0"]["round"] == [0, 1, 2]
    assert curves["noise 0"]["mean"] == pytest.approx([0.1, 0.65, 0.85])
    assert curves["noise 1"]["repeats"] == 1
    # a repeat that stopped early: only the rounds every repeat reached
    short = round_curves([_run(0.5, 1, [0.1, 0.4], 2.0, rounds=(0, 1)),
                          _run(0.5, 2, [0.1, 0.6, 0.7], 3.0)])
    assert short["noise 0.5"]["round"] == [0, 1]
    points, reference = frontier(summarize(RUNS))
    assert reference == pytest.approx(0.85)
    assert points == [{"noise": 1.0, "epsilon": 4.0, "mean": 0.5, "std": 0.0}]  # no inf point


def test_markdown_shows_infinite_epsilon_and_the_failure():
    text = markdown(summarize(RUNS), META)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 4  # header + one row per noise level
    assert "ε at δ=1e-05" in rows[0]
    assert "| 0 | ∞ | 0.8500 ± 0.0707 |" in rows[1]
    assert "| 1 | 4.00 | 0.5000 ± 0.0000 |" in rows[2] and "1/2" in rows[2]
    assert "| -1 | — | failed |" in rows[3] and "ConfigError" in rows[3]


def test_write_outputs_writes_table_json_and_real_pngs(tmp_path):
    payload = write_outputs(tmp_path, RUNS, META)
    for name in ("accuracy_vs_round.png", "accuracy_vs_epsilon.png"):
        assert _is_png(tmp_path / name), name
    with open(tmp_path / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["noise"]) for r in rows] == [0.0, 1.0, -1.0]
    assert [r["status"] for r in rows] == ["ok", "partial", "failed"]
    assert float(rows[0]["epsilon"]) == math.inf
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["curves"]["noise 1"]["mean"] == payload["curves"]["noise 1"]["mean"]
    assert saved["frontier"]["reference"] == pytest.approx(0.85)
    assert saved["rows"][0]["epsilon"] == "inf"  # JSON has no inf


def test_run_plot_returns_its_series_and_handles_noise_zero(tmp_path):
    records = [{"round": 1, "test_accuracy": 0.5, "epsilon": 2.0},
               {"round": 2, "epsilon": 3.0},  # not evaluated yet: left out
               {"round": 3, "test_accuracy": 0.7, "epsilon": 4.0}]
    series = plot_run_accuracy(records, tmp_path / "a.png", {"test_accuracy": 0.1})
    assert series == {"round": [0, 1, 3], "test_accuracy": [0.1, 0.5, 0.7],
                      "epsilon": [0.0, 2.0, 4.0]}
    assert _is_png(tmp_path / "a.png")
    no_noise = [{"round": 1, "test_accuracy": 0.9, "epsilon": "inf"}]  # as in results.json
    assert run_series(no_noise)["epsilon"] == [math.inf]
    plot_run_accuracy(no_noise, tmp_path / "b.png")
    assert _is_png(tmp_path / "b.png")


def test_error_summary_prefers_the_exception_line():
    log = ("\x1b[91mERROR \x1b[0m:     Simulation raised an exception\nTraceback ...\n"
           "dpfl_app.config.ConfigError: run-config key 'noise' = -1.0 is invalid\n"
           "ERROR :     Exit Code: 700\n")
    line, tail = sweep.error_summary("finished:failed", log)
    assert line == ("finished:failed: dpfl_app.config.ConfigError: run-config key 'noise' "
                    "= -1.0 is invalid")
    assert "\x1b" not in tail and tail.endswith("Exit Code: 700")


def test_error_summary_prefers_the_apps_own_verdict():
    """The app fails a bad value with one line and no traceback; Flower adds its own."""
    log = ("\x1b[91mERROR \x1b[0m:     run FAILED: run-config key 'noise' = -1.0 is invalid; "
           "allowed: a number >= 0. no outputs were kept\n"
           "ERROR :     Exit Code: 700\n"
           "ERROR :     An unhandled exception occurred when running the simulation.\n")
    line, _ = sweep.error_summary("finished:failed", log)
    assert line == ("finished:failed: run FAILED: run-config key 'noise' = -1.0 is invalid; "
                    "allowed: a number >= 0. no outputs were kept")


def test_arguments_are_checked_before_anything_runs(tmp_path, capsys):
    args = sweep.parse_args(["--noise", "0,0.5", "--output", str(tmp_path / "new")])
    assert args.noise == [0.0, 0.5] and args.repeats == 1
    assert sweep.base_seed(args.user_config) == 42  # pyproject.toml's default
    assert sweep.base_seed({"seed": 7}) == 7
    (tmp_path / "earlier.csv").write_text("x")
    for bad in (["--noise", "0", "--run-config", "noise=1.0"],  # the sweep owns noise
                ["--noise", "0", "--run-config", "rounds=="],
                ["--noise", "0,x"],
                ["--noise", "0", "--output", str(tmp_path)]):  # never mixes with old files
        with pytest.raises(SystemExit):
            sweep.parse_args(bad)
    assert "--noise" in capsys.readouterr().err


def test_audit_column_shows_the_empirical_epsilon_and_flags_runs_above(tmp_path):
    runs = [{**_run(1.0, 42, [0.1, 0.5], 4.0), "empirical_epsilon": 2.0, "audit_verdict": "below"},
            {**_run(1.0, 43, [0.1, 0.6], 4.0), "empirical_epsilon": 5.0, "audit_verdict": "above"}]
    (row,) = summarize(runs)
    assert row["empirical_epsilon"] == 3.5 and row["audit_above"] == 1
    text = markdown([row], META)
    assert "| empirical ε (audit) |" in text and "ABOVE the accounted ε in 1 run(s)" in text
    header, rule = [line for line in text.splitlines() if line.startswith("|")][:2]
    assert header.count("|") == rule.count("|")  # the table stays well-formed
    assert "empirical" not in markdown(summarize(RUNS), META)  # no audit: no column
    args = sweep.parse_args(["--noise", "1", "--audit-canaries", "50",
                             "--output", str(tmp_path / "new")])
    assert args.audit_canaries == 50
    with pytest.raises(SystemExit):
        sweep.parse_args(["--noise", "1", "--audit-canaries=-1"])


@pytest.mark.e2e
def test_tiny_sweep_records_a_failed_setting_and_goes_on(tmp_path, monkeypatch, capsys):
    made = []

    class Recorded(LocalFederation):  # to check afterwards that its SuperLink is gone
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(sweep, "LocalFederation", Recorded)
    out = tmp_path / "sweep"
    # noise -1 is rejected by the app: that run ends finished:failed
    code = sweep.main(["--noise=-1,0,1.0", "--run-config", "rounds=2 clients=2",
                       "--supernodes", "4", "--output", str(out), "--timeout-per-run", "240"])
    assert code == 0
    assert made and not made[0].superlink_pids(), "the sweep's SuperLink is still running"
    printed = capsys.readouterr().out
    assert "[run 3/3] noise=1 seed=42 round 2/2" in printed

    with open(out / "sweep.csv") as handle:
        rows = {float(r["noise"]): r for r in csv.DictReader(handle)}
    assert rows[-1.0]["status"] == "failed"
    assert "'noise' = -1.0" in rows[-1.0]["error"]
    assert rows[0.0]["status"] == rows[1.0]["status"] == "ok"
    assert float(rows[0.0]["epsilon"]) == math.inf and 0 < float(rows[1.0]["epsilon"]) < 100
    assert "failed" in (out / "sweep.md").read_text()

    saved = json.loads((out / "sweep.json").read_text())
    assert list(saved["curves"]) == ["noise 0", "noise 1"]
    assert all(c["round"] == [0, 1, 2] for c in saved["curves"].values())
    front = saved["frontier"]
    assert front["reference"] == pytest.approx(float(rows[0.0]["final_accuracy_mean"]))
    assert [p["noise"] for p in front["points"]] == [1.0]
    for name in ("accuracy_vs_round.png", "accuracy_vs_epsilon.png"):
        assert _is_png(out / name), name

    for run in saved["runs"][1:]:  # each completed run has its own folder and plot
        (run_dir,) = [p for p in (out / "runs").glob(f"noise={run['noise']:g}-seed-42/*/")]
        results = json.loads((run_dir / "results.json").read_text())
        assert results["config"]["noise"] == run["noise"] and results["config"]["seed"] == 42
        assert _is_png(run_dir / "accuracy.png")
        series = run_series(results["rounds"], results["initial"])
        assert series["round"] == [0, 1, 2] and series["test_accuracy"] == run["accuracy"]
    assert (out / "runs" / "noise=-1-seed-42" / "flwr-log-tail.txt").exists()
