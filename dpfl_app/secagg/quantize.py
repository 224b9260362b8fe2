"""Fixed-point encoding of a clipped update, with a norm bound that survives rounding.

A client's clipped delta x (||x|| <= C) is encoded as integers q with quantum
s = C / 2**QUANT_BITS by stochastic rounding: each coordinate x_j / s rounds up
with probability equal to its fractional part, so E[s q] = x. Every coordinate
moves by less than s, so ||s q - x|| < sqrt(d) s. Clipping x first to

    C' = C - (sqrt(d) + 1) s

therefore gives ||s q|| < C' + sqrt(d) s < C: the sensitivity the accountant
uses holds for the *quantized* update, always (the extra s absorbs floating
point error in the rescale). The integers travel modulo 2**64 (numpy uint64
wraps), and a cohort's sum never wraps while n (2**QUANT_BITS + 1) < 2**63.

Against the plain sum of clip_C(delta_i) over n clients, the decoded secure
sum differs by at most `sum_error_bound(n, d, C)` = 2 n sqrt(d) s in L2 norm:
sqrt(d) s per client for the tighter clip, sqrt(d) s for rounding.
"""

from __future__ import annotations

import math

import numpy as np

QUANT_BITS = 32  # quantum s = C / 2**32
MAX_CONTRIBUTORS = 2**30  # n (2**32 + 1) + n < 2**63: no wrap, and exact in float64 up to 2**21


def quantum(clip_norm: float) -> float:
    """s = C / 2**QUANT_BITS."""
    return clip_norm / 2**QUANT_BITS


def rounding_clip(clip_norm: float, dim: int) -> float:
    """C' = C - (sqrt(d) + 1) s: clip here before rounding so that ||s Q(x)|| < C."""
    return clip_norm - (math.sqrt(dim) + 1) * quantum(clip_norm)


def quantize(delta: np.ndarray, clip_norm: float, rng: np.random.Generator) -> np.ndarray:
    """Clip the flat float vector to C', then stochastically round to multiples of s (int64)."""
    x = np.asarray(delta, dtype=np.float64).ravel()
    limit = rounding_clip(clip_norm, x.size)
    if limit <= 0:
        raise ValueError(f"clip norm {clip_norm} is too small for {x.size} coordinates")
    norm = float(np.linalg.norm(x))
    if norm > limit:
        x = x * (limit / norm)
    scaled = x / quantum(clip_norm)
    floor = np.floor(scaled)
    rounded = floor + (rng.random(x.size) < (scaled - floor))
    return rounded.astype(np.int64)


def dequantize(total: np.ndarray, clip_norm: float) -> np.ndarray:
    """A (decoded, signed) sum of quantized vectors back to floats: s * sum q."""
    return np.asarray(total, dtype=np.int64).astype(np.float64) * quantum(clip_norm)


def to_ring(values: np.ndarray) -> np.ndarray:
    """Signed int64 -> its residue modulo 2**64 (two's complement, no copy of meaning)."""
    return np.asarray(values, dtype=np.int64).view(np.uint64)


def from_ring(values: np.ndarray) -> np.ndarray:
    """A residue modulo 2**64 whose true value lies in (-2**63, 2**63) -> signed int64."""
    return np.asarray(values, dtype=np.uint64).view(np.int64)


def check_no_wrap(num_contributors: int) -> None:
    """Refuse a cohort whose sum could wrap around the modulus."""
    if num_contributors > MAX_CONTRIBUTORS:
        raise ValueError(f"secure aggregation supports at most {MAX_CONTRIBUTORS} clients per "
                         f"round without wrap-around, got {num_contributors}")


def sum_error_bound(num_contributors: int, dim: int, clip_norm: float) -> float:
    """L2 bound on |decoded secure sum - sum of clip_C(delta_i)|: 2 n sqrt(d) s (see above)."""
    return 2 * num_contributors * (math.sqrt(dim) + 1) * quantum(clip_norm)


def encode_update(delta: np.ndarray, unclipped: int, clip_norm: float,
                  rng: np.random.Generator) -> np.ndarray:
    """The vector a client masks: Q(delta) modulo 2**64, then the norm bit b_i as one more word."""
    if unclipped not in (0, 1):
        raise ValueError(f"norm bit must be 0 or 1, got {unclipped!r}")
    return np.concatenate([to_ring(quantize(delta, clip_norm, rng)),
                           np.array([unclipped], dtype=np.uint64)])


def decode_sum(total: np.ndarray, clip_norm: float) -> tuple[np.ndarray, int]:
    """An unmasked sum of encoded updates -> (sum of deltas as floats, sum of norm bits)."""
    signed = from_ring(total)
    return dequantize(signed[:-1], clip_norm), int(signed[-1])
