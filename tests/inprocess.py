"""The real ServerApp and ClientApp in one process, for tests (see dpfl_app/tools/inprocess.py)."""

from dpfl_app.tools.bench import default_run_config  # noqa: F401  (re-export)
from dpfl_app.tools.inprocess import InProcessGrid, ServerCrash, run_server  # noqa: F401
