"""Masks come from AES-256-CTR under the whole key, and a masked vector looks uniform."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dpfl_app.secagg import inprocess, masks, quantize

WORDS = 4096


def test_flipping_any_key_bit_changes_the_whole_stream():
    key = bytes(range(32))
    base = masks.mask_stream(key, WORDS)
    for bit in range(256):
        flipped = bytearray(key)
        flipped[bit // 8] ^= 1 << (bit % 8)
        other = masks.mask_stream(bytes(flipped), WORDS)
        # Every word differs (a coincidence has probability 2**-64 per word) ...
        assert np.all(other != base), bit
        # ... and about half of all bits: 262144 bits, std 256, so 8 sigma is 2048.
        differing = int(np.unpackbits((other ^ base).view(np.uint8)).sum())
        assert abs(differing - 32 * WORDS) < 2048, (bit, differing)


def test_keys_that_collide_in_flowers_32_bit_fold_give_unrelated_streams():
    """flwr's pseudo_rand_gen XOR-folds the seed into 32 bits (flwr #7522): flipping the
    same bits in two 4-byte words leaves its mask unchanged. Ours changes entirely."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    key = bytes(range(32))
    twin = bytes(b ^ 0xFF if i < 8 else b for i, b in enumerate(key))  # words 0 and 1 flipped
    flower = [pseudo_rand_gen(k, 2**31, [(64,)])[0] for k in (key, twin)]
    assert np.array_equal(*flower)  # the flaw our masks avoid
    assert np.all(masks.mask_stream(key, 64) != masks.mask_stream(twin, 64))


def test_wrong_key_length_is_refused():
    with pytest.raises(ValueError, match="32 bytes"):
        masks.mask_stream(b"short", 4)


def _chi_square_p(words: np.ndarray, shift: int) -> float:
    """p-value of 'byte `shift` of each word is uniform on 256 values'."""
    byte = ((words >> np.uint64(8 * shift)) & np.uint64(0xFF)).astype(np.int64)
    return stats.chisquare(np.bincount(byte, minlength=256)).pvalue


@pytest.mark.parametrize("payload", ["zeros", "extreme", "gradient"])
def test_a_single_masked_vector_is_uniform_whatever_its_input(payload, monkeypatch):
    """Client 1's masked input, for very different inputs, passes uniformity tests.

    With a fixed seed the p-values are deterministic; under uniformity each is
    uniform on [0, 1], so the bar 1e-4 fails a correct mask with probability ~1e-4
    per check, while an unmasked input (checked below) gives p ~ 0.
    """
    dim = 20_000
    rng = np.random.default_rng(7)
    inputs = {"zeros": np.zeros(dim), "extreme": np.full(dim, 1.0 / np.sqrt(dim)),
              "gradient": rng.normal(size=dim) * 1e-3}[payload]
    encoded = [quantize.encode_update(inputs, 1, 1.0, rng)] + [
        quantize.encode_update(rng.normal(size=dim) * 1e-3, 0, 1.0, rng) for _ in range(2)]
    masked = {}
    original = inprocess.client.masked_input

    def spy(state, vector, bits=64):
        state, out = original(state, vector, bits)
        masked[state["index"]] = out
        return state, out

    monkeypatch.setattr(inprocess.client, "masked_input", spy)
    inprocess.run_round(encoded)
    for shift in (0, 3, 7):
        assert _chi_square_p(masked[1], shift) > 1e-4, shift
    # The test has power: the unmasked input's top byte is far from uniform.
    assert _chi_square_p(encoded[0], 7) < 1e-6
    # Two very different inputs: their masked vectors are indistinguishable in distribution.
    assert stats.ks_2samp(masked[1].astype(np.float64), masked[2].astype(np.float64)).pvalue > 1e-4
