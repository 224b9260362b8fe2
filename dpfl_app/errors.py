"""The one error type for bad input (run config, node config, resume-from).

A leaf module with no imports, so that every layer can raise it.
"""


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""
