"""The ClientApp loads without torch, so the secure-aggregation stages start fast.

In deployment each message may start a fresh ClientApp process; only training
and evaluation need torch, the model and the data.
"""

from __future__ import annotations

from tests.fresh_python import run_python


def test_loading_the_client_app_imports_no_torch_and_no_accountant():
    probe = ("import sys, dpfl_app.client_app; "
             "print(sorted(m for m in ('torch', 'dp_accounting', 'scipy') if m in sys.modules))")
    out = run_python(probe)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
