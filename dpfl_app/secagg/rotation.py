"""Randomized Walsh-Hadamard rotation with a public per-round seed (numpy only).

Before rounding to integers, distributed DP flattens each client's update with
the orthonormal map R x = H D x / sqrt(d'), where d' is the next power of 2
(x is padded with zeros), D a diagonal of random signs and H the Walsh-Hadamard
matrix (Kairouz, Liu & Steinke 2021, Sec. 4; Agarwal, Kairouz & Liu 2021).
Each rotated coordinate is then a Rademacher sum with variance proxy
||x||^2 / d', so a modulus sized for sqrt(d') times less than ||x|| suffices.

The signs are public: all clients and the server derive them from the round's
seed (SHAKE-256 of a domain tag, the seed and the round), so they are identical
on every platform and numpy version. They must be drawn independently of the
clients' inputs (for the wrap-around bound only; privacy does not depend on them).

The inverse is R^T y = D H y / sqrt(d') (H is symmetric and H H = d' I), then
the padding is dropped. `hadamard` is exact on integer arrays, which the tests
use to check H H = d' I bit for bit.
"""

from __future__ import annotations

import hashlib

import numpy as np

DOMAIN = b"dpfl_app/secagg/rotation/v1"


def padded_dim(dim: int) -> int:
    """The next power of 2 >= dim (at least 1)."""
    return 1 << max(0, (int(dim) - 1).bit_length())


def signs(seed: bytes, round_number: int, dim: int) -> np.ndarray:
    """dim public random signs (+-1.0), from SHAKE-256(domain, seed, round)."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) < 16:
        raise ValueError("the rotation seed must be at least 16 bytes")
    shake = hashlib.shake_256(DOMAIN + len(seed).to_bytes(2, "big") + bytes(seed)
                              + int(round_number).to_bytes(8, "big"))
    bits = np.unpackbits(np.frombuffer(shake.digest((dim + 7) // 8), dtype=np.uint8))[:dim]
    return 1.0 - 2.0 * bits


def hadamard(x: np.ndarray) -> np.ndarray:
    """The unnormalised fast Walsh-Hadamard transform H x along the last axis, whose
    length must be a power of 2 (a 2-d array: every row transformed at once)."""
    y = np.array(x, copy=True)
    n = y.shape[-1] if y.ndim else 1
    if n & (n - 1):
        raise ValueError(f"Hadamard transform needs a power-of-2 length, got {n}")
    lead = y.shape[:-1]
    h = 1
    while h < n:
        blocks = y.reshape(*lead, -1, 2, h)
        top, bottom = blocks[..., 0, :].copy(), blocks[..., 1, :]
        blocks[..., 0, :] += bottom
        blocks[..., 1, :] = top - bottom
        h *= 2
    return y


def rotate(x: np.ndarray, seed: bytes, round_number: int) -> np.ndarray:
    """R x: pad the flat vector to d', flip signs, Hadamard, divide by sqrt(d')."""
    flat = np.asarray(x, dtype=np.float64).ravel()
    size = padded_dim(flat.size)
    padded = np.zeros(size)
    padded[:flat.size] = flat
    return hadamard(padded * signs(seed, round_number, size)) / np.sqrt(size)


def hadamard_rows(rows: np.ndarray) -> np.ndarray:
    """H x for every row of a 2-d float array, as two small matrix products.

    With d' = 2^(k1 + k2) and i = a 2^k2 + b, H[i, j] = H1[a, a'] H2[b, b'] (the
    sign is (-1)^popcount(i & j), and the bits split), so H x is H1 X H2 for x
    reshaped to X (2^k1 x 2^k2): a cohort's rotation in BLAS rather than in
    log2(d') passes over memory. Equal to `hadamard` up to float summation order.
    """
    rows = np.asarray(rows, dtype=np.float64)
    count, size = rows.shape
    if size & (size - 1):
        raise ValueError(f"Hadamard transform needs a power-of-2 length, got {size}")
    low = 1 << ((size.bit_length() - 1) // 2)
    high = size // low
    h_high, h_low = hadamard(np.eye(high)), hadamard(np.eye(low))
    return (h_high @ rows.reshape(count, high, low) @ h_low).reshape(count, size)


def rotate_rows(rows: np.ndarray, seed: bytes, round_number: int) -> np.ndarray:
    """`rotate` of every row of a 2-d array at once (a cohort's flat updates, one per row)."""
    rows = np.asarray(rows, dtype=np.float64)
    size = padded_dim(rows.shape[1])
    padded = np.zeros((rows.shape[0], size))
    padded[:, :rows.shape[1]] = rows
    return hadamard_rows(padded * signs(seed, round_number, size)) / np.sqrt(size)


def unrotate(y: np.ndarray, seed: bytes, round_number: int, dim: int) -> np.ndarray:
    """R^T y, then the first `dim` coordinates: the exact inverse of `rotate` (up to rounding)."""
    y = np.asarray(y, dtype=np.float64)
    size = y.size
    if size != padded_dim(dim):
        raise ValueError(f"a rotated vector of length {size} cannot hold {dim} coordinates")
    return (hadamard(y) / np.sqrt(size) * signs(seed, round_number, size))[:dim]
