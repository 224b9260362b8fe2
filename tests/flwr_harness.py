"""Run the real `flwr run .` against a private local SuperLink, then stop it.

The logic lives in `dpfl_app.tools.federation`, shared with the noise sweep; the
tests keep importing it from here.
"""

from dpfl_app.tools.federation import BIN, PROJECT, FederationError, LocalFederation, RunTimeout

__all__ = ["BIN", "PROJECT", "FederationError", "LocalFederation", "RunTimeout"]
