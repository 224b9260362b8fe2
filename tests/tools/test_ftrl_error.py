"""The DP-FTRL error table (tools/bench/ftrl_error.py): the claims docs/dp-ftrl.md makes."""

from __future__ import annotations

import numpy as np
import pytest

from dpfl_app.privacy import matrix_factorization as mf
from dpfl_app.tools.bench import ftrl_error
from tests.privacy.test_matrix_factorization import brute_force_sensitivity


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_correlated_noise_gains_more_the_larger_b(momentum):
    """At the same m the banded root's advantage over the identity grows with b; at b = 1
    they are the same mechanism."""
    rows = ftrl_error.error_rows(40, 1437, momentum)
    gains = [r["identity_over_banded"] for r in rows]
    assert rows[0]["b"] == 1 and gains[0] == pytest.approx(1.0)
    assert all(later > earlier for earlier, later in zip(gains, gains[1:]))
    # the identity under b composes k = ceil(T/b) participations: sens^2 = k
    assert all(r["identity"] == pytest.approx(r["k"] * rows[0]["identity"] / 40) for r in rows)


def test_every_round_lower_bound_holds_for_any_factorization():
    """error(C) >= ||A 1||^2 / T at b = 1, for random lower-triangular C with C^T C >= 0 (so
    the brute-force sensitivity is exact), and the closed forms for prefix sums."""
    t = 6
    bound = ftrl_error.every_round_lower_bound(t)
    assert bound == pytest.approx((t + 1) * (2 * t + 1) / 6)
    a = mf.toeplitz(mf.workload_coefficients(t), t)
    rng = np.random.default_rng(0)
    for _ in range(200):
        c = np.tril(rng.uniform(0.05, 1.0, (t, t)))  # nonnegative: C^T C >= 0
        error = (brute_force_sensitivity(c, 1) ** 2
                 * np.sum((a @ np.linalg.inv(c)) ** 2) / t)
        assert error >= bound * (1 - 1e-12)
    identity = ftrl_error.error_rows(t, 100, separations=(1,))[0]["identity"]
    assert identity == pytest.approx(t * (t + 1) / 2)


def test_the_table_prints(capsys):
    assert ftrl_error.main(["--rounds", "40", "--population", "1437"]) == 0
    out = capsys.readouterr().out
    assert "| 14 | 102 | 3 | 14 | 2.38 | 2.571 | 13.4 | 61.5 | 4.59 | 61.2 | 3.24 |" in out
    assert "553.5" in out


@pytest.mark.parametrize("rounds, momentum", [(40, 0.0), (12, 0.9)])
def test_the_table_reads_the_errors_the_server_compares(monkeypatch, rounds, momentum):
    """The rows are the old computation's (each factorization built again from scratch:
    the chosen p's, the identity's, the every-round one), and the table takes the banded and
    identity errors from the comparison the server's choice makes (`mf.band_errors`): per b,
    one square root for the comparison and one for the sensitivity, plus one for every
    round (it computed 2 min(b, T) + 3 per b, plus 1: 41 here, now 9)."""
    def error(p, b):
        return mf.expected_error(mf.banded_sqrt(rounds, p, momentum), rounds, b, momentum)

    every_round = error(1, 1)
    roots = []
    real = mf.toeplitz_sqrt
    monkeypatch.setattr(mf, "toeplitz_sqrt", lambda a: roots.append(1) or real(a))
    rows = ftrl_error.error_rows(rounds, 1437, momentum, separations=(1, 2, 4, 7))
    assert len(roots) == 2 * 4 + 1
    for row in rows:
        b, p = row["b"], row["bands"]
        errors = [error(q, b) for q in range(1, min(b, rounds) + 1)]
        assert p == 1 + int(np.argmin(errors))  # the least-error bands, as before
        assert (row["banded"], row["identity"]) == (error(p, b), error(1, b))
        assert row["every_round_over_banded"] == every_round / error(p, b)
        assert row["sensitivity"] == mf.sensitivity(mf.banded_sqrt(rounds, p, momentum), rounds, b)
