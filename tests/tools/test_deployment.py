"""End to end on a real loopback deployment: SuperLink + SuperNodes, `flwr run`.

Every process runs on 127.0.0.1 with free ports, in a private folder, and is
stopped by PID when the test ends (the fixture checks none is left). Each
message starts a fresh `flwr-clientapp` that imports torch, so rounds take
tens of seconds here: the runs are small (2 rounds, 2 clients of 3 nodes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dpfl_app.tools.deploy import LocalDeployment, rounds_done
from dpfl_app.data.node_data import export_partition
from dpfl_app.privacy.accounting import AccountingModel, epsilon_after
from dpfl_app.run.outputs import read_diagnostics

pytestmark = pytest.mark.e2e

NODES = 3
ROUND_TIMEOUT = 90.0  # above the ~60 s a killed SuperNode takes to be declared dead
SMALL_RUN = ("rounds=2 clients=2 deterministic-noise=true node-wait-timeout=60.0 "
             f"round-timeout={ROUND_TIMEOUT}")
RUN_TIMEOUT = 400  # seconds for one small run, with slack for a loaded 2-core machine


def _stopped(dep: LocalDeployment) -> None:
    started = [proc.pid for proc in dep.procs.values()]
    dep.stop()
    assert started, "the deployment started no process"
    assert not dep.leftovers(), f"processes left running: {dep.leftovers()}"


@pytest.fixture
def insecure(tmp_path):
    dep = LocalDeployment(tmp_path / "insecure")
    yield dep
    _stopped(dep)


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """TLS and SuperNode authentication; each node trains on its own data-path folder."""
    dep = LocalDeployment(tmp_path_factory.mktemp("secure"), auth=True)
    try:
        dep.start_superlink()
        for i in range(NODES):
            site = export_partition(dep.workdir / "sites" / f"site-{i}", "digits", i, NODES)
            dep.start_supernode(f"node-{i}", f'data-path="{site}"')
        dep.wait_online(NODES)
        yield dep
    finally:
        _stopped(dep)


def _results(output_dir: Path) -> dict:
    (results,) = output_dir.glob("*/results.json")
    return json.loads(results.read_text())


def _diagnostics(output_dir: Path) -> list[dict]:
    """Exact per-round counts: only in the operator's file, never in results.json."""
    (results,) = output_dir.glob("*/results.json")
    return read_diagnostics(results.parent)


def _finished(dep: LocalDeployment, run_id: int) -> str:
    status = dep.wait(run_id, RUN_TIMEOUT, interval=4)
    assert status == "finished:completed", dep.logs(run_id)[-4000:]
    return status


def test_insecure_deployment_runs_two_rounds_on_three_supernodes(insecure):
    insecure.start_superlink()
    for i in range(NODES):
        insecure.start_supernode(f"node-{i}", f"partition-id={i} num-partitions={NODES}")
    insecure.wait_online(NODES)
    # A relative output-dir lands in the SuperLink's working directory (deploy/README.md).
    run_id = insecure.submit(SMALL_RUN, "output-dir='results'")
    _finished(insecure, run_id)

    results = _results(insecure.workdir / "superlink" / "results")
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert results["accounting"]["population"] == NODES
    assert results["final"]["stop_reason"] == "completed all rounds"
    diagnostics = _diagnostics(insecure.workdir / "superlink" / "results")
    for record in diagnostics:  # Poisson: each node trains w.p. 2/3 per round
        assert record["num_replies"] == record["num_sampled"]
    # The ClientApps ran on the SuperNodes: a node that trained holds the app.
    ran = [i for i in range(NODES) if list((insecure.workdir / f"node-{i}").glob("apps/*"))]
    assert len(ran) >= max(r["num_replies"] for r in diagnostics)


def test_unregistered_supernode_is_refused(secure):
    online = secure.online_nodes()
    intruder = secure.start_supernode("unregistered", "partition-id=0 num-partitions=1",
                                      register=False)
    assert intruder.wait(timeout=120) != 0
    assert "[code: 2004] Failed to activate SuperNode" in secure.log("unregistered")
    assert secure.online_nodes() == online


def test_tls_run_survives_a_supernode_killed_mid_round(secure, tmp_path):
    """Fixed sampling, m=2 of 3: one sampled node dies in round 1; the run goes on."""
    out = tmp_path / "out"
    run_id = secure.submit(SMALL_RUN, f"sampling='fixed' node-data='local' output-dir='{out}'")
    deadline = time.monotonic() + 180
    while not (training := secure.training_nodes()):
        assert time.monotonic() < deadline, secure.logs(run_id)[-3000:]
        time.sleep(0.5)
    assert rounds_done(out, run_id) == 0, "round 1 ended before the kill"
    secure.kill(training[0])
    killed_at = time.monotonic()
    while rounds_done(out, run_id) < 1:
        assert secure.status(run_id) == "running", secure.logs(run_id)[-3000:]
        time.sleep(2)
    # The round ends when the dead node's reply is given up on: an error
    # reply from missed heartbeats, or round-timeout, whichever comes first.
    assert time.monotonic() - killed_at < ROUND_TIMEOUT + 30
    _finished(secure, run_id)

    results = _results(out)
    first, second = results["rounds"]
    diagnostics = _diagnostics(out)
    replies = [d["num_replies"] for d in diagnostics]
    # Round 1: the killed node's reply is missing. Round 2: the population keeps its
    # 3 slots (N is fixed at the start), so the dead node's slot is drawn with
    # probability 2/3 and is then a dropout: every live node in a drawn slot replies.
    assert replies[0] == 1
    assert 1 <= replies[1] <= diagnostics[1]["num_sampled"] <= 2
    # The fixed denominator: the noise on the mean is z_delta * C / m with m=2,
    # also in the round that had one reply.
    z_delta = results["accounting"]["update_noise_multiplier"]
    for record in (first, second):
        assert record["noise_std"] == pytest.approx(z_delta * record["clip_norm"] / 2)
    # Accounting is unchanged by the dropout: two rounds of (fixed, N=3, m=2).
    model = AccountingModel("fixed", results["config"]["noise"], NODES, 2,
                            results["config"]["target-delta"])
    # deterministic-noise: no guarantee (inf); the labelled secret-noise figure is that.
    assert results["final"]["epsilon"] == "inf"
    assert results["final"]["epsilon_if_noise_secret"] == pytest.approx(
        epsilon_after(model, 2, "rdp"))

    # Two nodes left; a run that needs three per round fails after
    # node-wait-timeout instead of waiting forever.
    assert secure.online_nodes() == NODES - 1
    started = time.monotonic()
    run_id = secure.submit(f"clients={NODES} sampling='fixed' node-wait-timeout=5.0 "
                           f"node-data='local' output-dir='{tmp_path / 'out2'}'")
    assert secure.wait(run_id, 120, interval=2) == "finished:failed"
    assert time.monotonic() - started < 90
    assert f"only {NODES - 1} SuperNode(s) connected" in secure.logs(run_id)


def test_tls_secure_aggregation_survives_a_supernode_killed_mid_round(tmp_path):
    """SecAgg+ over TLS on 4 SuperNodes (k = 3, t = 2), each with a pinned identity key:
    one dies while training in round 1; the others' shares rebuild its masks, and the
    round sums the 3 survivors."""
    dep = LocalDeployment(tmp_path / "secagg", tls=True)
    try:
        dep.start_superlink()
        identities = dep.secagg_identities([f"node-{i}" for i in range(4)])
        for i in range(4):
            dep.start_supernode(f"node-{i}", f"partition-id={i} num-partitions=4 "
                                             f"{identities[f'node-{i}']}")
        dep.wait_online(4)
        out = tmp_path / "out"
        # Poisson with q = m/N = 1: every online node, 4 in round 1 and 3 in round 2.
        run_id = dep.submit(SMALL_RUN, f"clients=4 secure-aggregation=true output-dir='{out}'")
        deadline = time.monotonic() + 300
        while not (training := dep.training_nodes()):  # train.secagg: after key sharing
            assert time.monotonic() < deadline and dep.status(run_id) in (
                "starting", "running"), \
                dep.logs(run_id)[-3000:]
            time.sleep(0.5)
        assert rounds_done(out, run_id) == 0, "round 1 ended before the kill"
        dep.kill(training[0])
        _finished(dep, run_id)
        logs = dep.logs(run_id)
        results = _results(out)
        first, second = results["rounds"]
        assert "secure aggregation:" not in logs  # protocol counts: diagnostics only
        diagnostics = _diagnostics(out)
        assert [d["num_replies"] for d in diagnostics] == [3, 3]
        first_round = diagnostics[0]["secure_aggregation"]
        assert (first_round["cohort"], first_round["masked_inputs"]) == (4, 3)
        assert first_round["sum_released"] and first_round["dropouts"] == 1
        # The fixed denominator m = 4 in both rounds.
        z_delta = results["accounting"]["update_noise_multiplier"]
        for record in (first, second):
            assert record["noise_std"] == pytest.approx(z_delta * record["clip_norm"] / 4)
    finally:
        _stopped(dep)
