"""Shamir secret sharing over the prime field GF(2**31 - 1), vectorised with numpy.

A secret of any length (32-byte self-mask seeds, 32-byte masking keys) is cut
into 3-byte limbs, each below the prime p = 2**31 - 1 (the field Google's
SecAgg implementation uses); each limb gets its own random polynomial of
degree t - 1, evaluated at the holders' x coordinates. The limbs' polynomials
are independent and uniform, so any t - 1 shares are uniformly distributed
whatever the secret (perfect secrecy, limb by limb and so for the whole
secret), and any t shares determine it.

Why not Flower's `shamir`: it works in GF(2**128) in pure Python through
PyCryptodome (about 0.3 ms per field multiplication) and starts a thread pool
per call; rebuilding one secret at t = 33 took 151-206 ms. Here products of
two field elements fit in int64 (< 2**62), a share is one numpy row, and the
Lagrange coefficients at 0 are computed once per distinct set of x
coordinates (`lagrange_at_zero`; the modular inverses by Fermat, vectorised
over all sets at once) and applied to every secret in one array product.

x coordinates are the holders' protocol indices (1..n), never 0, so shares of
different secrets held by the same clients share one coefficient vector.
A share on the wire: x (4 bytes), secret length (1 byte), limbs (uint32 LE).
"""

from __future__ import annotations

import os
import struct
import numpy as np

PRIME = 2**31 - 1
LIMB_BYTES = 3  # 2**24 < PRIME: every limb is a field element
_HEADER = struct.Struct(">IB")


def _limbs(secret: bytes) -> np.ndarray:
    padded = secret + bytes(-len(secret) % LIMB_BYTES)
    raw = np.frombuffer(padded, dtype=np.uint8).reshape(-1, LIMB_BYTES).astype(np.int64)
    return (raw[:, 0] << 16) | (raw[:, 1] << 8) | raw[:, 2]


def _unlimbs(limbs: np.ndarray, length: int) -> bytes:
    if np.any((limbs < 0) | (limbs >= 1 << 24)):
        raise ValueError("the shares do not fit together: a limb is out of range")
    raw = np.stack([(limbs >> 16) & 0xFF, (limbs >> 8) & 0xFF, limbs & 0xFF], axis=1)
    return raw.astype(np.uint8).tobytes()[:length]


def random_field_elements(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform elements of GF(p) from the OS's CSPRNG (31-bit draws, rejecting p itself)."""
    count = int(np.prod(shape))
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        draw = np.frombuffer(os.urandom(4 * (count - out.size + 8)), dtype="<u4")
        draw = (draw & 0x7FFFFFFF).astype(np.int64)
        out = np.concatenate([out, draw[draw < PRIME]])
    return out[:count].reshape(shape)


def create_shares(secret: bytes, threshold: int, xs: list[int]) -> list[bytes]:
    """One share of `secret` per x in `xs` (distinct, 1 <= x < p); any `threshold` rebuild it."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the {len(xs)} holders")
    if len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise ValueError("share coordinates must be distinct and in 1..p-1")
    if not 0 < len(secret) < 256:
        raise ValueError("a secret is 1 to 255 bytes")
    limbs = _limbs(secret)
    # coefficients[0] is the secret; the others are uniform: degree threshold - 1.
    coefficients = np.vstack([limbs[None, :],
                              random_field_elements((threshold - 1, limbs.size))])
    x = np.asarray(xs, dtype=np.int64)[:, None]
    values = np.zeros((len(xs), limbs.size), dtype=np.int64)
    for row in coefficients[::-1]:  # Horner: every product stays below 2**62
        values = (values * x + row) % PRIME
    return [_HEADER.pack(xi, len(secret)) + v.astype("<u4").tobytes()
            for xi, v in zip(xs, values)]


def _share_dtype(num_limbs: int) -> np.dtype:
    return np.dtype([("x", ">u4"), ("length", "u1"), ("limbs", "<u4", (num_limbs,))])


def parse_share(share: bytes) -> tuple[int, int, np.ndarray]:
    """(x, secret length, limbs) of one share."""
    x, length = _HEADER.unpack_from(share)
    limbs = np.frombuffer(share, dtype="<u4", offset=_HEADER.size).astype(np.int64)
    if limbs.size != -(-length // LIMB_BYTES) or not 0 < x < PRIME or np.any(limbs >= PRIME):
        raise ValueError("malformed share")
    return x, length, limbs


def _power(base: np.ndarray, exponent: int) -> np.ndarray:
    """base**exponent mod p, elementwise (square and multiply; products < 2**62)."""
    result = np.ones_like(base)
    while exponent:
        if exponent & 1:
            result = result * base % PRIME
        base = base * base % PRIME
        exponent >>= 1
    return result


def _lagrange_rows(xs: np.ndarray) -> np.ndarray:
    """For each row of x coordinates (rows, t): lambda_j = prod_{m!=j} x_m / (x_m - x_j)."""
    numerator, denominator = np.ones_like(xs), np.ones_like(xs)
    columns = np.arange(xs.shape[1])
    for m in range(xs.shape[1]):
        xm, other = xs[:, m:m + 1], columns != m
        numerator = np.where(other, numerator * xm % PRIME, numerator)
        denominator = np.where(other, denominator * ((xm - xs) % PRIME) % PRIME, denominator)
    return numerator * _power(denominator, PRIME - 2) % PRIME  # Fermat: d**(p-2) = 1/d


def lagrange_at_zero(xs: np.ndarray) -> np.ndarray:
    """The coefficients at 0 for each row of x coordinates, computed once per distinct set."""
    unique, back = np.unique(xs, axis=0, return_inverse=True)
    return _lagrange_rows(unique)[back.reshape(-1)]


def combine_many(share_sets: list[list[bytes]]) -> list[bytes]:
    """Each secret from its shares (exactly t of them, distinct x), all in a few array ops."""
    secrets: list[bytes | None] = [None] * len(share_sets)
    groups: dict[tuple[int, int], list[int]] = {}  # (t, share length) -> secrets
    for i, shares in enumerate(share_sets):
        if not shares or len({len(s) for s in shares}) != 1:
            raise ValueError("shares of one secret must be equally long")
        groups.setdefault((len(shares), len(shares[0])), []).append(i)
    for (t, size), members in groups.items():
        num_limbs = (size - _HEADER.size) // 4
        if size != _HEADER.size + 4 * num_limbs:
            raise ValueError("malformed share")
        table = np.frombuffer(b"".join(b"".join(share_sets[i]) for i in members),
                              dtype=_share_dtype(num_limbs)).reshape(len(members), t)
        xs, lengths = table["x"].astype(np.int64), table["length"]
        limbs = table["limbs"].astype(np.int64)
        ordered = np.sort(xs, axis=1)
        if (np.any(xs <= 0) or np.any(xs >= PRIME) or np.any(limbs >= PRIME)
                or np.any(np.diff(ordered, axis=1) == 0) or np.any(lengths != lengths[:, :1])
                or np.any(-(-lengths.astype(np.int64) // LIMB_BYTES) != num_limbs)):
            raise ValueError("malformed shares: x not distinct or out of range, or mixed lengths")
        weights = lagrange_at_zero(xs)
        # Each product < 2**62, reduced before the sum over t: the sum stays < t * 2**31.
        rebuilt = ((limbs * weights[:, :, None]) % PRIME).sum(axis=1) % PRIME
        for i, row, length in zip(members, rebuilt, lengths[:, 0]):
            secrets[i] = _unlimbs(row, int(length))
    return secrets  # type: ignore[return-value]


def combine(shares: list[bytes]) -> bytes:
    """The secret from exactly t shares."""
    return combine_many([shares])[0]
