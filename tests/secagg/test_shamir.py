"""Shamir over GF(2**31 - 1): any t shares rebuild the secret; t - 1 fit every secret."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from dpfl_app.secagg import shamir

P = shamir.PRIME


def _poly_through(points: list[tuple[int, int]], x: int) -> int:
    """The value at x of the polynomial through `points` (Lagrange, exact integers mod p)."""
    total = 0
    for j, (xj, yj) in enumerate(points):
        term = yj
        for m, (xm, _) in enumerate(points):
            if m != j:
                term = term * (x - xm) % P * pow(xj - xm, -1, P) % P
        total = (total + term) % P
    return total


@pytest.mark.parametrize("seed", range(6))
def test_any_t_shares_rebuild_the_secret(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 40)
    t = rng.randint(1, n)
    xs = rng.sample(range(1, 10_000), n)
    secret = os.urandom(rng.choice([1, 16, 32, 48]))
    shares = shamir.create_shares(secret, t, xs)
    for _ in range(5):
        assert shamir.combine(rng.sample(shares, t)) == secret


def test_lagrange_coefficients_are_computed_once_per_holder_set(monkeypatch):
    secrets = [os.urandom(32) for _ in range(50)]
    xs = list(range(1, 12))
    share_sets = [shamir.create_shares(s, 6, xs)[2:8] for s in secrets[:30]]
    share_sets += [shamir.create_shares(s, 6, xs)[:6] for s in secrets[30:]]
    computed = []
    original = shamir._lagrange_rows  # pylint: disable=protected-access

    def spy(rows):
        computed.append(len(rows))
        return original(rows)

    monkeypatch.setattr(shamir, "_lagrange_rows", spy)
    assert shamir.combine_many(share_sets) == secrets
    assert computed == [2]  # two holder sets, 50 secrets


def test_the_coefficients_match_exact_integer_lagrange():
    xs = np.array([[3, 7, 11, 2000, 9]], dtype=np.int64)
    (weights,) = shamir.lagrange_at_zero(xs)
    for j, xj in enumerate(xs[0]):
        expected = 1
        for m, xm in enumerate(xs[0]):
            if m != j:
                expected = expected * int(xm) * pow(int(xm) - int(xj), -1, P) % P
        assert int(weights[j]) == expected


@pytest.mark.parametrize("seed", range(6))
def test_t_minus_one_shares_are_consistent_with_every_secret(seed):
    """Information-theoretic secrecy: for t - 1 shares and ANY candidate secret there is
    exactly one polynomial of degree t - 1 through them and (0, candidate). So the t - 1
    shares rule out nothing; rebuilding with that completion gives the candidate."""
    rng = random.Random(100 + seed)
    n, t = rng.randint(3, 20), 0
    t = rng.randint(2, n)
    xs = rng.sample(range(1, 5000), n)
    secret = os.urandom(32)
    seen = rng.sample(shamir.create_shares(secret, t, xs), t - 1)
    parsed = [shamir.parse_share(s) for s in seen]
    for candidate in (bytes(32), b"\xff" * 32, os.urandom(32), secret):
        limbs = shamir._limbs(candidate)  # pylint: disable=protected-access
        # Complete the t - 1 shares with one more share, at a fresh x, of the polynomial
        # through them and (0, candidate): rebuilding then gives the candidate.
        x_new = next(x for x in range(1, 6000) if x not in {p[0] for p in parsed})
        completed = np.array([
            _poly_through([(0, int(limbs[c]))] + [(x, int(l[c])) for x, _, l in parsed], x_new)
            for c in range(limbs.size)], dtype=np.int64)
        extra = shamir._HEADER.pack(x_new, 32) + completed.astype("<u4").tobytes()
        assert shamir.combine(seen + [extra]) == candidate


def test_t_minus_one_shares_are_uniform_whatever_the_secret():
    """Empirically too: each limb of a share, over many sharings of two fixed, very
    different secrets, has the same (uniform) distribution. 4000 sharings x 11 limbs:
    a chi-square over 16 bins of the top bits at p > 1e-4 for both."""
    from scipy import stats

    for secret in (bytes(32), b"\xff" * 32):
        values = np.concatenate([
            shamir.parse_share(shamir.create_shares(secret, 3, [1, 2, 3])[0])[2]
            for _ in range(4000)])
        counts = np.bincount((values >> 27).astype(np.int64), minlength=16)
        assert stats.chisquare(counts).pvalue > 1e-4


def test_fewer_than_t_shares_do_not_rebuild():
    secret = os.urandom(32)
    shares = shamir.create_shares(secret, 5, list(range(1, 9)))
    try:  # a random field element per limb: out of the limb range, or a wrong secret
        assert shamir.combine(shares[:4]) != secret
    except ValueError as error:
        assert "out of range" in str(error)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        shamir.create_shares(b"x" * 32, 4, [1, 2, 3])
    with pytest.raises(ValueError, match="distinct"):
        shamir.create_shares(b"x" * 32, 2, [1, 1, 3])
    with pytest.raises(ValueError, match="distinct"):
        shamir.combine([shamir.create_shares(b"x" * 32, 2, [1, 2])[0]] * 2)
    with pytest.raises(ValueError, match="malformed"):
        shamir.parse_share(b"\x00\x00\x00\x01\x20" + b"\xff" * 44)
