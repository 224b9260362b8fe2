"""N, the population a run samples from: counted, waited for, or set, and said in words."""

from __future__ import annotations

import time

from flwr.serverapp import Grid

from dpfl_app.errors import ConfigError


def population_size(cfg: dict, online: int, state: dict | None) -> int:
    """N for the accountant: `population`, else the node count at start (an assumption)."""
    if state:  # a resumed run keeps the N it was accounted under
        return state["ledger"]["model"]["population"]
    if cfg["population"] == 0:
        return online
    if online > cfg["population"]:
        raise ConfigError(
            f"run-config key 'population' = {cfg['population']} is smaller than the "
            f"{online} SuperNodes connected; set it to at least {online}, "
            "or 0 (= the number connected at the start)")
    return cfg["population"]


def population_assumption(cfg: dict, population: int, simulation: bool = False) -> str:
    """How N was chosen, in words, for the log and privacy.md.

    With population=0 in a deployment, N is an exact count of connected nodes,
    published un-noised (it sets q, and the log and results.json show it): under
    add/remove adjacency one client more changes it, so the guarantee does not
    cover it. In a local simulation the node count is a public setting.
    """
    if cfg["population"]:
        return f"N = {population} is the run-config `population`."
    base = (f"N = {population} is the number of SuperNodes connected at the start "
            f"(run-config population=0). Nodes that join later are only sampled into free "
            f"slots, so none is chosen more often than m/N.")
    if simulation:
        return (f"{base} In this local simulation that number is a public setting "
                f"(the federation's --num-supernodes), not a count of users.")
    return (f"{base} **That count is released un-noised (it sets q = m/N and is published "
            f"here) and is NOT covered by the guarantee**: under add/remove adjacency, one "
            f"client more or less changes it. In a deployment, set run-config `population` "
            f"to a public N (at least the nodes that may connect) to cover it.")


def is_simulation(grid: Grid) -> bool:
    """A local simulation: Flower's in-memory grid, whose SuperNodes never change."""
    from flwr.superlink.grid import InMemoryGrid

    # The app wraps Flower's grid to poll faster (run/grid.py): look at the one underneath.
    return isinstance(getattr(grid, "wrapped", grid), InMemoryGrid)


def simulation_population(grid: Grid, clients: int, settle_s: float = 0.5,
                          timeout: float = 10.0) -> int:
    """The simulation's SuperNodes, without waiting for more: their number is fixed.

    Flower registers all of them in one loop as the simulation starts; wait
    only until the count is non-zero and steady. Too few is a set-up problem
    with one fix, so the error says exactly what to type.
    """
    from dpfl_app.strategy.dp_fedavg import NotEnoughNodes

    deadline = time.monotonic() + timeout
    count = len(list(grid.get_node_ids()))
    while time.monotonic() < deadline:
        time.sleep(settle_s)
        previous, count = count, len(list(grid.get_node_ids()))
        if count and count == previous:
            break
    if count < clients:
        raise NotEnoughNodes(
            f"this local simulation has {count} SuperNode(s), fewer than clients={clients} "
            f"per round. Give Flower's local simulation more, once: `flwr federation "
            f"simulation-config --num-supernodes {max(10, clients)} "
            f"--client-resources-num-cpus 1`, then run `flwr run .` again (or ask for "
            f"fewer: `flwr run . --run-config clients={max(1, count)}`)"
        )
    return count


def population(grid: Grid, cfg: dict) -> int:
    """N: the SuperNodes the run samples from (a deployment waits for them, boundedly)."""
    from dpfl_app.strategy.dp_fedavg import wait_for_nodes

    if is_simulation(grid):
        return simulation_population(grid, cfg["clients"])
    return len(wait_for_nodes(grid, cfg["clients"], cfg["node-wait-timeout"]))

