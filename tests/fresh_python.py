"""Run code in a fresh interpreter: what a new process imports, logs or prints.

Used by the tests that check import costs (no torch before validation, none in
the secure-aggregation stages, no Flower in the privacy math) and other
process-wide side effects, which the test process itself has long since paid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    """`python -c code` (dedented) in the project folder, with the project importable."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=PROJECT,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)},
                          capture_output=True, text=True, timeout=300)
