"""The error types for bad input (run config, node config, resume-from, the data).

A leaf package with no imports, so that every layer can raise them: config.py,
data/, secagg/, strategy/, run/ and tools/ do. Their
message is the whole story (what is wrong and what to do), so a failed run
shows it alone, without a traceback (`run.outcome`).
"""


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


class DataUnavailable(RuntimeError):
    """The dataset cannot be read here (no Hub access and no usable local copy)."""
