"""The whole server's releases (issue: privacy hardening 3, 4, 6, 10), in process.

Each test failed on the code before the fix: `population` did not exist,
results.json and the log carried exact counts, a crash after a release let the
resumed run release that round again uncounted, and results.json's accounting
block said rounds = 0.
"""

from __future__ import annotations

import json
import logging

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from dpfl_app.errors import ConfigError
from dpfl_app.privacy.accounting import AccountingModel, epsilon_after
from dpfl_app.run.recorder import RunRecorder
from tests.inprocess import ServerCrash, default_run_config, run_server

# Exact participation (the old records, and the old log's "kept k of n nodes",
# "replies k (m=6)", "rejected reply from node ...") and the old skip flag.
COUNTS = ("num_sampled", "num_replies", "num_rejected", "kept", "replies", "rejected",
          "round skipped", '"skipped"', ",skipped")


def _config(out, **kw):
    return default_run_config(**{"output-dir": str(out), "clients": 2, **kw})


def _run_dir(out):
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def _results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_population_sets_the_accountants_n(tmp_path):
    """8 of 10 nodes online, population=10: the accountant's N is 10, not 8."""
    run_server(_config(tmp_path, rounds=1, sampling="fixed", population=10), num_nodes=8)
    run_dir = _run_dir(tmp_path)
    accounting = _results(run_dir)["accounting"]
    assert accounting["population"] == 10
    assert accounting["sampling_probability"] == pytest.approx(2 / 10)
    assert "N = 10 is the run-config `population`" in (run_dir / "privacy.md").read_text()
    with pytest.raises(ConfigError, match=r"'population' = 5 .* 8 SuperNodes connected"):
        run_server(_config(tmp_path / "small", rounds=1, population=5), num_nodes=8)


def test_shared_files_and_the_log_carry_no_exact_counts(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_server(_config(tmp_path, rounds=1, sampling="fixed"), drop_nodes={1, 2, 3})
    run_dir = _run_dir(tmp_path)
    shared = [p for p in run_dir.iterdir() if p.suffix in (".json", ".csv", ".md")]
    texts = [p.read_text() for p in shared]
    texts += [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.INFO]
    for text in texts:
        for word in COUNTS:
            assert word not in text.lower(), (word, text[:300])
    from dpfl_app.run.outputs import DIAGNOSTICS_FILE, read_diagnostics  # new in the fix

    (diagnostics,) = read_diagnostics(run_dir)  # the operator's file has them all
    assert {"num_sampled", "num_replies", "num_rejected", "rejected"} <= set(diagnostics)
    assert "DO-NOT-SHARE" in DIAGNOSTICS_FILE and (run_dir / DIAGNOSTICS_FILE).exists()
    # N was not configured: privacy.md states the assumption.
    assert "connected at the start" in (run_dir / "privacy.md").read_text()


def test_a_deployment_without_population_says_its_node_count_is_released_and_not_covered():
    """population=0 outside a simulation: N is an exact, published count of nodes."""
    from dpfl_app.strategy.population import population_assumption

    cfg = default_run_config(population=0)
    deployed = population_assumption(cfg, 10, simulation=False)
    assert "released un-noised" in deployed and "NOT covered" in deployed
    simulated = population_assumption(cfg, 10, simulation=True)
    assert "NOT covered" not in simulated and "public setting" in simulated
    assert "NOT covered" not in population_assumption({**cfg, "population": 10}, 10)


def test_a_round_released_before_a_crash_stays_charged(tmp_path, monkeypatch):
    """The server dies after round 2's model was written, before its checkpoint.

    The resumed run redoes round 2 with fresh noise: that is a second release
    of round 2 and must be charged again, 3 + 1 = 4 releases for 3 rounds.
    """
    cfg = _config(tmp_path, rounds=3)
    save = RunRecorder.save_checkpoint

    def crash_at_round_2(recorder):
        if recorder.strategy.records[-1]["round"] == 2:
            raise ServerCrash("died after round 2's release")
        save(recorder)

    monkeypatch.setattr(RunRecorder, "save_checkpoint", crash_at_round_2)
    with pytest.raises(ServerCrash):
        run_server(cfg)
    monkeypatch.setattr(RunRecorder, "save_checkpoint", save)
    run_dir = _run_dir(tmp_path)
    assert (run_dir / "final_model.pt").exists()  # round 2's model left the server
    run_server({**cfg, "resume-from": str(run_dir)})

    results = _results(run_dir)
    model = AccountingModel("poisson", 0.3, 10, 2, 1e-5)
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert results["final"]["epsilon"] == pytest.approx(epsilon_after(model, 4, "pld"), rel=1e-12)
    assert results["accounting"]["rounds"] == 4
    assert [r["rounds_accounted"] for r in results["rounds"]] == [1, 3, 4]
    assert "4 rounds were charged" in (run_dir / "privacy.md").read_text()


def _event(spec: dict) -> dpa.DpEvent:
    """A DpEvent from results.json's dict form (class name under "type")."""
    fields = {k: (_event(v) if isinstance(v, dict) else v) for k, v in spec.items() if k != "type"}
    return getattr(dpa, spec["type"])(**fields)


def _recompute(acc: dict, rounds: int) -> tuple[float, float | None]:
    """(RDP, PLD) epsilon from the accounting block alone, with dp_accounting directly."""
    event = _event(acc["round_event"])
    relation = dpa.NeighboringRelation[acc["neighboring_relation"]]
    rdp = dpa.rdp.RdpAccountant(acc["rdp_orders"], relation)
    rdp.compose(dpa.SelfComposedDpEvent(event, rounds))
    curve = np.asarray(rdp.rdp)  # the per-order RDP curve
    if acc["rdp_rule"] != "RdpAccountant":  # replace-one: order-wise min with the plain Gaussian
        plain = dpa.rdp.RdpAccountant(acc["rdp_orders"], relation)
        plain.compose(dpa.SelfComposedDpEvent(event.event, rounds))
        curve = np.minimum(curve, plain.rdp)
    eps_rdp = compute_epsilon(acc["rdp_orders"], curve, acc["delta"])[0]
    if acc["pld_value_discretization_interval"] is None:
        return eps_rdp, None
    pld = dpa.pld.PLDAccountant(relation, acc["pld_value_discretization_interval"])
    pld.compose(dpa.SelfComposedDpEvent(event, rounds))
    return eps_rdp, pld.get_epsilon(acc["delta"])


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_results_json_alone_reproduces_epsilon_with_dp_accounting(tmp_path, sampling):
    run_server(_config(tmp_path, rounds=2, sampling=sampling))
    results = _results(_run_dir(tmp_path))
    acc = results["accounting"]
    assert acc["rounds"] == 2  # current after every round, not the start's 0
    eps_rdp, eps_pld = _recompute(acc, acc["rounds"])
    expected = min(eps_pld, eps_rdp) if acc["epsilon_rule"] == "min(pld, rdp)" else eps_rdp
    assert results["final"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert acc["epsilon"] == pytest.approx(expected, rel=1e-9)
    for rec in results["rounds"]:  # and each round's RDP figure
        assert rec["epsilon_rdp"] == pytest.approx(_recompute(acc, rec["rounds_accounted"])[0],
                                                   rel=1e-9)


def test_client_eval_metrics_leave_results_json_and_the_log_for_their_own_file(tmp_path, caplog):
    """results.json is shareable; client-side metrics are computed on private data, un-noised."""
    from dpfl_app.run.outputs import CLIENT_EVAL_FILE, read_jsonl

    caplog.set_level(logging.INFO)
    run_server(_config(tmp_path, rounds=2, **{"client-eval": True}))
    run_dir = _run_dir(tmp_path)
    results = _results(run_dir)
    assert not any("client_eval" in key for rec in results["rounds"] for key in rec)
    assert not any("client_eval" in key for key in results["final"])
    rows = read_jsonl(run_dir / CLIENT_EVAL_FILE)
    assert [r["round"] for r in rows] == [1, 2] and all(len(r) > 1 for r in rows)
    assert "DO-NOT-SHARE" in CLIENT_EVAL_FILE and "NOT-DP" in CLIENT_EVAL_FILE
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "Aggregated MetricRecord" not in logged  # Flower's line for client metrics
    for row in rows:
        for key, value in row.items():
            if key != "round":
                assert repr(value) not in logged and f"{key}': {value}" not in logged
