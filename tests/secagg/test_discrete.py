"""Distributed DP's integer encoding: the rounding never exceeds its bound, the modular
arithmetic is exact, and the whole pipeline (m clients -> modular sum -> decode) returns the
plain sum within the quantization bound, and with noise, the noise the accountant assumes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpfl_app.privacy import distributed, skellam
from dpfl_app.secagg import discrete, rotation

SEED = b"public round seed, 32 bytes long"


class AlwaysUp:
    """A rigged generator: every stochastic rounding goes up (the worst case for the norm)."""

    def random(self, size):
        return np.zeros(size)


def _worst_vector(dim, norm, fraction=0.999):
    """Coordinates just above an integer (fractional part `fraction`) with ||y|| = norm
    as nearly as possible: rounding up nearly always, and by almost nothing, pushes past."""
    base = np.full(dim, np.floor(norm / math.sqrt(dim)))
    y = base + fraction
    return y * (norm / np.linalg.norm(y))


@pytest.mark.parametrize("dim", [1, 16, 1024, 2**16])
@pytest.mark.parametrize("scaled_clip", [0.5, 30.0, 4e4])
@pytest.mark.parametrize("beta", [0.0, math.exp(-0.5)])
def test_conditional_rounding_never_exceeds_its_bound(dim, scaled_clip, beta):
    bound = distributed.rounded_l2_bound(scaled_clip, dim, beta)
    limit = math.floor(bound**2)
    rng = np.random.default_rng(dim)
    cases = [_worst_vector(dim, scaled_clip), -_worst_vector(dim, scaled_clip, 0.5)]
    cases += [v * scaled_clip / np.linalg.norm(v) for v in rng.normal(size=(3, dim))]
    for y in cases:
        for gen in (rng, AlwaysUp()):
            q = discrete.conditional_round(y, bound, gen)
            assert int(np.sum(q.astype(object) ** 2)) <= limit  # exact integer arithmetic
            assert np.all(np.abs(q - y) < 1)


def test_the_condition_is_needed():
    """Rounding every coordinate up breaks the probabilistic bound: the re-draw (or the
    fallback towards zero) is what keeps it."""
    dim, scaled_clip = 1024, 300.0
    bound = distributed.rounded_l2_bound(scaled_clip, dim, math.exp(-0.5))
    y = _worst_vector(dim, scaled_clip, fraction=0.01)
    assert np.linalg.norm(np.ceil(y)) > bound
    q = discrete.conditional_round(y, bound, AlwaysUp())
    assert np.array_equal(q, np.trunc(y).astype(np.int64))  # the fallback was taken
    assert np.linalg.norm(q) <= bound


def test_rounding_is_unbiased_when_it_rarely_rejects():
    rng = np.random.default_rng(4)
    y = np.full(4096, 0.3)
    bound = distributed.rounded_l2_bound(float(np.linalg.norm(y)), 4096, math.exp(-0.5))
    mean = np.mean([discrete.conditional_round(y, bound, rng).mean() for _ in range(50)])
    assert abs(mean - 0.3) < 5 * math.sqrt(0.21 / (4096 * 50))


def test_rounding_refuses_a_vector_above_its_bound():
    with pytest.raises(ValueError, match="cannot round"):
        discrete.conditional_round(np.full(4, 10.0), 5.0, np.random.default_rng(0))


@pytest.mark.parametrize("bits", [2, 16, 20, 62])
def test_residues_and_centred_lift_round_trip(bits):
    half = 2 ** (bits - 1)
    values = np.array([-half, -half + 1, -1, 0, 1, half - 1], dtype=np.int64)
    residues = discrete.to_residues(values, bits)
    assert residues.dtype == np.uint64 and int(residues.max()) < 2**bits
    assert np.array_equal(discrete.centred(residues, bits), values)
    total = discrete.modular_sum([residues, residues, residues], bits)
    assert np.array_equal(discrete.centred(total, bits),
                          ((3 * values.astype(object) + half) % 2**bits - half).astype(np.int64))


def _params(dim, clients, bits=20, z=0.0, count_std=0.0):
    template = distributed.DistributedDpParams(clip=1.0, dim=dim, scale=1.0, bits=bits,
                                               share_variance=0.0, count_share_variance=0.0,
                                               threshold=max(1, clients - 2))
    return distributed.choose_scale(template, z, count_std, clients)


def _encoding(params, round_number=5):
    return discrete.Encoding(params.clip, params.scale, params.l2_sensitivity, params.bits, SEED,
                             round_number)


def _clients(m, dim, rng):
    deltas = [rng.normal(size=dim) * rng.uniform(0.2, 3) / math.sqrt(dim) for _ in range(m)]
    bits = [int(rng.random() < 0.5) for _ in range(m)]
    return deltas, bits


def _clipped(delta, clip):
    return delta * min(1.0, clip / np.linalg.norm(delta))


@pytest.mark.parametrize("dim,m", [(650, 10), (1, 3), (5000, 30)])
def test_noiseless_pipeline_returns_the_plain_sum_within_the_quantization_bound(dim, m):
    rng = np.random.default_rng(dim + m)
    params = _params(dim, m)
    enc = _encoding(params)
    deltas, bits = _clients(m, dim, rng)
    zeros = np.zeros(params.padded_dim, dtype=np.int64)
    sent = [discrete.encode(d, b, enc, rng, zeros, 0) for d, b in zip(deltas, bits)]
    total, count = discrete.decode(discrete.modular_sum(sent, params.bits), enc, dim)
    plain = sum(_clipped(d, params.clip) for d in deltas)
    # each client's rounding moves its scaled rotated vector by < sqrt(d') in L2
    bound = m * math.sqrt(params.padded_dim) / params.scale
    assert np.linalg.norm(total - plain) <= bound
    assert count == sum(b - 0.5 for b in bits)  # the centred count is exact without noise


def test_pipeline_with_noise_has_the_accountants_noise_variance():
    """decode(sum with shares) - decode(same sum without) = the decoded noise; its per-coordinate
    variance must be n v / gamma^2 (update) and n v_c / 4 (centred count)."""
    dim, m, reps = 650, 12, 30
    params = _params(dim, m, bits=32, z=0.8, count_std=3.0)
    assert params.share_variance > 1e3  # so the check is about the noise, not the rounding
    rng = np.random.default_rng(6)
    update_noise, count_noise = [], []
    for rep in range(reps):
        enc = _encoding(params, round_number=rep)
        deltas, bits = _clients(m, dim, rng)
        shares = [skellam.noise_share(params.padded_dim, params.share_variance, rng)
                  for _ in range(m)]
        count_shares = skellam.noise_share(m, params.count_share_variance, rng)
        plain_rng, noisy_rng = (np.random.default_rng(rep) for _ in range(2))  # same rounding
        zeros = np.zeros(params.padded_dim, dtype=np.int64)
        plain = [discrete.encode(d, b, enc, plain_rng, zeros, 0) for d, b in zip(deltas, bits)]
        noisy = [discrete.encode(d, b, enc, noisy_rng, s, c)
                 for d, b, s, c in zip(deltas, bits, shares, count_shares)]
        (u0, c0), (u1, c1) = (discrete.decode(discrete.modular_sum(v, params.bits), enc, dim)
                              for v in (plain, noisy))
        update_noise.append(u1 - u0)
        count_noise.append(c1 - c0)
    expected = m * params.share_variance / params.scale**2
    samples = np.concatenate(update_noise)
    # sample variance of 19,500 draws: relative std sqrt(2/19500) = 1 %; 5 sigma
    assert np.var(samples) == pytest.approx(expected, rel=5 * math.sqrt(2 / samples.size))
    # the accountant's central-equivalent noise multiplier says the same in its own units
    assert params.noise_multiplier(m) * params.l2_sensitivity / params.scale == pytest.approx(
        math.sqrt(expected), rel=1e-12)
    # the count: 30 draws only, so just the order of magnitude (chi-square 30 dof: within 2x)
    count_var = m * params.count_share_variance / 4
    assert 0.5 * count_var < np.mean(np.square(count_noise)) < 2 * count_var


def test_encode_checks_its_inputs():
    params = _params(10, 3)
    enc = _encoding(params)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="norm bit"):
        discrete.encode(np.zeros(10), 2, enc, rng, np.zeros(params.padded_dim, np.int64), 0)
    with pytest.raises(ValueError, match="noise share"):
        discrete.encode(np.zeros(10), 1, enc, rng, np.zeros(3, np.int64), 0)


def test_an_over_long_update_is_clipped_before_encoding():
    params = _params(100, 1)
    enc = _encoding(params)
    big = np.full(100, 10.0)  # norm 100, clip 1
    q = discrete.integer_update(big, enc, np.random.default_rng(1))
    assert np.linalg.norm(q) <= params.l2_sensitivity
    assert rotation.padded_dim(100) == q.size == params.padded_dim


def test_masking_in_the_b_bit_ring_hides_the_carries_that_a_64_bit_sum_would_show():
    """The integration's rule: each client reduces its *masked* vector mod 2**b. The SecAgg+
    masks (AES-CTR, mod 2**64) still cancel mod 2**b, since 2**b divides 2**64. Without the
    reduction, the unmasked 64-bit sum is sum_i r_i over the integers: its high part counts
    the clients whose noised coordinate was negative (a residue near 2**b)."""
    from dpfl_app.secagg import masks

    bits, dim, n = 16, 32, 5
    rng = np.random.default_rng(11)
    values = rng.integers(-300, 300, size=(n, dim))
    residues = [discrete.to_residues(v, bits) for v in values]
    keys = {(i, j): rng.bytes(32) for i in range(n) for j in range(i + 1, n)}
    sent = []
    for i, r in enumerate(residues):
        y = r.copy()
        for (a, b), key in keys.items():
            if i in (a, b):
                masks.add_mask(y, key, masks.pairwise_sign(i, b if i == a else a))
        sent.append(y & np.uint64(2**bits - 1))  # the reduction the protocol must add
    total = discrete.modular_sum(sent, bits)
    assert np.array_equal(discrete.centred(total, bits), values.sum(axis=0))
    naive = np.sum(np.stack(residues), axis=0).astype(np.int64)  # what a 64-bit unmask yields
    # the server knows the true sum (above), so it would learn, per coordinate, how many
    # clients' noised inputs were negative
    learned = (naive - values.sum(axis=0)) // 2**bits
    assert np.array_equal(learned, (values < 0).sum(axis=0))
    assert len(set(learned.tolist())) > 1  # and it varies with the inputs


@pytest.mark.parametrize("bits", [2, 7, 8, 18, 20, 33, 62])
def test_packing_round_trips_in_exactly_ceil_n_b_over_8_bytes(bits):
    """A masked input travels as b bits a coordinate; the server gets the same residues."""
    rng = np.random.default_rng(bits)
    for count in (1, 5, 4097):
        residues = rng.integers(0, 2**bits, size=count, dtype=np.uint64)
        residues[0] = 2**bits - 1  # every bit set: nothing spills into the next residue
        packed = discrete.pack(residues, bits)
        assert packed.dtype == np.uint8 and packed.size == math.ceil(count * bits / 8)
        assert np.array_equal(discrete.unpack(packed, bits, count), residues)


def test_packing_refuses_what_is_not_a_b_bit_vector_and_unpacking_a_wrong_length():
    with pytest.raises(ValueError, match="below 2\\*\\*18"):
        discrete.pack(np.array([2**18], dtype=np.uint64), 18)
    packed = discrete.pack(np.arange(10, dtype=np.uint64), 18)
    for bad in (packed[:-1], np.append(packed, 0).astype(np.uint8), packed.astype(np.uint64)):
        with pytest.raises(ValueError, match="packed bytes"):
            discrete.unpack(bad, 18, 10)


def test_a_cohorts_integer_updates_equal_each_clients_integer_update():
    """One implementation for a client and a cohort (the study engine). With the
    deterministic bound (beta = 0) the first try always fits, so the rows draw the same
    uniforms as the clients one after another: the same integers, but for float ties of
    the two rotations (matrix products against the butterfly). 70 rows: three chunks, the
    last of them a single row, still rotated as the cohort's."""
    dim = 300
    params = distributed.DistributedDpParams(clip=1.0, dim=dim, scale=50.0, bits=20,
                                             share_variance=0.0, count_share_variance=0.0,
                                             threshold=10, beta=0.0)
    enc = discrete.round_encoding(params, params.clip, SEED, 4)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(2 * discrete.CHUNK_ROWS + 1, dim))
    norms = rng.uniform(0.2, 3.0, (len(rows), 1))  # some rows above the clip, some below
    deltas = rows / np.linalg.norm(rows, axis=1, keepdims=True) * norms
    batched = discrete.integer_updates(deltas, enc, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    single = np.stack([discrete.integer_update(d, enc, rng) for d in deltas])
    assert np.abs(batched - single).max() <= 1
    assert np.mean(batched != single) < 1e-3
    bound = math.floor(params.l2_sensitivity ** 2)
    assert all(int(np.sum(q.astype(object) ** 2)) <= bound for q in batched)
    # a client's update (any shape) is its flat vector's single row, bit for bit
    grid = deltas[0].reshape(15, 20)
    assert np.array_equal(discrete.integer_update(grid, enc, np.random.default_rng(9)),
                          discrete.integer_updates(deltas[:1], enc, np.random.default_rng(9))[0])
    # the clip: a row above C is scaled onto it, one below is left as it is
    clipped = discrete.clip_rows(np.array([[3.0, 4.0], [0.3, 0.4]]), 1.0)
    np.testing.assert_allclose(clipped, [[0.6, 0.8], [0.3, 0.4]], rtol=0, atol=1e-15)
