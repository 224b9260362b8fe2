"""A simulation larger than one machine: Flower's simulation engine on a two-node Ray cluster.

Both nodes run on this machine (tests/ray_cluster.py), each with 1 CPU, so
with one CPU per client Flower builds one ClientApp actor per node. The run
is a plain `flwr run` on a private SuperLink whose environment has
RAY_ADDRESS: Flower's `ray.init()` then joins the cluster instead of starting
its own. Each node's processes descend from its own `ray start --block`, so
an actor found in a node's process tree ran on that node.

Measured: about 3.5 min (cluster start 1 min, run 2.2 min) on the 2-core
machine at load average 15; marked e2e.
"""

from __future__ import annotations

import json
import time

import pytest

from dpfl_app.tools.federation import alive
from tests.flwr_harness import LocalFederation
from tests.ray_cluster import LocalRayCluster, pids_mentioning

pytestmark = pytest.mark.e2e


def test_client_actors_run_on_both_nodes_of_a_ray_cluster(tmp_path):
    cluster = LocalRayCluster(cpus_per_node=(1, 1))
    fed = None
    try:
        cluster.start()
        fed = LocalFederation(tmp_path / "home", num_supernodes=4)
        fed.env.update(RAY_ADDRESS=cluster.address, RAY_TMPDIR=str(cluster.temp_dir))
        out = tmp_path / "out"
        run_id = fed.submit(f"rounds=2 local-epochs=1 clients=2 output-dir='{out}'")
        actors: list[set[int]] = [set() for _ in cluster.nodes]

        def note_actors() -> None:
            for node, processes in enumerate(cluster.processes()):
                actors[node] |= {pid for pid, cmd in processes if "ray::ClientAppActor" in cmd}

        status = fed.wait(run_id, timeout=900, on_poll=note_actors, interval=1.0)
        assert status == "finished:completed", fed.logs(run_id)[-3000:]
        assert all(len(pids) == 1 for pids in actors), (actors, cluster.logs())
        (run_dir,) = out.iterdir()
        results = json.loads((run_dir / "results.json").read_text())
        assert results["final"]["rounds_completed"] == 2
        assert "run SUCCEEDED" in fed.logs(run_id)
    finally:
        if fed is not None:
            fed.stop()
        cluster.stop()
    time.sleep(1)
    assert alive(pids_mentioning(str(cluster.temp_dir))) == [], "Ray processes left behind"
