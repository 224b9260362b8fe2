"""An in-memory LRU cache of client partitions, bounded by bytes, not by entries.

A fixed entry count (functools.lru_cache(8)) suits 10 clients, but at 100 or
more nearly every message missed it and re-read its partition from the disk
cache, which took about as long as the client's training. Partitions are small
(all of digits is 0.4 MB) or large (all of CIFAR-10 is 0.6 GB), so the bound is
a byte budget: a fraction of the memory available when the process first
caches something, between a floor and a ceiling. Every simulated client actor
(and the study engine) holds its own cache, hence the small fraction.

`DPFL_MEMORY_CACHE_MB` sets the budget outright (0 turns the cache off).
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections import OrderedDict
from typing import Any, Callable

BUDGET_ENV = "DPFL_MEMORY_CACHE_MB"
AVAILABLE_FRACTION = 1 / 16
MIN_BUDGET = 64 * 2**20
MAX_BUDGET = 2**30
# Python objects around the tensors (tuples, dataclasses, tensor headers).
ENTRY_OVERHEAD = 2048


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable, else physical)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return 4 * MAX_BUDGET


def budget_bytes() -> int:
    """`DPFL_MEMORY_CACHE_MB`, or 1/16 of available memory within [64 MiB, 1 GiB]."""
    value = os.environ.get(BUDGET_ENV, "").strip()
    if value:
        try:
            return max(0, int(float(value) * 2**20))
        except ValueError:
            raise ValueError(f"{BUDGET_ENV}={value!r} must be a number of megabytes") from None
    return int(min(MAX_BUDGET, max(MIN_BUDGET, AVAILABLE_FRACTION * available_memory())))


def size_of(value: Any) -> int:
    """Bytes held by the tensors and arrays in `value` (nested tuples, lists, dataclasses)."""
    if hasattr(value, "untyped_storage"):  # a torch tensor
        return value.nelement() * value.element_size()
    if hasattr(value, "nbytes"):  # a numpy array
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(size_of(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(size_of(getattr(value, f)) for f in value.__dataclass_fields__)
    return 0


class MemoryCache:
    """One LRU pool, shared by the functions it decorates, within a byte budget."""

    def __init__(self, budget: int | None = None) -> None:
        self._budget = budget  # None: budget_bytes(), read at first use
        self._entries: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()

    @property
    def budget(self) -> int:
        if self._budget is None:
            self._budget = budget_bytes()
        return self._budget

    @budget.setter
    def budget(self, value: int | None) -> None:
        with self._lock:
            self._budget = value
            self._evict()

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self) -> None:
        while self._entries and self.bytes > self.budget:
            _, (_, size) = self._entries.popitem(last=False)
            self.bytes -= size

    def get(self, key: tuple) -> tuple[bool, Any]:
        with self._lock:
            if key not in self._entries:
                return False, None
            self._entries.move_to_end(key)
            return True, self._entries[key][0]

    def put(self, key: tuple, value: Any) -> None:
        size = size_of(value) + ENTRY_OVERHEAD
        with self._lock:
            if key in self._entries or size > self.budget:  # too big: never cached
                return
            self._entries[key] = (value, size)
            self.bytes += size
            self._evict()

    def clear(self, prefix: str | None = None) -> None:
        """Drop every entry, or those of one decorated function."""
        with self._lock:
            for key in [k for k in self._entries if prefix is None or k[0] == prefix]:
                self.bytes -= self._entries.pop(key)[1]

    def cached(self, fn: Callable) -> Callable:
        """Decorate `fn` (hashable arguments); calls differing only in spelling share an entry."""
        name = f"{fn.__module__}.{fn.__qualname__}"
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            key = (name, *bound.arguments.values())
            hit, value = self.get(key)
            if hit:
                return value
            value = fn(*args, **kwargs)
            self.put(key, value)
            return value

        wrapper.cache_clear = lambda: self.clear(name)  # as functools.lru_cache's
        return wrapper


# The process's pool: the ClientApp's partitions and the study engine's alike.
PARTITIONS = MemoryCache()
