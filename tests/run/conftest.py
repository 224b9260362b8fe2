"""The messages Flower's logger emits during a test, in order."""

from __future__ import annotations

import logging

import pytest


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def flwr_lines():
    handler = _Lines()
    logging.getLogger("flwr").addHandler(handler)
    yield handler.lines
    logging.getLogger("flwr").removeHandler(handler)
