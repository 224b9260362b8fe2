"""The smallest neighbourhood, threshold and survivor set a client accepts.

A client cannot see the cohort, only the neighbours and threshold the server
sends it and, later, the survivor set. Without floors of its own, a server that
announces m = 1000 clients per round could give a client one neighbour and
threshold 1 (the share is then the secret itself), or unmask with a survivor
set of two. The floors follow from what the server announced (m, the expected
clients per round) and from the protocol's threshold, so the server knows them
too and can withhold a round instead of running it into refusals:

- neighbours k >= `neighbour_floor(m)` = max(2, min(MIN_NEIGHBOURS, m // 2)):
  16 neighbours (threshold 9) at any large cohort (Bell et al. 2020 run SecAgg+
  with a few tens of neighbours), and half the expected cohort at small ones,
  so that a Poisson cohort somewhat below m still runs;
- threshold t >= floor(k/2) + 1 (a majority of the neighbours; so t >= 2);
- survivors: the signed survivor set holds this client and at least t of its
  neighbours (Bell et al. 2020: a client aborts when fewer than t neighbours
  are alive), so at least `min_survivors(t)` = t + 1 clients.

`min_cohort(m)` and `min_survivors(t)` are the server's withholding rules: a
cohort or survivor set below them gets noise only, never a partial sum.
"""

from __future__ import annotations

import math

MIN_NEIGHBOURS = 16


def neighbour_floor(announced_clients: int) -> int:
    """The fewest neighbours a client accepts when m clients per round are announced."""
    return max(2, min(MIN_NEIGHBOURS, int(announced_clients) // 2))


def min_threshold(num_neighbours: int) -> int:
    """A majority of the neighbours: fewer, and the server could rebuild both secrets."""
    return num_neighbours // 2 + 1


def min_cohort(announced_clients: int) -> int:
    """The smallest cohort the server runs the protocol for (every client needs its floor)."""
    return neighbour_floor(announced_clients) + 1


def min_survivors(threshold: int) -> int:
    """The smallest survivor set whose sum is released: a client and t of its neighbours."""
    return threshold + 1


def poisson_cohort_bound(announced_clients: int) -> int:
    """A cohort size a Poisson cohort of mean m exceeds with probability below 1e-9.

    Binomial(N, m/N) is at most as spread as Poisson(m) above its mean; Bernstein's
    inequality gives P(n >= m + a) <= exp(-a**2 / (2(m + a/3))), and
    a = 7 sqrt(m) + 15 makes that < 1e-9 for every m >= 1.
    """
    m = int(announced_clients)
    return m + math.ceil(7 * math.sqrt(m) + 15)
