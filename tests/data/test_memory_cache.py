"""The in-memory partition cache: bounded by bytes, shared by the ClientApp and the loops."""

from __future__ import annotations

import pytest
import torch

from dpfl_app.data import datasets as data, memory_cache, partition_cache
from dpfl_app.data.memory_cache import ENTRY_OVERHEAD, MemoryCache


@pytest.fixture
def fresh_pool(monkeypatch):
    """The process's pool, emptied, with its default (memory-sized) budget."""
    monkeypatch.delenv(memory_cache.BUDGET_ENV, raising=False)
    pool = memory_cache.PARTITIONS
    pool.clear()
    previous, pool.budget = pool._budget, None
    yield pool
    pool.clear()
    pool.budget = previous


def test_two_hundred_digits_partitions_stay_in_memory(fresh_pool, tmp_path, monkeypatch):
    """At 200 clients every partition is served from memory once read (was: 8)."""
    monkeypatch.setenv(partition_cache.CACHE_ENV, str(tmp_path))
    first = [partition_cache.load_client_data("digits", pid, 200) for pid in range(200)]
    # Neither the disk cache nor the partitioner may be touched again.
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("read from disk"))
    monkeypatch.setattr(data, "load_client_data", lambda *a, **k: pytest.fail("re-partitioned"))
    for pid in range(200):
        assert partition_cache.load_client_data("digits", pid, 200) is first[pid]
    assert fresh_pool.bytes <= fresh_pool.budget


def test_the_budget_is_a_bounded_fraction_of_available_memory(monkeypatch):
    monkeypatch.delenv(memory_cache.BUDGET_ENV, raising=False)
    for available, expected in [(2**40, memory_cache.MAX_BUDGET),
                                (2**30, memory_cache.MIN_BUDGET),
                                (8 * 2**30, 2**29)]:
        monkeypatch.setattr(memory_cache, "available_memory", lambda a=available: a)
        assert memory_cache.budget_bytes() == expected
    assert memory_cache.available_memory() > 0  # this machine's, read for real
    monkeypatch.setenv(memory_cache.BUDGET_ENV, "3")
    assert memory_cache.budget_bytes() == 3 * 2**20
    monkeypatch.setenv(memory_cache.BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="DPFL_MEMORY_CACHE_MB='lots'"):
        memory_cache.budget_bytes()


def _entry(kb: int) -> tuple:
    return (torch.zeros(kb * 256),)  # kb KiB of float32


def test_least_recently_used_entries_go_first_when_over_budget():
    entry = 4096 + ENTRY_OVERHEAD
    pool = MemoryCache(budget=3 * entry)
    calls = []

    @pool.cached
    def load(pid: int, scale: int = 1):
        calls.append(pid)
        return _entry(4)

    for pid in (0, 1, 2):
        load(pid)
    load(0)  # used again: now the most recent
    load(3)  # over budget: 1, the least recently used, goes
    assert len(pool) == 3 and pool.bytes == 3 * entry
    load(0), load(2), load(3), load(1, scale=1)  # same entry however the call is spelt
    assert calls == [0, 1, 2, 3, 1]
    load.cache_clear()
    assert len(pool) == 0 and pool.bytes == 0


def test_an_entry_larger_than_the_budget_is_never_cached():
    pool = MemoryCache(budget=8192)
    load = pool.cached(lambda pid: _entry(16))
    assert load(0) is not load(0)
    assert len(pool) == 0


def test_a_smaller_budget_evicts_at_once():
    pool = MemoryCache(budget=10**6)
    load = pool.cached(lambda pid: _entry(4))
    for pid in range(10):
        load(pid)
    pool.budget = 2 * (4096 + ENTRY_OVERHEAD)
    assert len(pool) == 2 and pool.bytes <= pool.budget


def test_size_counts_tensors_in_tuples_and_dataclasses():
    tensors = data.Tensors(torch.zeros(10, 1, 8, 8), torch.zeros(10, dtype=torch.int64))
    assert memory_cache.size_of((tensors, tensors)) == 2 * (10 * 64 * 4 + 10 * 8)
