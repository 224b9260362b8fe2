"""The round's neighbourhood graph and Shamir threshold (Bell et al. 2020, SecAgg+).

SecAgg (Bonawitz et al. 2017) masks every pair of the cohort: each client does
O(n) key agreements and mask expansions, and the server O(n^2) for dropouts.
SecAgg+ replaces the complete graph with a random k-regular one: here a Harary
graph (each client is joined to the k/2 nearest positions on either side of a
ring) over a uniformly random placement of the clients, so that who neighbours
whom is unpredictable to anyone but the server. With k = n - 1 it is SecAgg.

The threshold t = floor(k/2) + 1 is a majority of each neighbourhood. An honest
client hands over at most one kind of share per neighbour (the self-mask seed or
the secret key, never both, and only once per round), so for any client X the
server collects at most k shares of X in total, fewer than the 2t it would need
to rebuild both of X's secrets, even if it lies about who dropped out.
"""

from __future__ import annotations

import random


def neighbours_per_client(requested: int, cohort_size: int) -> int:
    """k: the even number of neighbours, `requested` (0 = all others) capped at n - 1."""
    if cohort_size < 2:
        return 0
    k = cohort_size - 1 if requested <= 0 else min(requested, cohort_size - 1)
    if k < cohort_size - 1 and k % 2:
        k += 1  # a Harary ring needs an even degree, unless it is the complete graph
    return min(k, cohort_size - 1)


def threshold(num_neighbours: int) -> int:
    """t = floor(k/2) + 1: a majority of the neighbours."""
    return num_neighbours // 2 + 1


def neighbourhoods(indices: list[int], k: int, rng: random.Random) -> dict[int, list[int]]:
    """Each index's k neighbours in a Harary ring over a random placement of `indices`."""
    ring = list(indices)
    rng.shuffle(ring)
    n = len(ring)
    graph: dict[int, set[int]] = {i: set() for i in ring}
    if k >= n - 1:
        return {i: sorted(set(ring) - {i}) for i in ring}
    for pos, node in enumerate(ring):
        for step in range(1, k // 2 + 1):
            graph[node].add(ring[(pos + step) % n])
            graph[node].add(ring[(pos - step) % n])
    return {i: sorted(peers) for i, peers in graph.items()}
