"""DP-FTRL's correlated noise: the banded square-root factorization (no Flower imports).

The server's releases are the model's steps. Over T rounds they are a linear
workload A applied to the per-round sums x_t of clipped updates: for plain
server SGD, A is the T x T lower-triangular matrix of ones (the model is
w_0 + lr * prefix sums); for server momentum beta, A[t, s] =
(1 - beta^(t-s+1)) / (1 - beta) (Kalinin & Lampert 2024, Section 4). Both are
lower-triangular Toeplitz, given by their first column `a`.

The matrix mechanism (Kairouz et al. 2021; Denisov et al. 2022) factors
A = B C and releases B (C x + sigma z): equivalently, round t's sum gets the
noise sigma * (C^-1 z)_t, and the model step is taken as usual. Privacy is
that of the Gaussian mechanism on C x, whose sensitivity depends on how
often, and how far apart, one client can take part.

The factorization is the *banded square root* (Kalinin & Lampert 2024,
"Banded Square Root Matrix Factorization for Differentially Private Model
Training"): C is A^(1/2) (a lower-triangular Toeplitz matrix, found here by
the convolution square root of `a`; for plain prefix sums its coefficients
are binom(2n, n) / 4^n), cut to its first p diagonals. Why this one:

* **sensitivity in closed form** under b-min-separation (every client at most
  once every b rounds) when p <= b: two participations' columns of C never
  overlap, so the squared sensitivity is the sum of the squared norms of the
  columns a client can hit (Choquette-Choo et al. 2023, BandMF, Theorem 2);
  `sensitivity` takes the worst pattern exactly (earliest rounds first, since
  column norms only shrink towards the end of the run);
* **server memory** of p - 1 model-sized vectors: (C^-1 z)_t =
  (z_t - sum_{l=1}^{p-1} c_l (C^-1 z)_{t-l}) / c_0 needs only the last p - 1
  noise vectors (`CorrelatedNoise`). BandMF's optimised bands need the same
  buffers but a numerical optimisation per (T, b); BLT (Dvijotham et al. 2024)
  needs fewer buffers but its own optimiser. Kalinin & Lampert show the banded
  square root's error is within a few per cent of the optimised BandMF for
  prefix sums and momentum;
* **identity at p = 1**: C = I, B = A is DP-FedAvg with independent noise
  every round (and no amplification).

`choose_bands` picks p in 1..min(b, T) with the smallest expected squared
error of the released model trajectory, sens(C)^2 * ||A C^-1||_F^2 / T.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np


def workload_coefficients(rounds: int, momentum: float = 0.0) -> np.ndarray:
    """First column of A: ones (prefix sums), or sum_{j<=n} beta^j (server momentum)."""
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    n = np.arange(rounds, dtype=np.float64)
    return np.ones(rounds) if momentum == 0 else (1 - momentum ** (n + 1)) / (1 - momentum)


def toeplitz_sqrt(a: np.ndarray) -> np.ndarray:
    """c with c * c = a (convolution): the first column of the Toeplitz A^(1/2)."""
    c = np.zeros(len(a))
    c[0] = math.sqrt(a[0])
    for n in range(1, len(a)):
        c[n] = (a[n] - np.dot(c[1:n], c[n - 1:0:-1])) / (2 * c[0])
    return c


def toeplitz_inverse(c: np.ndarray, size: int) -> np.ndarray:
    """First column of C^-1 for the lower-triangular Toeplitz C with first column c."""
    inv = np.zeros(size)
    inv[0] = 1 / c[0]
    for n in range(1, size):
        taps = min(n, len(c) - 1)
        inv[n] = -np.dot(c[1:taps + 1], inv[n - 1::-1][:taps]) / c[0]
    return inv


def toeplitz(column: np.ndarray, size: int) -> np.ndarray:
    """The size x size lower-triangular Toeplitz matrix with this first column."""
    col = np.zeros(size)
    col[:min(size, len(column))] = column[:size]
    idx = np.arange(size)
    diff = idx[:, None] - idx[None, :]
    return np.where(diff >= 0, col[np.clip(diff, 0, size - 1)], 0.0)


def banded_sqrt(rounds: int, bands: int, momentum: float = 0.0) -> np.ndarray:
    """The p = `bands` nonzero coefficients of the banded square root C."""
    if not 1 <= bands <= rounds:
        raise ValueError(f"bands must be in [1, rounds={rounds}], got {bands}")
    return toeplitz_sqrt(workload_coefficients(rounds, momentum))[:bands]


def participations(rounds: int, min_separation: int) -> int:
    """k = ceil(T / b): the most rounds one client can join under b-min-separation."""
    return -(-rounds // min_separation)


def sensitivity(coefficients: np.ndarray, rounds: int, min_separation: int) -> float:
    """L2 sensitivity of C x over `rounds` rounds, one client joining at most every b rounds.

    Each participation adds a vector of norm <= 1 times one column of C. With
    p <= b bands the columns of two participations have disjoint supports, so
    the squared sensitivity is the sum of the squared column norms hit. Column
    i's norm (rows i..T-1) only shrinks with i, so the worst pattern is rounds
    0, b, 2b, ...: exact, and checked against brute force in the tests.
    """
    p = len(coefficients)
    if p > min_separation:
        raise ValueError(f"the closed-form sensitivity needs bands <= min-separation; got "
                         f"{p} bands, min-separation {min_separation}")
    squares = np.cumsum(np.square(coefficients))  # squares[n-1] = sum_{l<n} c_l^2
    total = sum(squares[min(p, rounds - start) - 1]
                for start in range(0, rounds, min_separation))
    return math.sqrt(total)


def expected_error(coefficients: np.ndarray, rounds: int, min_separation: int,
                   momentum: float = 0.0) -> float:
    """Mean squared error of the released trajectory per coordinate and round, noise
    multiplier 1 on the normalised sensitivity: sens(C)^2 ||A C^-1||_F^2 / T."""
    a = workload_coefficients(rounds, momentum)
    b = np.convolve(a, toeplitz_inverse(coefficients, rounds))[:rounds]  # B = A C^-1, Toeplitz
    frobenius = float(np.sum((rounds - np.arange(rounds)) * b ** 2))
    return sensitivity(coefficients, rounds, min_separation) ** 2 * frobenius / rounds


def band_errors(rounds: int, min_separation: int, momentum: float = 0.0) -> np.ndarray:
    """`expected_error` of the banded square root with p = 1..min(b, T) bands, at index
    p - 1 (p = 1: the identity, fresh noise every round). One square root serves all:
    p bands are its first p coefficients."""
    root = banded_sqrt(rounds, rounds, momentum)
    return np.array([expected_error(root[:p], rounds, min_separation, momentum)
                     for p in range(1, min(min_separation, rounds) + 1)])


def least_error_bands(errors: Sequence[float]) -> int:
    """The p whose `band_errors` entry is smallest (ties: fewer bands)."""
    return int(np.argmin(errors)) + 1


def choose_bands(rounds: int, min_separation: int, momentum: float = 0.0) -> int:
    """The p in 1..min(b, T) with the smallest `expected_error` (ties: fewer bands)."""
    return least_error_bands(band_errors(rounds, min_separation, momentum))


class CorrelatedNoise:
    """Round t's noise (C^-1 z)_t, z_t ~ N(0, I) i.i.d., with a buffer of p - 1 vectors.

    The noise is in units of the normalised sum (one participation has norm
    <= 1); the caller scales it by its noise multiplier and that round's clip
    norm. The buffer is secret: it is never saved (a resumed run could not
    continue the same correlated sequence, so dp-ftrl runs are not resumable).
    """

    def __init__(self, coefficients: Sequence[float]):
        self.coefficients = np.asarray(coefficients, dtype=np.float64)
        self.buffer: deque[list[np.ndarray]] = deque(maxlen=max(len(self.coefficients) - 1, 0))

    @property
    def bands(self) -> int:
        return len(self.coefficients)

    def marginal_stddev(self) -> float:
        """A lower bound on every coordinate's std of (C^-1 z)_t: 1 / c_0."""
        return 1.0 / self.coefficients[0]

    def next(self, like: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        """(C^-1 z)_t, one array per shape in `like`, drawn layer after layer."""
        c = self.coefficients
        fresh = [rng.standard_normal(np.shape(ref)) for ref in like]
        if len(c) == 1 and c[0] == 1.0:  # the identity: z_t itself, nothing to remember
            return fresh
        out = []
        for layer, z in enumerate(fresh):
            y = z.copy()
            for lag, past in enumerate(reversed(self.buffer), start=1):
                y -= c[lag] * past[layer]
            out.append(y / c[0])
        if self.buffer.maxlen:
            self.buffer.append(out)
        return out
