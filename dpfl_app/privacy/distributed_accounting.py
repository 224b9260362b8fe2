"""Accounting for distributed DP: the survivors' Skellam noise, with and without sampling.

Per round, a released sum holding n clients' shares is two Skellam mechanisms
(`skellam.rdp`, Agarwal, Kairouz & Liu 2021), composed: the update (L2
sensitivity B on the integer grid, L1 min(sqrt(d') B, B^2), since integers
satisfy |x| <= x^2) with variance n v, and the centred count (sensitivity 1)
with variance n v_c. Rounds compose by RDP at integer orders (the theorem's),
converted to (epsilon, delta) with dp_accounting's `compute_epsilon`.

Adjacency. The server sees *who* sends a masked input, so distributed DP hides
what a client contributed, not that it took part; and a d-dimensional sum
reveals its noise variance, hence its number of shares, very precisely once
d >> n^2. So the neighbouring relation keeps the set of participants, and with
it the number of shares, fixed:
- `poisson` sampling: zero-out. One client's update and count are replaced by
  zero; it still takes part and adds its share. Sensitivity B (count 1).
- `fixed` sampling (m of N without replacement): replace-one, as in the
  server-noise accounting. Sensitivity 2B (count 2).

Amplification by sampling (trusting the server's sampling, which clients
cannot check):
- `fixed`: the cohort always has m members, so whether the client is in it
  does not change the number of shares. Wang, Balle & Kasiviswanathan (AISTATS
  2019), Theorem 9 (general mechanisms, replace-one, without replacement, rate
  q = m/N), with eps(inf) = inf:
      A(alpha) = 1 + q^2 C(alpha,2) min(4 (e^eps(2) - 1), 2 e^eps(2))
                   + 2 sum_{j=3..alpha} q^j C(alpha,j) e^{(j-1) eps(j)},
      eps_q(alpha) <= log A(alpha) / (alpha - 1)   (orders <= 256; above, no amplification).
  This is what dp_accounting computes for the Gaussian above order 256
  (tests/privacy/test_distributed_accounting.py checks it there).
- `poisson`: the cohort's size, and with it the noise variance, is one larger
  when the client is sampled; in high dimension the variance tells an observer
  whether it was, and then the release is the unamplified mechanism. The proved
  bound is the mixture bound: the sampled set has the same law in both worlds,
  and joint convexity of (P, Q) -> sum P^alpha Q^(1-alpha) gives
      eps_q(alpha) <= log(1 - q + q e^{(alpha-1) eps(alpha)}) / (alpha - 1),
  linear in q rather than quadratic, and close to tight when d >> n^2. For
  distributed DP, `fixed` sampling therefore amplifies far better.

Figures (`DistributedAccountant.epsilons`):
- `with_sampling`: each round's survivors' actual noise, amplified;
- `without_sampling`: the same noise, every round counted as including the client;
- `client_bound`: what a client computes alone from the announcement, trusting
  neither the server's sampling nor its survivor counts: t shares (the threshold
  it enforces) in every announced round (`client_epsilon`). It assumes the t
  survivors of a sum are honest; c of them colluding with the server remove
  their c shares, and it then holds with t - c.
Dropouts: a round is accounted with the noise of the clients that survived
(never below t; the protocol releases no smaller sum), and the survivors are
assumed to drop out independently of their data.
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from scipy.special import gammaln

from dpfl_app.privacy import skellam
from dpfl_app.privacy.distributed import DistributedDpParams

ORDERS = tuple(range(2, 257)) + (320, 384, 448, 512, 768, 1024)  # integers, as the theorems need
AMPLIFIED_MAX_ORDER = 256  # Theorem 9 needs eps(j) at every j <= alpha: ORDERS is dense up to here
ADJACENCY = {"poisson": "zero-out", "fixed": "replace-one"}


def _adjacency(sampling: str) -> str:
    if sampling not in ADJACENCY:
        raise ValueError(f"sampling must be one of {tuple(ADJACENCY)}, got {sampling!r}")
    return ADJACENCY[sampling]


def round_rdp(params: DistributedDpParams, shares: int, adjacency: str = "zero-out") -> np.ndarray:
    """RDP at ORDERS of one round whose sum holds `shares` clients' noise (update + count)."""
    if shares < 1:
        raise ValueError(f"a released sum holds at least one share, got {shares}")
    factor = {"zero-out": 1, "replace-one": 2}[adjacency]
    l1, l2 = factor * params.l1_sensitivity, factor * params.l2_sensitivity
    return np.array([skellam.rdp(a, l1, l2, shares * params.share_variance)
                     + skellam.rdp(a, factor, factor, shares * params.count_share_variance)
                     for a in ORDERS])


def _check_rate(q: float) -> float:
    if not 0 < q <= 1:
        raise ValueError(f"sampling probability must be in (0, 1], got {q!r}")
    return float(q)


def mixture_rdp(rdp: np.ndarray, q: float) -> np.ndarray:
    """Poisson, zero-out: log(1 - q + q e^{(a-1) eps(a)}) / (a - 1), per order."""
    q = _check_rate(q)
    a = np.array(ORDERS, dtype=float)
    with np.errstate(divide="ignore"):
        mixed = np.logaddexp(np.log1p(-q) if q < 1 else -np.inf, math.log(q) + (a - 1) * rdp)
    return np.minimum(mixed / (a - 1), rdp)


def theorem9_log_moment(eps: np.ndarray, q: float, alpha: int) -> float:
    """log A(alpha) of Wang et al.'s Theorem 9; eps[j] is the base RDP at order j (j >= 2)."""
    j = np.arange(3, alpha + 1)
    log_comb = gammaln(alpha + 1) - gammaln(j + 1) - gammaln(alpha - j + 1)
    e2 = float(eps[2])
    with np.errstate(divide="ignore"):
        second = (2 * math.log(q) + math.log(alpha * (alpha - 1) / 2)
                  + min(math.log(4) + (math.log(math.expm1(e2)) if e2 > 0 else -math.inf),
                        math.log(2) + e2))
    rest = math.log(2) + (j - 1) * eps[3:alpha + 1] + j * math.log(q) + log_comb
    return float(np.logaddexp.reduce(np.concatenate([[0.0, second], rest])))


def without_replacement_rdp(rdp: np.ndarray, q: float) -> np.ndarray:
    """Fixed-size sampling, replace-one: Theorem 9 per order up to 256, min with no amplification."""
    q = _check_rate(q)
    if q == 1:
        return np.array(rdp, dtype=float)
    eps = np.concatenate([[0.0, 0.0], rdp[:AMPLIFIED_MAX_ORDER - 1]])  # eps[j] at order j
    out = np.array(rdp, dtype=float)
    for i, alpha in enumerate(ORDERS):
        if alpha <= AMPLIFIED_MAX_ORDER and np.isfinite(rdp[i]):
            out[i] = min(out[i], theorem9_log_moment(eps, q, alpha) / (alpha - 1))
    return out


def amplified_rdp(rdp: np.ndarray, sampling: str, q: float) -> np.ndarray:
    """The amplified per-round RDP for the sampling the server announces (see above)."""
    if _adjacency(sampling) == "replace-one":
        return without_replacement_rdp(rdp, q)
    return mixture_rdp(rdp, q)


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    """dp_accounting's RDP -> (epsilon, delta) conversion over ORDERS."""
    rdp = np.where(np.isnan(rdp), np.inf, rdp)
    return float(compute_epsilon(ORDERS, rdp, delta)[0])


def client_epsilon(params: DistributedDpParams, rounds: int, delta: float,
                   sampling: str = "poisson", sampling_probability: float | None = None) -> float:
    """epsilon after `rounds` rounds of t shares each (the threshold), under the adjacency of
    the announced sampling: without amplification (`sampling_probability` None), a
    client's own bound; amplified at that rate, the figure the calibration plans for."""
    rdp = round_rdp(params, params.threshold, _adjacency(sampling))
    if sampling_probability is not None:
        rdp = amplified_rdp(rdp, sampling, sampling_probability)
    return epsilon_from_rdp(rounds * rdp, delta)


class DistributedAccountant:
    """Composes rounds with the noise the survivors actually contributed (see module doc)."""

    def __init__(self, params: DistributedDpParams, delta: float, sampling: str,
                 sampling_probability: float):
        self.params, self.delta, self.sampling = params, float(delta), sampling
        self.adjacency = _adjacency(sampling)
        self.q = _check_rate(sampling_probability)
        self._amplified = np.zeros(len(ORDERS))
        self._plain = np.zeros(len(ORDERS))
        self._per_round: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # survivors -> (plain, amp.)
        self.survivors: list[int] = []

    def _round_rdp(self, survivors: int) -> tuple[np.ndarray, np.ndarray]:
        """(plain, amplified) RDP of one released sum holding `survivors` >= t shares."""
        if survivors < self.params.threshold:
            raise ValueError(f"a sum of {survivors} survivors is below the threshold "
                             f"{self.params.threshold}: the protocol must not release it")
        if survivors not in self._per_round:
            rdp = round_rdp(self.params, survivors, self.adjacency)
            self._per_round[survivors] = (rdp, amplified_rdp(rdp, self.sampling, self.q))
        return self._per_round[survivors]

    def compose_round(self, survivors: int) -> None:
        """One released sum holding `survivors` >= t clients' shares."""
        plain, amplified = self._round_rdp(survivors)
        self._plain = self._plain + plain
        self._amplified = self._amplified + amplified
        self.survivors.append(int(survivors))

    def epsilon_with_sampling(self, extra_rounds: int = 0, shares: int | None = None) -> float:
        """The amplified epsilon of the rounds so far, or with `extra_rounds` more released
        sums of `shares` survivors each (None: t, the fewest a sum holds); composes nothing."""
        total = self._amplified
        if extra_rounds:
            _, amplified = self._round_rdp(self.params.threshold if shares is None else shares)
            total = total + extra_rounds * amplified
        return epsilon_from_rdp(total, self.delta)

    def epsilons(self, client_rounds: int | None = None) -> dict:
        """The three figures (module doc), each computed once. `client_rounds`: the rounds a
        client's own bound counts (None: the released ones; a ledger adds withheld rounds)."""
        rounds = len(self.survivors)
        client_rounds = rounds if client_rounds is None else client_rounds
        client = (client_epsilon(self.params, client_rounds, self.delta, self.sampling)
                  if client_rounds else 0.0)
        return {"with_sampling": self.epsilon_with_sampling(),
                "without_sampling": epsilon_from_rdp(self._plain, self.delta),
                "client_bound": client, "rounds": rounds, "delta": self.delta}

    def state_dict(self) -> dict:
        """For checkpoints: the survivors of each round determine everything else."""
        return {"survivors": list(self.survivors)}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(self.params, self.delta, self.sampling, self.q)
        for survivors in state["survivors"]:
            self.compose_round(int(survivors))

    def to_dict(self, client_rounds: int | None = None) -> dict:
        """The accounting block's entry for noise-at=clients (results.json); `client_rounds`
        as in `epsilons`."""
        return {"noise_at": "clients", "params": self.params.to_dict(), "sampling": self.sampling,
                "adjacency": self.adjacency, "sampling_probability": self.q,
                "survivors": list(self.survivors), **self.epsilons(client_rounds)}


def client_refusal(params: DistributedDpParams, rounds: int, delta: float, max_epsilon: float,
                   sampling: str = "poisson") -> str | None:
    """Why a client with node-config `max-epsilon` refuses the announced mechanism, or None.

    Pure: from the announced parameters alone (its own share v, the threshold t
    it enforces, the announced rounds T and delta), the client's own bound
    `client_epsilon`, which trusts neither the server's sampling nor its counts.
    max_epsilon <= 0 means no limit. Refuses inf and nan (no noise) too.
    """
    if max_epsilon <= 0:
        return None
    epsilon = client_epsilon(params, rounds, delta, sampling)
    if epsilon <= max_epsilon:
        return None
    shown = "inf (no noise)" if math.isinf(epsilon) else f"{epsilon:.3f}"
    return (f"privacy policy: the announced client noise (Skellam share variance "
            f"{params.share_variance:.4g} at scale {params.scale:.4g}, threshold "
            f"t={params.threshold}, T={rounds} rounds, delta={delta}) gives this client "
            f"epsilon={shown} without amplification > node-config max-epsilon={max_epsilon}")
