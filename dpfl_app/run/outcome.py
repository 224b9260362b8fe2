"""How a run ends, in the log: one plain last line, success or failure.

`flwr run` exits 0 even when the run failed, and Flower's own last lines
("Strategy execution finished", its results dump, or a traceback) do not say
whether *our* run succeeded. So the ServerApp's last line always does, and says
where the outputs are. A failed run that never finished a round leaves no run
folder behind: an empty folder would look like a result.

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


def discard_unfinished(run_dir: Path | None) -> bool:
    """Remove a new run folder that holds no finished round (no checkpoint.pt).

    Returns True when the folder is gone (or was never made).
    """
    if run_dir is None or not run_dir.exists():
        return True
    if (run_dir / "checkpoint.pt").exists():
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
    else:
        where = "no outputs were kept"
    quiet.failure_reported = True
    log(ERROR, "run FAILED: %s. %s; %s", reason.rstrip("."),
        flower_status("finished:failed", run_id), where)


def flower_status(status: str, run_id: int | None) -> str:
    """The status `flwr ls` shows for this run, which its STATUS column cuts to "finished…"."""
    return f"`flwr ls` status {status}" + (f" (run {run_id})" if run_id is not None else "")


def report_success(stop_reason: str, rounds: int, accuracy: float | None, epsilon: float,
                   delta: float, run_dir: Path, run_id: int | None = None) -> None:
    """The run's last line when it succeeded."""
    acc = "n/a" if accuracy is None else f"{accuracy:.4f}"
    log(INFO, "run SUCCEEDED (%s): %d rounds, test accuracy %s, epsilon %.3f at delta %g; "
        "%s; outputs in %s", stop_reason, rounds, acc, epsilon, delta,
        flower_status("finished:completed", run_id), run_dir)
