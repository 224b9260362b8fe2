"""Cohort sampling over a fixed population of N slots, as the accountant assumes.

The accountant is told N (run-config `population`) and m, and charges each
round as Poisson sampling with q = m/N, or as m of N without replacement
(Mironov, Talwar & Zhang 2019; Wang, Balle & Kasiviswanathan 2019).
Sampling among the nodes online *now* would give each of them a higher rate: with 80 of 100 nodes online and fixed m = 10, a node's
chance is 10/80, not 10/100, and epsilon is understated (24.9 reported, 30.0
true, for z = 1, 20 rounds, delta = 1e-5).

So we sample *slots*, not online nodes. Each of the N slots holds at most one
node id, and each node id holds at most one slot for the whole run: a node
gets the lowest free slot the first time it is seen online. Each round:

* ``poisson``: every slot joins independently with probability q = m/N;
* ``fixed``: exactly m of the N slots, uniformly without replacement.

A chosen slot whose node is offline, or that no node holds yet, is a dropout
(the noise was calibrated to m, so that is covered). No node is ever chosen
with probability above q = m/N, whoever is online. Nodes seen after all N
slots are taken are never sampled: extra nodes can only be left out, never
raise anyone's rate. The privacy unit is a node id; a site that rejoins
under a new node id takes a new slot, but is online (and so can train) under
one id at a time.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from dpfl_app.privacy.sampling import draw


class SlotSampler:
    """Assigns node ids to N population slots and samples slots each round."""

    def __init__(self, population: int, clients_per_round: int, sampling: str) -> None:
        if not 1 <= clients_per_round <= population:
            raise ValueError(f"clients per round must be in [1, population={population}], "
                             f"got {clients_per_round}")
        if sampling not in ("poisson", "fixed"):
            raise ValueError(f"sampling must be poisson or fixed, got {sampling!r}")
        self.population = population
        self.clients_per_round = clients_per_round
        self.sampling = sampling
        self.slot_of: dict[int, int] = {}  # node id -> slot
        self.unslotted: set[int] = set()  # seen after every slot was taken: never sampled

    def assign(self, online: Iterable[int]) -> None:
        """Give each node id not seen before the lowest free slot (in id order)."""
        taken = set(self.slot_of.values())
        free = (s for s in range(self.population) if s not in taken)
        for node in sorted(set(online) - set(self.slot_of) - self.unslotted):
            slot = next(free, None)
            if slot is None:
                self.unslotted.add(node)
            else:
                self.slot_of[node] = slot

    def sample_slots(self, rng: np.random.Generator) -> list[int]:
        """The slots chosen this round; the draw never depends on who is online."""
        return draw(rng, self.population, self.clients_per_round, self.sampling).tolist()

    def sample(self, online: Iterable[int], rng: np.random.Generator) -> tuple[set[int], int]:
        """(online node ids in the chosen slots, number of chosen slots)."""
        online = set(online)
        self.assign(online)
        node_at = {slot: node for node, slot in self.slot_of.items()}
        slots = self.sample_slots(rng)
        chosen = {node_at[s] for s in slots if s in node_at and node_at[s] in online}
        return chosen, len(slots)
