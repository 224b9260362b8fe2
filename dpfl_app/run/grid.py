"""Collect replies as they arrive, instead of on Flower's 3-second clock.

Flower 1.42 gives a ServerApp in a deployment (`flwr-serverapp`, started by a
SuperLink with real SuperNodes) an `HttpGrid`, whose `send_and_receive` pushes the
messages, pulls once, and then sleeps 3 s between pulls
(`flwr/superlink/grid/http_grid.py`). The first pull almost never finds a
reply, so every message exchange costs at least 3 s whatever the clients do:
a plain round (train, evaluate) at least 6 s, a secure-aggregation round
(four exchanges, after a one-time enrolment) at least 12 s. `FastPollingGrid` keeps Flower's push and
pull calls and only changes the wait between pulls: short while replies keep
coming, backing off to `max_wait` when none do, so the SuperLink sees at most
a few light requests a second.

A local simulation (`flwr run .` on the simulation runtime) gets Flower's
`InMemoryGrid`, which pulls every 0.1 s (its `pull_interval`): each exchange then
waits 0.05 s on average after its last reply arrived, once per exchange, so four
times in a secure-aggregation round against once in a plain one. It is wrapped
too, polling from 0.01 s and backing off to Flower's own 0.1 s, never slower than
Flower. The wrapper uses only the grid's public `push_messages` and `pull_messages`
(an in-memory pull is a dictionary lookup under the LinkState's lock, so the
extra pulls cost microseconds); any other grid is left as it is (the tests use
their own).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class FastPollingGrid(Grid):
    """A `Grid` that delegates everything to `grid`, polling for replies promptly."""

    def __init__(self, grid: Grid, first_wait: float = 0.02, max_wait: float = 0.25) -> None:
        if not 0 < first_wait <= max_wait:
            raise ValueError("need 0 < first_wait <= max_wait")
        self._grid = grid
        self.first_wait, self.max_wait = first_wait, max_wait

    @property
    def wrapped(self) -> Grid:
        """Flower's grid underneath: what the run is (simulation or deployment) is its type."""
        return self._grid

    # Grid's abstract interface, delegated unchanged.
    def set_run(self, run):
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs):
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def __getattr__(self, name: str):  # close() and anything else a grid offers
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """Flower's contract: the replies that arrived before `timeout` (None: all)."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self.first_wait
        while pending:
            arrived = list(self._grid.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
            left = None if deadline is None else deadline - time.monotonic()
            if not pending or (left is not None and left <= 0):
                break
            # Replies come in bursts as the clients finish: poll again soon after
            # one arrived, back off while none do.
            wait = self.first_wait if arrived else min(2 * wait, self.max_wait)
            time.sleep(wait if left is None else min(wait, left))
        return replies


def fast_polling(grid: Grid) -> Grid:
    """`grid` wrapped in `FastPollingGrid` when it is Flower's HttpGrid (deployment) or
    InMemoryGrid (simulation, at most its own 0.1 s between pulls); else `grid` itself."""
    from flwr.superlink.grid import HttpGrid, InMemoryGrid

    if isinstance(grid, HttpGrid):
        return FastPollingGrid(grid)
    if isinstance(grid, InMemoryGrid):
        return FastPollingGrid(grid, first_wait=0.01, max_wait=max(0.01, grid.pull_interval))
    return grid
