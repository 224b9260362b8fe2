"""FastPollingGrid: Flower's send_and_receive contract, without its 3-second sleeps."""

from types import SimpleNamespace

import pytest

from dpfl_app.run import grid as grid_module
from dpfl_app.run.grid import FastPollingGrid, fast_polling


class ScriptedGrid:
    """Replies to message i arrive at pull number arrival[i]; counts pulls."""

    def __init__(self, arrival: list[int]) -> None:
        self.arrival = arrival
        self.pulls = 0
        self.closed = False

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        wanted = set(message_ids)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
                for i, at in enumerate(self.arrival) if at == self.pulls and f"m{i}" in wanted]

    def close(self):
        self.closed = True


@pytest.fixture
def sleeps(monkeypatch):
    """Record the waits instead of sleeping them."""
    waits: list[float] = []
    monkeypatch.setattr(grid_module.time, "sleep", waits.append)
    return waits


def test_collects_every_reply_however_they_trickle_in(sleeps):
    inner = ScriptedGrid(arrival=[1, 3, 3, 7, 12])
    replies = FastPollingGrid(inner).send_and_receive(range(5))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == [f"m{i}" for i in range(5)]
    assert inner.pulls == 12  # stops at the pull that brought the last reply
    assert len(sleeps) == 11


def test_waits_are_short_after_a_reply_and_back_off_to_the_cap(sleeps):
    inner = ScriptedGrid(arrival=[2, 30])
    FastPollingGrid(inner, first_wait=0.02, max_wait=0.25).send_and_receive(range(2))
    assert sleeps[0] == pytest.approx(0.04)  # nothing at pull 1: doubled
    assert sleeps[1] == pytest.approx(0.02)  # a reply at pull 2: back to first_wait
    assert max(sleeps) == pytest.approx(0.25) and sleeps[-1] == pytest.approx(0.25)
    assert max(sleeps) < 3  # Flower's HttpGrid sleeps 3 s between pulls


def test_timeout_returns_the_replies_that_arrived(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(grid_module.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(grid_module.time, "sleep",
                        lambda s: clock.__setitem__("now", clock["now"] + s))
    inner = ScriptedGrid(arrival=[1, 10**6])  # the second reply never comes
    replies = FastPollingGrid(inner).send_and_receive(range(2), timeout=2.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert clock["now"] == pytest.approx(2.0)  # never sleeps past the deadline


def test_delegates_the_rest_and_wraps_only_flowers_http_grid():
    inner = ScriptedGrid(arrival=[])
    FastPollingGrid(inner).close()
    assert inner.closed
    assert fast_polling(inner) is inner  # not an HttpGrid: left alone
    with pytest.raises(ValueError):
        FastPollingGrid(inner, first_wait=1.0, max_wait=0.5)


def test_wraps_the_simulations_in_memory_grid_never_slower_than_flower():
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    inner = InMemoryGrid(factory)  # what `flwr run .` hands the ServerApp in simulation
    wrapped = fast_polling(inner)
    assert isinstance(wrapped, FastPollingGrid)
    assert wrapped.first_wait == pytest.approx(0.01)
    assert wrapped.max_wait == pytest.approx(inner.pull_interval) == pytest.approx(0.1)
    assert wrapped.state is inner.state  # the rest is the same grid
