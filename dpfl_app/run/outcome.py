"""How a run ends, in the log: one plain last line, success or failure.

`flwr run` exits 0 even when the run failed, and Flower's own last lines
("Strategy execution finished", its results dump, or a traceback) do not say
whether *our* run succeeded. So the ServerApp's last line always does, and says
where the outputs are. A failed run that never finished a round leaves no run
folder behind: an empty folder would look like a result.

Bad input (a run-config value, too few SuperNodes) is the user's to fix, not a
bug: its message is the whole story, so Flower's traceback for it is dropped
from the log (`BriefErrors`). Every other error keeps its traceback.
"""

from __future__ import annotations

import logging
import shutil
from logging import ERROR, INFO
from pathlib import Path

from flwr.supercore import log

from dpfl_app.errors import ConfigError


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
    logger.addFilter(BriefErrors((ConfigError, *kinds)))


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
                   input_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Log the run's last line for a failure, after cleaning up a run folder with nothing in it."""
    keep_input_errors_brief(input_errors)
    reason = str(err) if isinstance(err, (ConfigError, *input_errors)) else (
        f"{type(err).__name__}: {err}")
    if resumed or not discard_unfinished(run_dir):
        where = (f"outputs up to the last finished round are in {run_dir}; continue with "
                 f"--run-config \"resume-from='{run_dir}'\"")
    else:
        where = "no outputs were kept"
    log(ERROR, "run FAILED: %s. %s", reason.rstrip("."), where)


def report_success(stop_reason: str, rounds: int, accuracy: float | None, epsilon: float,
                   delta: float, run_dir: Path, record_level: str = "") -> None:
    """The run's last line when it succeeded (`record_level`: its record-level epsilon, if any)."""
    acc = "n/a" if accuracy is None else f"{accuracy:.4f}"
    unit = "user-level " if record_level else ""
    log(INFO, "run SUCCEEDED (%s): %d rounds, test accuracy %s, %sepsilon %.3f at delta %g%s; "
        "outputs in %s", stop_reason, rounds, acc, unit, epsilon, delta, record_level, run_dir)
