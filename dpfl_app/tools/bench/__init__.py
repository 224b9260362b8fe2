"""The performance benchmark: the app against its in-process limit (`dpfl bench`).

`limit` runs the app's own FedAvg+DP round as a plain loop in one process,
`simulation` times the real `flwr run .`, `coldstart` a fresh ClientApp
process per message, and `__main__` puts them side by side.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[3]


def default_run_config(**overrides) -> dict:
    """pyproject's `[tool.flwr.app.config]` with overrides (kebab-case keys)."""
    with open(PROJECT / "pyproject.toml", "rb") as handle:
        return {**tomllib.load(handle)["tool"]["flwr"]["app"]["config"], **overrides}
