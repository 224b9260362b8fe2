"""The randomized Walsh-Hadamard rotation: orthonormal, flattening, and inverted exactly."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import hadamard as dense_hadamard

from dpfl_app.secagg import rotation

SEED = bytes(range(32))


@pytest.mark.parametrize("size", [1, 2, 8, 64, 1024, 4096])
def test_fast_transform_is_the_hadamard_matrix_and_its_own_inverse_on_integers(size):
    rng = np.random.default_rng(size)
    x = rng.integers(-2**20, 2**20, size=size, dtype=np.int64)
    original = x.copy()
    hx = rotation.hadamard(x)
    assert np.array_equal(x, original)  # the input is not modified in place
    if size <= 1024:  # against scipy's dense Sylvester matrix
        assert np.array_equal(hx, dense_hadamard(size, dtype=np.int64) @ x)
    assert np.array_equal(rotation.hadamard(hx), size * x)  # H H = d I, bit for bit


@pytest.mark.parametrize("dim", [1, 3, 650, 1024, 1025, 10_000])
def test_unrotate_inverts_rotate(dim):
    rng = np.random.default_rng(dim)
    x = rng.normal(size=dim)
    y = rotation.rotate(x, SEED, 7)
    assert y.size == rotation.padded_dim(dim) >= dim
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-13)  # orthonormal
    back = rotation.unrotate(y, SEED, 7, dim)
    assert back.shape == (dim,)
    assert np.max(np.abs(back - x)) <= 1e-13 * np.max(np.abs(x))


def test_a_wrong_seed_or_round_does_not_invert():
    x = np.random.default_rng(0).normal(size=100)
    y = rotation.rotate(x, SEED, 1)
    assert np.linalg.norm(rotation.unrotate(y, SEED, 2, 100) - x) > 1
    assert np.linalg.norm(rotation.unrotate(y, bytes(32), 1, 100) - x) > 1


def test_rotation_flattens_a_spike():
    """A one-hot vector spreads evenly: every rotated coordinate is +-1/sqrt(d')."""
    x = np.zeros(1000)
    x[17] = 1.0
    y = rotation.rotate(x, SEED, 0)
    assert np.allclose(np.abs(y), 1 / np.sqrt(1024), rtol=1e-12)


def test_signs_are_public_deterministic_and_balanced():
    a, b = rotation.signs(SEED, 3, 4096), rotation.signs(SEED, 3, 4096)
    assert np.array_equal(a, b) and set(np.unique(a)) == {-1.0, 1.0}
    assert not np.array_equal(a, rotation.signs(SEED, 4, 4096))
    assert abs(a.sum()) < 5 * np.sqrt(4096)  # Binomial(4096, 1/2): 5 sigma
    assert np.array_equal(rotation.signs(SEED, 3, 100), a[:100])  # a prefix of the same stream


def test_seed_must_be_long_enough_and_length_must_match():
    with pytest.raises(ValueError, match="seed"):
        rotation.signs(b"short", 0, 8)
    with pytest.raises(ValueError, match="cannot hold"):
        rotation.unrotate(np.zeros(8), SEED, 0, 20)
    with pytest.raises(ValueError, match="power-of-2"):
        rotation.hadamard(np.zeros(6))
