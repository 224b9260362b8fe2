"""How a run ends, in the log: one plain last line, success or failure.

`flwr run` exits 0 even when the run failed, and Flower's own last lines
("Strategy execution finished", its results dump, or a traceback) do not say
whether *our* run succeeded. So the ServerApp's last line always does, and says
where the outputs are. A failed run that never finished a round, and never
charged one, leaves no run folder behind: an empty folder would look like a
result. A run that charged a release keeps its ledger.json, and says so.

Bad input (a run-config value, too few SuperNodes, a dataset this machine
cannot read) is the user's to fix, not a bug: its message is the whole story,
so no traceback is shown for it (`BriefErrors`, for `verbose=true`). Any other
error's traceback is logged just before the last line. After that line,
Flower's own repetition of the failure is dropped (`run.console`); the
exception still reaches Flower, so `flwr ls` shows the run as failed.

Both last lines end with the status `flwr ls` gives the run, whose STATUS
column shows only "finished…" at 80 columns.
"""

from __future__ import annotations

import json
import logging
import shutil
from logging import ERROR, INFO
from pathlib import Path

from flwr.supercore import log

from dpfl_app.errors import ConfigError, DataUnavailable
from dpfl_app.run import console

# The user's to fix, and their message says how: shown without a traceback.
INPUT_ERRORS = (ConfigError, DataUnavailable)


class BriefErrors(logging.Filter):
    """Drop the traceback from Flower's "... raised an exception" for input errors."""

    def __init__(self, kinds: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.kinds = kinds

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.kinds):
            record.exc_info, record.exc_text = None, None
            record.msg = f"{record.msg} (the line above says why)"
        return True


def keep_input_errors_brief(kinds: tuple[type[BaseException], ...]) -> None:
    """Install `BriefErrors` once on Flower's logger (the ServerApp's process is Flower's)."""
    logger = logging.getLogger("flwr")
    for existing in logger.filters:
        if isinstance(existing, BriefErrors):
            existing.kinds = tuple({*existing.kinds, *kinds})
            return
    logger.addFilter(BriefErrors((*INPUT_ERRORS, *kinds)))


class NoTimings(logging.Filter):
    """Flower's "Strategy execution finished in 12.34s", without the time.

    The run's wall time sums every round's, which grows with the clients that
    trained: a participation signal in a log that is meant to be shareable.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Strategy execution finished in"):
            record.msg, record.args = "Strategy execution finished", ()
        return True


def keep_timings_out_of_the_log() -> None:
    """Install `NoTimings` once on Flower's logger."""
    logger = logging.getLogger("flwr")
    if not any(isinstance(existing, NoTimings) for existing in logger.filters):
        logger.addFilter(NoTimings())


def charged_rounds(run_dir: Path) -> int:
    """Rounds the run's ledger.json charged (0 without a readable one).

    The ledger is written before a round's model leaves the server
    (`DPFedAvgAdaptive.on_round_charged`), so it may charge a release that no
    checkpoint records yet.
    """
    try:
        return int(json.loads((run_dir / "ledger.json").read_text()).get("rounds", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def discard_unfinished(run_dir: Path | None) -> bool:
    """Remove a new run folder that holds no finished round and no charged release.

    A folder with checkpoint.pt, or whose ledger.json charged a round, is kept
    whole: a released model's privacy record must never be lost. Returns True
    when the folder is gone (or was never made).
    """
    if run_dir is None or not run_dir.exists():
        return True
    if (run_dir / "checkpoint.pt").exists() or charged_rounds(run_dir) > 0:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return not run_dir.exists()


def report_failure(err: BaseException, run_dir: Path | None, resumed: bool,
                   input_errors: tuple[type[BaseException], ...] = (),
                   run_id: int | None = None) -> None:
    """Log the run's last line for a failure, after cleaning up a run folder with nothing in it.

    An unexpected error's traceback comes first (with `verbose=true`, Flower's comes after).
    """
    keep_input_errors_brief(input_errors)
    quiet = console.quiet_filter()
    brief = isinstance(err, (*INPUT_ERRORS, *input_errors))
    if not brief and not quiet.verbose:
        log(ERROR, "the run stopped on an unexpected error:", exc_info=err)
    reason = str(err) if brief else f"{type(err).__name__}: {err}"
    if resumed or not discard_unfinished(run_dir):
        where = (f"outputs up to the last finished round are in {run_dir}; continue with "
                 f"--run-config \"resume-from='{run_dir}'\"")
        if not (run_dir / "checkpoint.pt").exists():
            where = (f"{charged_rounds(run_dir)} released round(s) were charged: their privacy "
                     f"ledger is kept in {run_dir / 'ledger.json'} (no checkpoint was written "
                     f"yet, so the run cannot resume; a new run starts a new ledger)")
    else:
        where = "no outputs were kept"
    quiet.failure_reported = True
    log(ERROR, "run FAILED: %s. %s; %s", reason.rstrip("."),
        flower_status("finished:failed", run_id), where)


def flower_status(status: str, run_id: int | None) -> str:
    """The status `flwr ls` shows for this run, which its STATUS column cuts to "finished…"."""
    return f"`flwr ls` status {status}" + (f" (run {run_id})" if run_id is not None else "")


def report_success(stop_reason: str, rounds: int, accuracy: float | None, epsilon: float,
                   delta: float, run_dir: Path, epsilon_this_run: float | None = None,
                   run_id: int | None = None, record_level: str = "") -> None:
    """The run's last line when it succeeded.

    `epsilon_this_run`: a simulated deployment's run gives both figures, each labelled.
    `record_level`: its record-level epsilon, if any (the user-level one is then labelled).
    """
    acc = "n/a" if accuracy is None else f"{accuracy:.4f}"
    unit = "user-level " if record_level else ""
    eps = f"{unit}epsilon {epsilon:.3f}"
    if epsilon_this_run is not None:
        eps = (f"SIMULATED deployment's {unit}epsilon {epsilon:.3f} (this run's own: "
               f"{epsilon_this_run:.4g})")
    log(INFO, "run SUCCEEDED (%s): %d rounds, test accuracy %s, %s at delta %g%s; %s; "
        "outputs in %s", stop_reason, rounds, acc, eps, delta, record_level,
        flower_status("finished:completed", run_id), run_dir)
