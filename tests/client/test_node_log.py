"""A node's own lines: shown on a deployed node, hidden from a simulation's shared log."""

import logging
import sys
import types

import pytest

from dpfl_app.client.node_log import in_shared_log, node_log


@pytest.fixture
def flwr_records():
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("flwr")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_a_deployed_node_logs_at_info(flwr_records, monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert not in_shared_log()
    node_log("site epsilon %.3f", 1.5)
    assert [(r.levelno, r.getMessage()) for r in flwr_records] == [(logging.INFO, "site epsilon 1.500")]


def test_inside_a_ray_worker_the_line_drops_to_debug(flwr_records, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    assert in_shared_log()
    node_log("site epsilon %.3f", 1.5)
    assert [r.levelno for r in flwr_records] == [logging.DEBUG]


def test_the_client_app_itself_does_not_import_ray():
    """The check relies on it: a deployed flwr-clientapp must read as not shared."""
    import subprocess

    code = "import sys, dpfl_app.client_app; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
