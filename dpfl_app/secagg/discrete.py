"""Distributed DP's integer encoding: a client's update as integers modulo 2**b, and back.

Client (`encode`), after Kairouz, Liu & Steinke (ICML 2021) and Agarwal,
Kairouz & Liu (NeurIPS 2021):
1. clip the flat update to C (again: the sensitivity must not depend on the mod);
2. rotate it (`rotation.rotate`, public per-round seed) and scale by gamma;
3. round each coordinate stochastically, and redo it until ||q||_2 <= B
   (conditional randomized rounding); after MAX_TRIES, round towards zero,
   which never increases the norm. So ||q||_2 <= B *always*, checked in exact
   integer arithmetic; B comes from the accountant (`privacy.distributed`);
4. append the centred norm bit c = 2 b - 1 (in {-1, +1});
5. add the client's Skellam noise share (drawn by the caller from the CSPRNG:
   `privacy.skellam.noise_share`; this folder imports nothing of ours);
6. reduce modulo 2**b.

The masks must live in the same ring: each client sends (residue + mask) mod 2**b
with masks reduced mod 2**b, and the server sums mod 2**b. Summing b-bit
residues in a wider ring would show the server the carries, which depend on
the individual inputs.

Server (`decode`): the centred lift of the unmasked sum to [-2^(b-1), 2^(b-1)),
divided by gamma, rotated back and trimmed: the noised sum of the clipped
updates, and the noised sum of (b_i - 1/2). The server adds no noise and never
holds an un-noised aggregate.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from dpfl_app.secagg import rotation

MAX_TRIES = 100  # expected tries 1/(1 - beta) ~ 2.5 at beta = e^-0.5; beta^100 ~ 2e-22


def _fits(q: np.ndarray, norm_bound: float) -> bool:
    """||q||_2 <= bound, decided exactly: the integer sum of squares against floor(bound^2)."""
    limit = math.floor(norm_bound * norm_bound)
    peak = int(np.max(np.abs(q))) if q.size else 0
    if peak * peak * q.size < 2**62:  # int64 cannot overflow
        return int(np.dot(q, q)) <= limit
    return sum(int(v) * int(v) for v in q.tolist()) <= limit


def conditional_round(y: np.ndarray, norm_bound: float, rng: np.random.Generator) -> np.ndarray:
    """Integers q with |q_j - y_j| < 1, E q ~ y, and ||q||_2 <= norm_bound always.

    Requires ||y|| <= norm_bound (else even rounding towards zero may not fit).
    """
    y = np.asarray(y, dtype=np.float64)
    return conditional_round_rows(y.reshape(1, -1), norm_bound, rng)[0]


def conditional_round_rows(rows: np.ndarray, norm_bound: float,
                           rng: np.random.Generator) -> np.ndarray:
    """`conditional_round` of every row of a 2-d array (a cohort, in the study engine).

    Each round of tries redraws only the rows that do not fit yet, so a row's
    rounding is one of independent tries until the first that fits, as for a
    single vector (one row draws exactly what `conditional_round` draws).
    """
    y = np.asarray(rows, dtype=np.float64)
    too_long = np.linalg.norm(y, axis=1) > norm_bound
    if too_long.any():
        raise ValueError(f"cannot round a vector of norm {np.linalg.norm(y[too_long][0])} "
                         f"under {norm_bound}")
    floor = np.floor(y)
    frac = y - floor
    out = np.zeros(y.shape, dtype=np.int64)
    pending = np.arange(len(y))
    for _ in range(MAX_TRIES):
        if not pending.size:
            return out
        q = (floor[pending] + (rng.random((pending.size, y.shape[1])) < frac[pending])
             ).astype(np.int64)
        fits = np.array([_fits(row, norm_bound) for row in q], dtype=bool)
        out[pending[fits]] = q[fits]
        pending = pending[~fits]
    for row in pending:  # |trunc(y_j)| <= |y_j|: the norm cannot grow
        out[row] = np.trunc(y[row]).astype(np.int64)
        if not _fits(out[row], norm_bound):  # only if ||y|| > bound by less than float error
            raise ValueError(f"cannot round a vector of norm {np.linalg.norm(y[row])} "
                             f"under {norm_bound}")
    return out


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 62:
        raise ValueError(f"bits must be in [2, 62], got {bits!r}")


def to_residues(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers -> their residues modulo 2**bits, as uint64 in [0, 2**bits)."""
    _check_bits(bits)
    return (np.asarray(values, dtype=np.int64) & np.int64(2**bits - 1)).astype(np.uint64)


def modular_sum(vectors, bits: int) -> np.ndarray:
    """Sum of residue vectors modulo 2**bits (what the unmasked secure sum is)."""
    _check_bits(bits)
    total = np.zeros_like(np.asarray(vectors[0], dtype=np.uint64))
    for v in vectors:
        total = (total + np.asarray(v, dtype=np.uint64)) & np.uint64(2**bits - 1)
    return total


def packed_size(count: int, bits: int) -> int:
    """Bytes of `count` residues of `bits` bits, packed: ceil(count * bits / 8)."""
    return math.ceil(count * bits / 8)


def pack(residues: np.ndarray, bits: int) -> np.ndarray:
    """Residues in [0, 2**bits) -> `packed_size` bytes (uint8): each residue's low `bits`
    bits, least significant first, one after another; the last byte's unused bits are 0.
    What a masked input costs on the wire (8 bytes per coordinate unpacked)."""
    _check_bits(bits)
    words = np.ascontiguousarray(residues, dtype="<u8")
    if words.ndim != 1 or np.any(words >> np.uint64(bits)):
        raise ValueError(f"pack takes a vector of residues below 2**{bits}")
    planes = np.unpackbits(words.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return np.packbits(planes[:, :bits].ravel(), bitorder="little")


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """`pack`'s inverse: `count` residues (uint64) from exactly `packed_size(count, bits)`
    bytes; ValueError for any other length or type (a malformed input)."""
    _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.shape != (packed_size(count, bits),):
        raise ValueError(f"expected {packed_size(count, bits)} packed bytes (uint8), got "
                         f"{packed.shape} {packed.dtype}")
    planes = np.zeros((count, 64), dtype=np.uint8)
    planes[:, :bits] = np.unpackbits(packed, bitorder="little")[:count * bits].reshape(count,
                                                                                       bits)
    return np.packbits(planes, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)


def centred(residues: np.ndarray, bits: int) -> np.ndarray:
    """The centred lift: a residue mod 2**bits -> the integer in [-2^(bits-1), 2^(bits-1))."""
    _check_bits(bits)
    r = np.asarray(residues, dtype=np.uint64).astype(np.int64)
    return np.where(r >= 2 ** (bits - 1), r - 2**bits, r)


class Encoding(NamedTuple):
    """What clients and server agree on for a round (from `privacy.distributed`'s params)."""

    clip: float
    scale: float
    norm_bound: float  # B, the bound conditional rounding keeps ||q|| under
    bits: int
    seed: bytes  # the round's public rotation seed
    round_number: int


def round_encoding(params, clip: float, seed: bytes, round_number: int) -> Encoding:
    """A round's encoding from the announced params (`privacy.distributed.DistributedDpParams`)
    and the round's clip C_t: scale gamma C / C_t keeps the integer grid, and with it the
    bound B, the same whatever C_t adaptive clipping reaches."""
    return Encoding(clip=clip, scale=params.scale * params.clip / clip,
                    norm_bound=params.l2_sensitivity, bits=params.bits, seed=seed,
                    round_number=round_number)


CHUNK_ROWS = 32  # a cohort's rows encoded together: 32 x 4096 float64 = 1 MiB per array


def clip_rows(rows: np.ndarray, bound: float) -> np.ndarray:
    """Every row longer than `bound` (L2) scaled down to it; the others unchanged."""
    norms = np.linalg.norm(rows, axis=1)
    with np.errstate(divide="ignore"):
        factor = np.where(norms > bound, bound / norms, 1.0)
    return rows * factor[:, None]


def integer_updates(deltas: np.ndarray, enc: Encoding, rng: np.random.Generator) -> np.ndarray:
    """Steps 1-3 for each row of `deltas` (one client's flat update a row): clip to C, rotate,
    scale by gamma, round under B (int64, one row of d' a client).

    A client encodes one row, rotated by the butterfly (`rotation.rotate`, O(d' log d'));
    the study engine a cohort, rotated as matrix products (`rotation.rotate_rows`), in
    chunks of CHUNK_ROWS so that a chunk's arrays stay in cache. The two rotations agree
    up to float summation order; the rounding draws the same uniforms row after row.
    """
    deltas = np.asarray(deltas)
    single = len(deltas) == 1
    out = np.empty((len(deltas), rotation.padded_dim(deltas.shape[1])), dtype=np.int64)
    for start in range(0, len(deltas), CHUNK_ROWS):
        x = clip_rows(deltas[start:start + CHUNK_ROWS].astype(np.float64), enc.clip)
        y = enc.scale * (rotation.rotate(x, enc.seed, enc.round_number)[None] if single
                         else rotation.rotate_rows(x, enc.seed, enc.round_number))
        y = clip_rows(y, enc.scale * enc.clip)  # the rotation's float error, ~1e-15
        out[start:start + CHUNK_ROWS] = conditional_round_rows(y, enc.norm_bound, rng)
    return out


def integer_update(delta: np.ndarray, enc: Encoding, rng: np.random.Generator) -> np.ndarray:
    """Steps 1-3 for one client's update (any shape, flattened): `integer_updates` of one row."""
    return integer_updates(np.asarray(delta, dtype=np.float64).reshape(1, -1), enc, rng)[0]


def encode(delta: np.ndarray, unclipped: int, enc: Encoding, rng: np.random.Generator,
           update_noise: np.ndarray, count_noise: int) -> np.ndarray:
    """A client's residues mod 2**b: rounded rotated update + noise, then c = 2b - 1 + noise.

    `rng` drives only the rounding; the noise arrives already drawn (CSPRNG).
    """
    if unclipped not in (0, 1):
        raise ValueError(f"norm bit must be 0 or 1, got {unclipped!r}")
    q = integer_update(delta, enc, rng)
    noise = np.asarray(update_noise, dtype=np.int64)
    if noise.shape != q.shape:
        raise ValueError(f"the noise share has {noise.size} coordinates, the update {q.size}")
    signed = np.concatenate([q + noise, [2 * unclipped - 1 + int(count_noise)]])
    return to_residues(signed, enc.bits)


def decode(total: np.ndarray, enc: Encoding, dim: int) -> tuple[np.ndarray, float]:
    """The unmasked sum mod 2**b -> (noised sum of clipped deltas, noised sum of (b_i - 1/2))."""
    signed = centred(total, enc.bits)
    deltas = rotation.unrotate(signed[:-1].astype(np.float64) / enc.scale, enc.seed,
                               enc.round_number, dim)
    return deltas, float(signed[-1]) / 2
