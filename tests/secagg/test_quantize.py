"""Fixed point with stochastic rounding keeps ||Q(delta)|| <= C and is unbiased."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpfl_app.secagg import quantize


@pytest.mark.parametrize("dim", [1, 7, 1000, 20_000])
@pytest.mark.parametrize("clip", [1e-3, 0.1, 10.0])
def test_quantized_norm_never_exceeds_clip(dim, clip):
    rng = np.random.default_rng(dim)
    for trial in range(20):
        x = rng.normal(size=dim)
        x *= clip / np.linalg.norm(x)  # exactly on the sphere: the worst case for rounding up
        if trial % 2:
            x = np.sign(x) * clip / math.sqrt(dim)  # every coordinate as large as it can be
        q = quantize.quantize(x, clip, rng)
        assert np.linalg.norm(q.astype(np.float64) * quantize.quantum(clip)) <= clip


def test_without_the_tighter_clip_rounding_could_exceed_the_clip():
    """The margin is needed: rounding every coordinate up breaks the bound at ||x|| = C."""
    clip, dim = 1.0, 10_000
    x = np.full(dim, clip / math.sqrt(dim))
    s = quantize.quantum(clip)
    rounded_up = np.ceil(x / s) * s
    assert np.linalg.norm(rounded_up) > clip  # so quantize must clip to C' first
    assert quantize.rounding_clip(clip, dim) < clip


def test_rounding_is_unbiased():
    rng = np.random.default_rng(1)
    clip = 2.0**32 * 1e-9  # quantum 1e-9: x = 0.3 quanta per coordinate
    x = np.full(100_000, 0.3e-9)
    q = quantize.quantize(x, clip, rng)
    # Bernoulli(0.3) mean over 1e5 draws: std 0.00145; 5 sigma.
    assert abs(q.mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / x.size)


def test_encode_decode_round_trip_with_negative_sums():
    rng = np.random.default_rng(2)
    deltas = [rng.normal(size=50) * 0.01 for _ in range(4)]
    encoded = [quantize.encode_update(d, b, 1.0, rng) for d, b in zip(deltas, [1, 0, 1, 1])]
    total = np.zeros(51, dtype=np.uint64)
    for e in encoded:
        total += e
    decoded, bits = quantize.decode_sum(total, 1.0)
    assert bits == 3
    assert np.linalg.norm(decoded - sum(deltas)) <= quantize.sum_error_bound(4, 50, 1.0)


def test_norm_bit_must_be_a_bit():
    with pytest.raises(ValueError, match="norm bit"):
        quantize.encode_update(np.zeros(3), 2, 1.0, np.random.default_rng(0))
