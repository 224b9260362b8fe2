"""The study engine against the real ServerApp + ClientApp (tests/inprocess.py), same seed.

With `deterministic-noise=true` both draw cohorts and noise from the same
seeded RNG in the same order, so the epsilon of every round must be equal and
the accuracy equal up to the floating-point order of batched training (at
most one test image apart).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpfl_app.privacy.accounting import AccountingModel, epsilon_after
from dpfl_app.tools.study.engine import ENGINE, evaluation_sets, run_study
from dpfl_app.tools.study.vectorised import CohortTrainer
from dpfl_app.data.datasets import load_test_data
from dpfl_app.task import build_model
from dpfl_app.run.outputs import read_diagnostics
from tests.inprocess import default_run_config, run_server

SMALL = {"deterministic-noise": True, "rounds": 4, "clients": 5, "noise": 0.8, "lr": 0.05}


def _flower_results(tmp_path, config) -> dict:
    run_server({**config, "output-dir": str(tmp_path)}, num_nodes=POPULATION)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    results = json.loads((run_dir / "results.json").read_text())
    for record, diag in zip(results["rounds"], read_diagnostics(run_dir)):  # operator-only
        record["num_sampled"] = diag["num_sampled"]
    return results


POPULATION = 12


@pytest.mark.parametrize("sampling, optimizer",
                         [("poisson", "sgd"), ("fixed", "sgd"), ("poisson", "adam")])
def test_engine_matches_the_flower_path(tmp_path, sampling, optimizer):
    """Adam: the engine's optimizer steps one flat vector, the ServerApp's each array."""
    config = default_run_config(**SMALL, sampling=sampling, **{"server-optimizer": optimizer},
                                **({"server-lr": 0.01} if optimizer == "adam" else {}))
    flower = _flower_results(tmp_path, config)
    study = run_study(config, POPULATION)
    assert study["engine"] == ENGINE
    assert len(study["rounds"]) == len(flower["rounds"]) == SMALL["rounds"]
    test_images = len(load_test_data("digits").labels)
    assert all("num_sampled" not in r for r in study["rounds"])  # counts: operator-only
    for ours, diag, theirs in zip(study["rounds"], study["diagnostics"], flower["rounds"]):
        assert diag["num_sampled"] == theirs["num_sampled"]
        assert ours["clip_norm"] == pytest.approx(theirs["clip_norm"], rel=1e-4)
        # Seeded noise: the Flower run's guarantee is inf, its secret-noise figure is the study's.
        assert theirs["epsilon"] == "inf"
        assert ours["epsilon"] == theirs["epsilon_if_noise_secret"]
        assert abs(ours["test_accuracy"] - theirs["test_accuracy"]) * test_images <= 1 + 1e-9
    assert study["final"]["epsilon"] == flower["final"]["epsilon_if_noise_secret"]


def test_calibrated_noise_meets_the_target_epsilon():
    config = default_run_config(**{**SMALL, "target-epsilon": 20.0})
    study = run_study(config, POPULATION)
    model = AccountingModel("poisson", study["noise"], POPULATION, SMALL["clients"], 1e-5)
    assert study["final"]["epsilon"] == pytest.approx(epsilon_after(model, 4, "pld"))
    assert 19.0 < study["final"]["epsilon"] <= 20.0


def test_validation_holdout_is_disjoint_from_the_reported_test_half():
    cfg = default_run_config()
    sets = evaluation_sets(cfg, "validation")
    full = load_test_data("digits")
    assert len(sets["validation"].labels) + len(sets["test"].labels) == len(full.labels)
    flat = lambda t: {tuple(row.tolist()) for row in t.images.flatten(1)}  # noqa: E731
    assert not flat(sets["validation"]) & flat(sets["test"])
    study = run_study(default_run_config(**{**SMALL, "rounds": 1}), POPULATION,
                      holdout="validation")
    assert {"validation_accuracy", "test_accuracy"} <= set(study["rounds"][0])


def test_vectorised_training_equals_one_client_at_a_time():
    """The batched trainer against `task.train` per client, on clients of mixed sizes."""
    import torch

    from dpfl_app.data.datasets import Tensors

    torch.manual_seed(0)
    net = build_model("digits-cnn")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    data = [Tensors(torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))) for n in (1, 5, 5, 21)]
    batched = CohortTrainer(build_model("digits-cnn")).train(state, data, 2, 4, 0.05, 7)
    single = CohortTrainer(build_model("digits-cnn"), vectorised=False).train(
        state, data, 2, 4, 0.05, 7)
    for name in state:
        assert torch.allclose(batched[name], single[name], atol=1e-5), name


def test_batched_training_imports_no_dynamo():
    """The batched step (vmap of the forward, one backward) leaves torch._dynamo unimported:
    functorch's `grad` imported it on its first call, 1.6 s of every study's first round."""
    from tests.fresh_python import run_python

    done = run_python("""
        import sys, torch
        from dpfl_app.data.datasets import Tensors
        from dpfl_app.task import build_model
        from dpfl_app.tools.study.vectorised import CohortTrainer
        net = build_model("digits-mlp")
        state = {k: v.clone() for k, v in net.state_dict().items()}
        data = [Tensors(torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))) for n in (1, 3)]
        trained = CohortTrainer(build_model("digits-mlp")).train(state, data, 1, 2, 0.1, 0)
        assert trained["net.1.weight"].shape == (2, 32, 64)
        print("dynamo" if "torch._dynamo" in sys.modules else "clean")
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "clean"


def test_grid_and_target_epsilon_settings():
    from dpfl_app.tools.study.grid import parse_grid, setting_label
    from dpfl_app.tools.sweep import parse_args

    grid = parse_grid("lr=0.05,0.1 server-lr=1,2")
    assert grid == [{"lr": 0.05, "server-lr": 1}, {"lr": 0.05, "server-lr": 2},
                    {"lr": 0.1, "server-lr": 1}, {"lr": 0.1, "server-lr": 2}]
    assert setting_label({"target-epsilon": 2.0, **grid[0]}) == \
        "target-epsilon=2 lr=0.05 server-lr=1"
    # a text key takes bare words, as on the command line, or quoted TOML strings
    assert parse_grid('model=digits-cnn,"digits-mlp"') == [{"model": "digits-cnn"},
                                                           {"model": "digits-mlp"}]
    for bad in ("nokey=1", "noise=0.5,1", "lr=", "lr=0.1,x", "lr=0.1,-1", "model=resnet"):
        with pytest.raises(Exception, match="grid item"):
            parse_grid(bad)
    with pytest.raises(Exception, match="'model' = 'resnet' is invalid; allowed: auto or one"):
        parse_grid("model=digits-mlp,resnet")
    with pytest.raises(SystemExit):  # a validation split exists only in process
        parse_args(["--noise", "1", "--holdout", "validation"])
    with pytest.raises(SystemExit):  # reporting fewer rounds exists only in process
        parse_args(["--noise", "1", "--report-every", "0"])
    with pytest.raises(SystemExit):  # noise levels or target epsilons, not both
        parse_args(["--noise", "1", "--target-epsilon", "2"])


def test_inprocess_sweep_over_target_epsilons_and_a_grid(tmp_path, capsys):
    import csv
    import math

    from dpfl_app.tools import sweep

    out = tmp_path / "sweep"
    assert sweep.main(["--engine", "inprocess", "--target-epsilon", "20,inf", "--grid",
                       "lr=0.05,0.1", "--supernodes", str(POPULATION), "--run-config",
                       "rounds=2 clients=5 deterministic-noise=true", "--output", str(out),
                       "--report-every", "0"]) == 0
    with open(out / "sweep.csv") as handle:
        rows = {r["setting"]: r for r in csv.DictReader(handle)}
    assert list(rows) == ["target-epsilon=20 lr=0.05", "target-epsilon=20 lr=0.1",
                          "noise=0 lr=0.05", "noise=0 lr=0.1"]
    assert {r["engine"] for r in rows.values()} == {"inprocess"}
    calibrated = rows["target-epsilon=20 lr=0.1"]
    assert float(calibrated["noise"]) > 0 and 0 < float(calibrated["epsilon"]) <= 20
    assert math.isinf(float(rows["noise=0 lr=0.1"]["epsilon"]))
    assert "study engine" in (out / "sweep.md").read_text()
    results = json.loads(next((out / "runs").glob("target-epsilon=20-lr=0.1-seed-42"))
                         .joinpath("results.json").read_text())
    assert results["engine"] == "inprocess" and results["config"]["lr"] == 0.1
    # --report-every 0: the table's final round is evaluated and accounted, round 1 is not
    assert ["test_accuracy" in r for r in results["rounds"]] == [False, True]
    assert results["final"]["epsilon"] == results["rounds"][-1]["epsilon"]


FAKE_PFL = """import json, sys
work = json.load(open(sys.argv[sys.argv.index("--workload") + 1]))
weights = {"digits-mlp": 2410, "digits-cnn": 6090}[work["model"]]
print(json.dumps({"workload": {**work, "weights": weights}, "updates": 10,
                  "ms_per_client_update": 1.0, "cpu_ms_per_client_update": 1.0}))
"""


def test_bench_study_measures_both_engines_per_client_update(tmp_path, capsys):
    """The benchmark prints numbers (no speed is asserted): the engine in a fresh process,
    a stand-in for pfl that reports the workload it was given."""
    import sys

    from dpfl_app.tools.study import bench

    fake = tmp_path / "fake_pfl.py"
    fake.write_text(FAKE_PFL)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {fake} \"$@\"\n")
    python.chmod(0o755)
    out = tmp_path / "bench.json"
    assert bench.main(["--scales", f"{POPULATION}:5", "--rounds", "2", "--repeats", "1",
                       "--pfl-python", str(python), "--output", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    (engine,) = result["runs"]["engine"]
    assert engine["workload"]["rounds"] == 2 and engine["updates"] > 0
    assert engine["workload"]["model"] == "digits-mlp" and engine["workload"]["weights"] == 2410
    assert engine["ms_per_client_update"] > 0 and engine["load_average"] >= 0
    assert result["ratio"] == pytest.approx(1.0 / result["engine"])
    printed = capsys.readouterr().out
    assert "| batch_size | 16 | 16 |" in printed and f"| {POPULATION}, 5, 2 |" in printed


def test_bench_study_table_writes_every_row_as_markdown(tmp_path, capsys):
    """`--table FILE`: the app workload's rows and the pfl-benchmark row, in one Markdown file
    with the loads, ratios and the target's verdict; every run in FILE.json beside it."""
    import sys

    from dpfl_app.tools.study import bench

    fake = tmp_path / "fake_pfl.py"
    fake.write_text(FAKE_PFL)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {fake} \"$@\"\n")
    python.chmod(0o755)
    table = tmp_path / "out" / "table.md"
    assert bench.main(["--scales", f"{POPULATION}:5", "--rounds", "2", "--repeats", "1",
                       "--pfl-python", str(python), "--table", str(table), "--flwr-rounds",
                       "0", "--benchmark-scale", f"{POPULATION}:4:2"]) == 0
    report = json.loads(table.with_suffix(".json").read_text())
    (app,), (cnn,) = report["results"], report["benchmark"]
    assert (app["workload"], cnn["workload"]) == ("app", "pfl-benchmark")
    assert cnn["runs"]["engine"][0]["workload"]["model"] == "digits-cnn"
    text = table.read_text()
    assert text in capsys.readouterr().out
    assert "load average" in text and "On pfl-research's ground" in text
    for result, label in ((app, f"| {POPULATION}, 5, 2 |"), (cnn, f"| {POPULATION}, 4, 2 |")):
        line = next(row for row in text.splitlines() if row.startswith(label))
        assert f"**{result['ratio']:.1f}×**" in line
        assert ("| met |" if result["ratio"] >= 5 else "| **missed** |") in line


def test_bench_study_stops_when_the_workloads_differ(tmp_path, monkeypatch):
    """pfl's side reports the workload it ran; one differing line stops the benchmark."""
    from dpfl_app.tools.study import bench

    args = bench.parse_args(["--scales", f"{POPULATION}:5", "--rounds", "2", "--repeats", "1",
                             "--pfl-python", "pfl-python"])
    for change, error in [({"batch_size": 32}, "batch_size"), ({"data": "0" * 16}, "data"),
                          ({"noise": 1.0000001}, "noise"), ({}, None)]:
        def child(command, timeout, change=change):
            work = json.loads(Path(command[command.index("--workload") + 1]).read_text()) \
                if "--workload" in command else None
            if work is None:  # the engine's side: what it was given
                stem = Path(command[command.index("--engine-run") + 1]).with_suffix("")
                work = json.loads(stem.with_suffix(".json").read_text())
            else:
                work.update(change)
            return {"workload": work, "ms_per_client_update": 1.0,
                    "cpu_ms_per_client_update": 1.0, "load_average": 0.0}

        monkeypatch.setattr(bench, "_child", child)
        if error is None:
            assert bench.measure(args, "app", POPULATION, 5, 2, tmp_path)["ratio"] == 1.0
        else:
            with pytest.raises(SystemExit, match=f"different workloads:\n  {error}: engine"):
                bench.measure(args, "app", POPULATION, 5, 2, tmp_path)


def test_pfl_reads_the_users_the_engine_trains(tmp_path):
    """The exported file holds the app's partitions: same users, same bytes."""
    import numpy as np

    from dpfl_app.tools.study.bench import export_data, run_config
    from dpfl_app.tools.study.engine import population_data

    cfg = run_config("app", 30, 5, 2)
    digest = export_data(cfg, 30, tmp_path / "users.npz")
    users = population_data(cfg, 30)
    with np.load(tmp_path / "users.npz") as arrays:
        offsets = arrays["offsets"]
        assert len(offsets) == 31 and offsets[-1] == sum(len(u.labels) for u in users)
        for i in (0, 7, 29):
            np.testing.assert_array_equal(arrays["images"][offsets[i]:offsets[i + 1]],
                                          users[i].images.numpy())
            np.testing.assert_array_equal(arrays["labels"][offsets[i]:offsets[i + 1]],
                                          users[i].labels.numpy())
    assert len(digest) == 16


def test_batch_order_is_the_client_loaders_order():
    """The engine draws the ClientApp's batches without a DataLoader: same indices, same order."""
    from dpfl_app.data.datasets import Tensors, loader
    from dpfl_app.tools.study.vectorised import batch_order
    import torch

    for size, batch_size, epochs, seed in [(1, 16, 1, 0), (14, 16, 1, 7), (17, 16, 2, 1042),
                                           (33, 4, 5, 3), (5, 2, 3, 42)]:
        indices = torch.arange(size)
        batches = loader(Tensors(indices, indices), batch_size, shuffle=True, seed=seed)
        expected = [labels for _ in range(epochs) for _, labels in batches]
        got = batch_order(size, batch_size, epochs, seed)
        assert len(got) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), (size, batch_size, epochs)


def test_report_every_skips_only_what_nobody_reads():
    """Reporting the last round only changes no number of the run: same cohorts, noise,
    clip norms, final model and epsilon; the skipped rounds carry no accuracy or epsilon."""
    config = default_run_config(**{**SMALL, "rounds": 3})
    every = run_study(config, POPULATION)
    last = run_study(config, POPULATION, report_every=0)
    second = run_study(config, POPULATION, report_every=2)
    assert [r["clip_norm"] for r in last["rounds"]] == [r["clip_norm"] for r in every["rounds"]]
    assert last["final"]["test_accuracy"] == every["final"]["test_accuracy"]
    assert last["final"]["epsilon"] == every["final"]["epsilon"] == every["rounds"][-1]["epsilon"]
    assert [("test_accuracy" in r, "epsilon" in r) for r in last["rounds"]] == \
        [(False, False), (False, False), (True, True)]
    assert [r["round"] for r in second["rounds"] if "test_accuracy" in r] == [2, 3]
    assert last["final"]["best_test_accuracy"] == last["final"]["test_accuracy"]
    assert last["final"]["setup_s"] > 0 and last["final"]["loop_s"] > 0
    with pytest.raises(ValueError, match="report_every"):
        run_study(config, POPULATION, report_every=-1)


def test_max_epsilon_stops_where_the_strategy_would():
    """The stop round found once before the run equals the strategy's check before each round."""
    from dpfl_app.config import validate
    from dpfl_app.privacy.accounting import PrivacyLedger
    from dpfl_app.tools.study.engine import planned_rounds

    poisson = AccountingModel("poisson", 0.8, POPULATION, 5, 1e-5)
    three_rounds = epsilon_after(poisson, 3, "pld")
    for sampling, max_epsilon in [("poisson", three_rounds), ("poisson", three_rounds * 0.999),
                                  ("fixed", 40.0), ("poisson", 1e-3)]:
        cfg = validate(default_run_config(**{**SMALL, "rounds": 12, "sampling": sampling,
                                             "max-epsilon": max_epsilon}))
        ledger = PrivacyLedger(AccountingModel(sampling, 0.8, POPULATION, 5, 1e-5))
        strategy_rounds = 0
        while strategy_rounds < cfg["rounds"] and not ledger.would_exceed(max_epsilon):
            ledger.compose_round()
            strategy_rounds += 1
        assert planned_rounds(cfg, PrivacyLedger(ledger.model)) == strategy_rounds
    study = run_study(default_run_config(**{**SMALL, "rounds": 12, "max-epsilon": three_rounds}),
                      POPULATION, report_every=0)
    assert study["final"]["stop_reason"] == "privacy budget: round 4 would exceed max-epsilon"
    assert len(study["rounds"]) == 3 and study["final"]["epsilon"] == three_rounds


@pytest.mark.parametrize("name, shape", [("digits-linear", (1, 8, 8)), ("digits-mlp", (1, 8, 8)),
                                         ("digits-cnn", (1, 8, 8)), ("mnist-cnn", (1, 28, 28))])
def test_stacked_forward_equals_each_clients_module(name, shape):
    """The written-out forward on stacked weights: each client's logits are its own module's."""
    import torch
    from torch.func import functional_call

    from dpfl_app.tools.study.stacked import stacked_forward, stacked_layers

    torch.manual_seed(1)
    net = build_model(name)
    copies = [{k: v + 0.05 * torch.randn_like(v) for k, v in net.state_dict().items()}
              for _ in range(3)]
    images = torch.randn(3, 4, *shape)  # each client its own batch
    got = stacked_forward(stacked_layers(net), {k: torch.stack([c[k] for c in copies])
                                                for k in copies[0]}, images)
    for client, weights in enumerate(copies):
        want = functional_call(net, weights, (images[client],))
        assert torch.allclose(got[client], want, atol=1e-5), client


def test_stacked_forward_falls_back_to_vmap_where_it_does_not_apply():
    """A layer it does not know (lenet's GroupNorm), or leaves registered in another order
    than the forward applies them: the trainer keeps vmap's forward, with the same result."""
    import torch
    from torch import nn

    from dpfl_app.data.datasets import Tensors

    class Reordered(nn.Module):  # registers the output layer first
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(8, 10)
            self.hidden = nn.Linear(64, 8)

        def forward(self, x):
            return self.out(torch.relu(self.hidden(torch.flatten(x, 1))))

    assert CohortTrainer(build_model("lenet")).layers is None
    torch.manual_seed(0)
    data = [Tensors(torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))) for n in (3, 5)]
    trainer = CohortTrainer(Reordered())
    assert trainer.layers is not None  # known layers: only the check on real inputs tells
    state = {k: v.clone() for k, v in Reordered().state_dict().items()}
    batched = trainer.train(state, data, 1, 2, 0.1, 3)
    assert trainer.layers is None
    single = CohortTrainer(Reordered(), vectorised=False).train(state, data, 1, 2, 0.1, 3)
    for key in state:
        assert torch.allclose(batched[key], single[key], atol=1e-5), key
