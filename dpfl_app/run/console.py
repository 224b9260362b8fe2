"""What a run prints: the app's own lines, and only the Flower lines a user needs.

Flower's strategy loop (`flwr.serverapp.strategy`, flwr 1.42) logs a start
banner ("ConfigRecord (train): (empty!)"), a header, a "Sampled 10 nodes" and
an echo of our evaluation for every round, then a "Final results" dump with
the numbers as strings; a Ray actor logs "Manually terminating ClientAppActor"
as the simulation ends. Our own round line and privacy report say the same
things, once and in words, so `QuietFlower` drops these lines from Flower's
logger ("flwr"); everything else Flower logs (its warnings and errors, the
simulation's start) still shows.

When a run fails, its last line is the app's "run FAILED: <why>"
(`run.outcome`). Flower then logs "<Simulation|ServerApp> raised an
exception", with a traceback that repeats that reason, and its "Exit Code"
block; after our line, `QuietFlower` drops both. The exception still reaches
Flower, so `flwr ls` shows the run as failed. An unexpected error's traceback
is logged by the app *before* its last line (`run.outcome.report_failure`).

The run-config key `verbose=true` brings every Flower line back (the
ServerApp and each ClientApp process read it from their run config). The
filter never touches records that carry a private count: those are dropped
elsewhere, always (`client.mods.DropPerClientModLine`).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

# Where the lines we drop come from, as parts of the logging call's file path.
STRATEGY_LOOP = os.path.join("flwr", "serverapp", "strategy", "")
ACTOR = os.path.join("flwr", "simulation", "ray_transport", "ray_actor.py")
EXIT = os.path.join("flwr", "supercore", "exit", "exit.py")
RAISED = "%s raised an exception"  # flwr-simulation's and flwr-serverapp's template
# Flower's start-banner lines that our strategy adds (DPFedAvgAdaptive.summary)
# carry this `extra` attribute, so they go and come back with Flower's banner
# (strategy.dp_fedavg.BANNER: imported from there only on the ServerApp).
BANNER = "flower_banner"
# Other libraries a run imports, and which log at INFO on their own loggers.
CHATTY_LOGGERS = ("mlflow", "alembic")
# Ray's tip on its first `ray.init`: about a future Ray default, not about this run.
RAY_TIP = r"Tip: In future versions of Ray, Ray will no longer override accelerator"


class QuietFlower(logging.Filter):
    """Drops Flower's repeated lines (see the module doc); `verbose` keeps them all."""

    def __init__(self) -> None:
        super().__init__()
        self.verbose = False
        self.failure_reported = False  # our "run FAILED" line has been logged

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if getattr(record, BANNER, False):
            return False
        path = record.pathname
        if STRATEGY_LOOP in path and record.levelno <= logging.INFO:
            return False
        if ACTOR in path and str(record.msg).startswith("Manually terminating"):
            return False
        if self.failure_reported and (str(record.msg).startswith(RAISED) or EXIT in path):
            return False  # Flower's repetition of the failure our last line gave
        return True


# The privacy report's sections the log shows by default (privacy.md has them all).
LOGGED_SECTIONS = ("## Empirical privacy audit",)


def report_lines(report: str, path: Any, verbose: bool) -> list[str]:
    """The privacy report for the log: all of it with `verbose`, else its verdict.

    The verdict is the part before the first section (the guarantee, its
    assumptions, its strength and any warning), plus the audit's result when
    there is one; a last line names the file with the rest (the threat model,
    what would reach a useful epsilon, what is not covered).
    """
    lines = report.splitlines()
    if verbose:
        return lines
    shown, keep, rest = [], True, []
    for line in lines:
        if line.startswith("## "):
            keep = line.startswith(LOGGED_SECTIONS)
            if not keep:
                rest.append(line[3:].split(" (")[0])
        if keep and line.strip():
            shown.append(line)
    more = "; ".join(rest)
    return shown + [f"The full report{f' ({more})' if more else ''}: {path}"]


def quiet_filter() -> QuietFlower:
    """The one `QuietFlower` on Flower's logger, installed on first use."""
    logger = logging.getLogger("flwr")
    for existing in logger.filters:
        if isinstance(existing, QuietFlower):
            return existing
    quiet = QuietFlower()
    logger.addFilter(quiet)
    return quiet


def is_verbose(run_config: Any) -> bool:
    """The run config's `verbose` (a bool, or its text from a TOML-less override)."""
    value = dict(run_config or {}).get("verbose", False)
    return value is True or str(value).strip().lower() == "true"


def configure(run_config: Any) -> QuietFlower:
    """Set this process's output from the run config (called as a run starts)."""
    quiet = quiet_filter()
    quiet.verbose = is_verbose(run_config)
    quiet.failure_reported = False  # a new run (in-process sweeps run many in one process)
    level = logging.NOTSET if quiet.verbose else logging.WARNING
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    return quiet


quiet_filter()
warnings.filterwarnings("ignore", message=RAY_TIP, category=FutureWarning)
