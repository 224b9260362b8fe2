"""Lines for this node's own log, kept out of a simulation's shared one.

In a deployment every SuperNode runs its ClientApps itself, and what they log
stays on that node: a site logs its own record-level ε or its own noise bound
where only its operator reads it. In Flower's simulation every ClientApp runs
in a Ray worker and writes into the run's one log, which docs/privacy.md calls
safe to share. A line per node per round there counts the cohort exactly, an
un-noised participation count (the reason the app already drops Flower's
per-client clipping line, see mods.py). So a node's own lines are INFO in a
deployment and DEBUG in a simulation, where the server's privacy report states
the same figures for every site.
"""

from __future__ import annotations

import sys
from logging import DEBUG, INFO

from flwr.supercore import log


def in_shared_log() -> bool:
    """True inside a Ray worker: Flower's simulation, whose ClientApps share one log.

    A deployed `flwr-clientapp` process never imports Ray (flwr 1.42).
    """
    return "ray" in sys.modules


def node_log(msg: str, *args) -> None:
    """Log on this node: shown in a deployment, DEBUG in a simulation's shared log."""
    log(DEBUG if in_shared_log() else INFO, msg, *args)
