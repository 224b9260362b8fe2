"""Session-wide test settings."""

from __future__ import annotations

import os

import pytest

from tests.flwr_harness import LocalFederation


@pytest.fixture(autouse=True, scope="session")
def private_partition_cache(tmp_path_factory):
    """ClientApps (in-process and in `flwr run` subprocesses) cache partitions here,
    never in the user's ~/.cache/dpfl_app."""
    previous = os.environ.get("DPFL_CACHE_DIR")
    os.environ["DPFL_CACHE_DIR"] = str(tmp_path_factory.mktemp("partition-cache"))
    yield
    if previous is None:
        os.environ.pop("DPFL_CACHE_DIR", None)
    else:
        os.environ["DPFL_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def federation(request, tmp_path_factory):
    """A private local simulation SuperLink shared by a test module, stopped by PID
    afterwards. A module sets its size with `NUM_SUPERNODES = n` (default 10)."""
    size = getattr(request.module, "NUM_SUPERNODES", 10)
    fed = LocalFederation(tmp_path_factory.mktemp("flwr-home"), num_supernodes=size)
    yield fed
    fed.stop()
    assert not fed.superlink_pids(), "the SuperLink this test started is still running"
