"""`python -m dpfl_app.tools` is the `dpfl` command."""

import sys

from dpfl_app.tools.cli import main

sys.exit(main())
