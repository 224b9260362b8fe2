"""What a run prints: our lines and the Flower lines a user needs; `verbose=true` for all.

The in-process runs go through the real ServerApp `main` and Flower's real
strategy loop (`Strategy.start`), so the Flower lines checked here are the ones
flwr 1.42 logs. Flower's last words after a failure (its "raised an exception"
and "Exit Code" block) are logged by processes we cannot start in-process:
they are replayed as records with Flower's own template and file path.
"""

from __future__ import annotations

import logging

import flwr.supercore.exit.exit as flower_exit
import pytest

from dpfl_app.errors import DataUnavailable
from dpfl_app.run import console, outcome
from tests.inprocess import default_run_config, run_server

# Lines Flower's strategy loop logs in every run (flwr 1.42), and the warning
# FedAvg(fraction_evaluate=0.0) logged in every run without client-eval.
FLOWER_NOISE = ("ConfigRecord (train): (empty!)", "Final results:", "[ROUND 1/1]",
                "configure_train: Sampled", "Initial global evaluation results",
                "└──> MetricRecord", "Strategy execution finished",
                "DP-FedAvg with adaptive clipping (Andrew et al. 2021):")
FRACTION_EVALUATE = "fraction_evaluate is set to 0.0"


def _run_and_capture(tmp_path, **keys) -> tuple[list[str], object]:
    """One in-process run of one round; every message that passes Flower's logger."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        grid = run_server(default_run_config(**{"rounds": 1, "output-dir": str(tmp_path),
                                                **keys}))
    finally:
        logger.removeHandler(handler)
        console.configure({})  # leave the process quiet
    return lines, grid


def _noise(lines: list[str]) -> list[str]:
    return [ln for ln in lines if any(part in ln for part in FLOWER_NOISE)]


def test_a_default_run_prints_our_lines_without_flowers_repetitions(tmp_path):
    lines, grid = _run_and_capture(tmp_path)
    assert _noise(lines) == []
    assert not [ln for ln in lines if FRACTION_EVALUATE in ln]
    assert "evaluate" not in {m.metadata.message_type for m in grid.sent}  # still skipped
    assert any(ln.startswith("config: digits data") and "clip norm C_0=1.3" in ln
               for ln in lines)
    assert any(ln.startswith("round 1/1: test accuracy") for ln in lines)
    assert lines[-1].startswith("run SUCCEEDED")
    # the privacy report's verdict is printed; the rest is named, in privacy.md
    assert any(ln.startswith("**Guarantee:**") for ln in lines)
    assert not any(ln.startswith("## Threat model") for ln in lines)
    assert lines[-2].startswith("The full report (What would reach")
    assert lines[-2].endswith("privacy.md")
    assert len(lines) <= 25, "\n".join(lines)


def test_verbose_brings_back_every_flower_line_and_the_whole_report(tmp_path):
    lines, grid = _run_and_capture(tmp_path, verbose=True, **{"client-eval": True})
    found = " ".join(_noise(lines))
    assert all(part in found for part in FLOWER_NOISE), found
    assert any(ln.startswith("## Threat model") for ln in lines)
    # never a warning about a setting we chose ourselves, even in verbose mode
    assert not [ln for ln in lines if FRACTION_EVALUATE in ln]
    assert "evaluate" in {m.metadata.message_type for m in grid.sent}  # client-eval=true


def _flower_ending(err: BaseException) -> None:
    """What flwr-simulation logs once the ServerApp's exception reaches it (flwr 1.42)."""
    logger = logging.getLogger("flwr")
    for msg, args, exc_info, path in (
            (console.RAISED, ("Simulation",), (type(err), err, err.__traceback__), __file__),
            ("Exit Code: 700\nAn unhandled exception occurred when running the simulation."
             "\n\nFor more information, visit: <https://flower.ai/docs>", (), None,
             flower_exit.__file__)):
        logger.handle(logging.LogRecord("flwr", logging.ERROR, path, 1, msg, args, exc_info))


def _fail(err: BaseException, verbose: bool = False) -> BaseException:
    console.configure({"verbose": verbose})
    try:
        raise err
    except type(err) as caught:
        outcome.report_failure(caught, None, False, run_id=7)
        _flower_ending(caught)
        return caught


def _formatted(handler_lines: list[logging.LogRecord]) -> list[str]:
    formatter = logging.Formatter("%(message)s")
    return [ln for rec in handler_lines for ln in formatter.format(rec).splitlines()]


@pytest.fixture
def flwr_records():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    console.configure({})


def test_after_an_input_error_our_line_is_the_last_and_has_no_traceback(flwr_records):
    _fail(DataUnavailable("dataset='mnist' needs ylecun/mnist from the Hub; set data-dir"))
    lines = _formatted(flwr_records)
    assert len(lines) == 1, lines
    assert lines[0].startswith("run FAILED: dataset='mnist' needs ylecun/mnist")
    assert "`flwr ls` status finished:failed (run 7); no outputs were kept" in lines[0]


def test_a_bugs_traceback_comes_before_our_last_line_once(flwr_records):
    _fail(ZeroDivisionError("division by zero"))
    lines = _formatted(flwr_records)
    assert lines[-1].startswith("run FAILED: ZeroDivisionError: division by zero.")
    assert sum(ln.startswith("Traceback") for ln in lines) == 1
    assert lines.index("the run stopped on an unexpected error:") < len(lines) - 1
    assert not any(ln.startswith("Exit Code") for ln in lines)


def test_verbose_keeps_flowers_ending_after_our_line(flwr_records):
    _fail(ZeroDivisionError("division by zero"), verbose=True)
    lines = _formatted(flwr_records)
    failed = next(i for i, ln in enumerate(lines) if ln.startswith("run FAILED"))
    assert "Simulation raised an exception" in lines[failed + 1:]
    assert any(ln.startswith("Exit Code: 700") for ln in lines[failed + 1:])
    assert sum(ln.startswith("Traceback") for ln in lines) == 1  # Flower's, not twice


def test_a_new_run_shows_flowers_failure_lines_until_it_fails_itself(flwr_records):
    _fail(ZeroDivisionError("x"))
    console.configure({})  # the next run in this process (an in-process sweep)
    _flower_ending(ValueError("not ours"))
    assert "Simulation raised an exception" in _formatted(flwr_records)


def test_the_report_in_the_log_is_its_verdict_and_names_the_file():
    report = "\n".join(["# Privacy report", "", "**Guarantee:** g", "", "**Strength:** weak.",
                        "", "## What would reach ε ≤ 8 (same N = 10)", "", "- more noise",
                        "", "## Empirical privacy audit (one run, canary clients)", "",
                        "**Empirical ε ≈ 3**", "", "## Threat model: who sees what", "", "- x"])
    short = console.report_lines(report, "/runs/a/privacy.md", verbose=False)
    assert short == ["# Privacy report", "**Guarantee:** g", "**Strength:** weak.",
                     "## Empirical privacy audit (one run, canary clients)",
                     "**Empirical ε ≈ 3**",
                     "The full report (What would reach ε ≤ 8; Threat model: who sees what): "
                     "/runs/a/privacy.md"]
    assert console.report_lines(report, "p", verbose=True) == report.splitlines()


@pytest.mark.parametrize("value,verbose", [(True, True), ("true", True), (False, False),
                                           ("false", False), (None, False)])
def test_verbose_is_read_from_the_run_config(value, verbose):
    assert console.is_verbose({} if value is None else {"verbose": value}) is verbose


def test_the_per_client_clipping_line_stays_dropped_with_verbose(flwr_records):
    from dpfl_app.client import mods  # noqa: F401  (installs its filter)

    console.configure({"verbose": True})
    logging.getLogger("flwr").info("adaptiveclipping_mod: ndarrays are clipped by value")
    assert flwr_records == []
