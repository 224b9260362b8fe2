"""Session-wide test settings."""

from __future__ import annotations

import os

import pytest


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
