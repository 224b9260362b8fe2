"""noise-at=clients through the SecAgg+ stages: the 2^b ring, the survivors' noise, the floor t."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dpfl_app.privacy import skellam
from dpfl_app.privacy.distributed import DistributedDpParams
from dpfl_app.secagg import discrete, inprocess

BITS, DIM, VARIANCE = 20, 1000, 40.0  # d' = 1024 coordinates per client


def _params(n: int) -> DistributedDpParams:
    return DistributedDpParams(clip=1.0, dim=DIM, scale=200.0, bits=BITS,
                               share_variance=VARIANCE, count_share_variance=2.0, threshold=n)


def _encoded(n: int, seed: int, zero: bool = False):
    """n clients' residues: rounded rotated updates (or zeros) plus their Skellam shares."""
    rng = np.random.default_rng(seed)
    params = _params(n)
    enc = discrete.Encoding(1.0, params.scale, params.l2_sensitivity, BITS, b"r" * 32, seed)
    out, plain = [], []
    for _ in range(n):
        delta = np.zeros(DIM) if zero else rng.normal(size=DIM) / math.sqrt(DIM)
        shares = skellam.noise_share(params.padded_dim, VARIANCE, rng)
        count = int(skellam.noise_share(1, 2.0, rng)[0])
        rounding = np.random.default_rng(seed + len(out))
        out.append(discrete.encode(delta, 1, enc, rounding, shares, count))
        plain.append(np.concatenate([discrete.integer_update(
            delta, enc, np.random.default_rng(seed + len(plain))) + shares, [1 + count]]))
    return out, plain


def test_masked_inputs_are_residues_mod_2b_and_unmask_to_the_survivors_modular_sum():
    encoded, plain = _encoded(6, seed=1)
    outcome = inprocess.run_round(encoded, bits=BITS, drop={"masked_input": {2}})
    assert outcome.survivors == [1, 3, 4, 5, 6]
    total = outcome.total & np.uint64(2**BITS - 1)
    expected = discrete.modular_sum([encoded[i - 1] for i in outcome.survivors], BITS)
    assert np.array_equal(total, expected)
    # the signed sum of the survivors' noised integers, exactly (no wrap at this size)
    signed = discrete.centred(total, BITS)
    assert np.array_equal(signed, sum(plain[i - 1] for i in outcome.survivors))


def test_each_masked_input_is_below_2b():
    encoded, _ = _encoded(4, seed=2)
    seen = []
    original = inprocess.client.masked_input

    def spy(state, vector, bits=64):
        state, masked = original(state, vector, bits)
        seen.append(masked)
        return state, masked

    inprocess.client.masked_input = spy
    try:
        inprocess.run_round(encoded, bits=BITS)
    finally:
        inprocess.client.masked_input = original
    assert len(seen) == 4 and all(int(v.max()) < 2**BITS for v in seen)
    # masked residues look uniform on [0, 2^b): their mean is 2^(b-1) within 5 sigma
    values = np.concatenate(seen).astype(float)
    sigma = 2**BITS / math.sqrt(12 * values.size)
    assert abs(values.mean() - 2 ** (BITS - 1)) < 5 * sigma


@pytest.mark.parametrize("dropped", [set(), {3, 7}])
def test_the_unmasked_noise_is_skellam_of_the_survivors_shares(dropped):
    """Zero updates: the unmasked sum is the noise alone. Against scipy's Skellam pmf of
    n v with n the survivors (8, or 6 after two dropouts), never the cohort's 8 v."""
    samples = []
    for seed in range(4):
        encoded, _ = _encoded(8, seed=10 + seed, zero=True)
        outcome = inprocess.run_round(encoded, bits=BITS, drop={"masked_input": dropped})
        samples.append(discrete.centred(outcome.total & np.uint64(2**BITS - 1), BITS)[:-1])
    noise = np.concatenate(samples)  # 4 x 1024 draws
    n = 8 - len(dropped)
    mu = n * VARIANCE / 2
    lo, hi = int(-3.5 * math.sqrt(2 * mu)), int(3.5 * math.sqrt(2 * mu))
    values = np.clip(noise, lo, hi)
    edges = np.arange(lo, hi + 2, 4)  # bins of 4 integers
    observed = np.histogram(values, bins=edges)[0]
    cdf = stats.skellam.cdf(edges - 1, mu, mu)
    cdf[0], cdf[-1] = 0.0, 1.0
    expected = np.diff(cdf) * values.size
    _, p_value = stats.chisquare(observed, expected)
    assert p_value > 1e-3  # fixed seeds; the cohort's 8 v instead of 6 v gives p ~ 1e-22
    # the variance says the same: relative error sqrt(2/4096) = 2.2 %, 5 sigma
    assert np.var(noise) == pytest.approx(n * VARIANCE, rel=0.11)


def test_clients_refuse_to_sign_fewer_survivors_than_the_noise_threshold():
    encoded, _ = _encoded(8, seed=3)
    announced = {"dp-clients": 8, "dp-sampling": "fixed", "dp-noise-threshold": 7}
    outcome = inprocess.run_round(encoded, bits=BITS, announced=announced,
                                  drop={"masked_input": {1, 2}})
    assert outcome.total is None  # 6 survivors < t = 7: no client signs, nothing unmasks
    assert sorted(outcome.refusals) == [3, 4, 5, 6, 7, 8]
    assert all("fewer than the 7 whose noise shares" in r for r in outcome.refusals.values())
    ok = inprocess.run_round(encoded, bits=BITS, announced=announced, drop={"masked_input": {1}})
    assert ok.total is not None and ok.survivors == [2, 3, 4, 5, 6, 7, 8]
