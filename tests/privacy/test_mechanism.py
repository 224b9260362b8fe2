"""The per-round mechanism's math, checked against Andrew et al.'s formulas."""

import math

import numpy as np
import pytest

from dpfl_app.privacy import mechanism
from tests.fresh_python import run_python


def test_update_noise_multiplier_recombines_to_z():
    """Theorem 1: 1/z^2 = 1/z_delta^2 + 1/(2 sigma_b)^2."""
    z, sigma_b = 0.7, 0.9
    z_delta = mechanism.update_noise_multiplier(z, sigma_b)
    assert z_delta > z
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)


def test_default_count_stddev_is_andrew_m_over_20_when_it_suffices():
    split = mechanism.split_noise(1.0, 100)
    assert split.count_stddev == pytest.approx(5.0)
    assert not split.raised


@pytest.mark.parametrize("z,m", [(0.3, 6), (1.0, 6), (5.0, 2), (0.6, 6)])
def test_auto_count_stddev_keeps_z_below_two_sigma_and_bounds_inflation(z, m):
    split = mechanism.split_noise(z, m)
    assert z < 2 * split.count_stddev
    assert split.update_noise_multiplier <= z * mechanism.MAX_UPDATE_NOISE_INFLATION + 1e-12
    assert split.count_stddev >= m / 20


def test_explicit_count_stddev_too_small_names_the_key():
    with pytest.raises(ValueError, match="clipped-count-stddev"):
        mechanism.split_noise(1.0, 6, count_stddev=0.3)


def test_zero_noise_means_no_noise_anywhere():
    split = mechanism.split_noise(0.0, 6)
    assert split.update_noise_multiplier == 0 and split.count_stddev == 0


def test_noisy_fraction_is_centred_count_over_m():
    rng = np.random.default_rng(0)
    assert mechanism.noisy_unclipped_fraction([1, 1, 0], 6, 0.0, rng) == pytest.approx(
        (0.5 + 0.5 - 0.5) / 6 + 0.5)


def test_noisy_fraction_noise_has_std_sigma_over_m():
    """20,000 draws: SE of the std is 0.5%; tolerance 3%."""
    rng = np.random.default_rng(1)
    draws = [mechanism.noisy_unclipped_fraction([1] * 6, 6, 0.9, rng) for _ in range(20_000)]
    assert np.std(draws) == pytest.approx(0.9 / 6, rel=0.03)
    assert np.mean(draws) == pytest.approx(1.0, abs=5 * 0.15 / math.sqrt(20_000))


def test_geometric_update_direction():
    assert mechanism.next_clip_norm(1.0, 0.0, 0.5, 0.2) == pytest.approx(math.exp(0.1))
    assert mechanism.next_clip_norm(1.0, 1.0, 0.5, 0.2) == pytest.approx(math.exp(-0.1))
    assert mechanism.next_clip_norm(1.0, 0.5, 0.5, 0.2) == pytest.approx(1.0)


def test_noised_mean_update_divides_by_m_not_by_replies():
    like = [np.zeros(3, dtype=np.float32)]
    deltas = [[np.array([1.0, 0, 0])], [np.array([0, 1.0, 0])]]
    mean = mechanism.noised_mean_update(deltas, 4, 0.0, np.random.default_rng(0), like)
    np.testing.assert_allclose(mean[0], [0.25, 0.25, 0])
    assert mean[0].dtype == np.float32


def test_clip_to_norm():
    clipped = mechanism.clip_to_norm([np.array([3.0, 4.0])], 1.0)
    assert mechanism.l2_norm(clipped) == pytest.approx(1.0)
    small = mechanism.clip_to_norm([np.array([0.3, 0.4])], 1.0)
    np.testing.assert_allclose(small[0], [0.3, 0.4])


def test_privacy_package_imports_no_flower():
    """The privacy math stands alone: importing it must not pull in Flower."""
    code = ("import sys; import dpfl_app.privacy.mechanism, dpfl_app.privacy.accounting, "
            "dpfl_app.privacy.calibration, dpfl_app.privacy.report; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))")
    _prints_an_empty_list(code)


def test_accounting_leaves_the_root_logger_alone():
    """dp_accounting logs through absl, which calls logging.basicConfig() on its
    first message; that printed every Flower log line twice. It must not happen."""
    code = ("import logging; from dpfl_app.privacy.accounting import AccountingModel, "
            "epsilon_after; m = AccountingModel('poisson', 0.3, 10, 6, 1e-5); "
            "epsilon_after(m, 5, 'rdp'); epsilon_after(m, 5, 'pld'); print(logging.root.handlers)")
    _prints_an_empty_list(code)


def _prints_an_empty_list(code: str) -> None:
    """`code` in a fresh interpreter, which must succeed and print []."""
    out = run_python(code)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_clipped_sum_is_the_sum_of_each_rows_clip():
    """The study engine's one-matrix server clip against `clip_to_norm` client by client."""
    from dpfl_app.privacy.mechanism import clip_to_norm, clipped_sum

    rng = np.random.default_rng(3)
    rows = rng.normal(size=(7, 50)).astype(np.float32) * rng.uniform(0.01, 3, size=(7, 1))
    rows[2] = 0.0  # a zero update is left as it is
    for clip in (0.05, 1.0, 100.0):
        expected = sum(clip_to_norm([row], clip)[0] for row in rows)
        np.testing.assert_allclose(clipped_sum(rows, clip), expected, rtol=1e-12, atol=1e-15)
    assert clipped_sum(np.zeros((0, 4), np.float32), 1.0).tolist() == [0.0] * 4
