"""The benchmark at a tiny scale, the partition disk cache, and the cold-start fixes.

The benchmark is not a timed test: these check that it runs and writes
well-formed results, not how fast anything is.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from dpfl_app.data import datasets as data, partition_cache
from dpfl_app.tools.bench import __main__ as bench
from dpfl_app.tools.bench import PROJECT, coldstart, default_run_config
from dpfl_app.tools.bench.limit import run_limit
from dpfl_app.task import build_model, train

KEY_ARGS = dict(name="digits", partition_id=1, num_partitions=10, partitioning="iid",
                alpha=0.5, seed=42, data_dir="", image_column="", label_column="",
                val_fraction=0.0)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(partition_cache.CACHE_ENV, str(tmp_path / "cache"))
    partition_cache.load_client_data.cache_clear()  # the in-memory layer above the disk
    yield tmp_path / "cache"
    partition_cache.load_client_data.cache_clear()


def test_in_process_limit_trains_and_accounts_every_round(cache_dir):
    result = run_limit(default_run_config(**{"deterministic-noise": True}), 10, 2)
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["cohort"] > 0 and r["round_s"] >= r["train_s"] > 0 for r in rounds)
    assert 0 < rounds[0]["epsilon"] < rounds[1]["epsilon"]
    assert rounds[1]["test_accuracy"] > 0.1  # 10 classes: above chance after 2 rounds
    assert result["round_s"] == rounds[1]["round_s"]  # steady state skips round 1


def test_same_seed_gives_the_same_cohorts(cache_dir):
    """deterministic-noise: the cohort sizes (b) will also see."""
    config = default_run_config(**{"deterministic-noise": True})
    first, second = (run_limit(config, 10, 2)["rounds"] for _ in range(2))
    assert [r["cohort"] for r in first] == [r["cohort"] for r in second]
    assert first[1]["test_accuracy"] == second[1]["test_accuracy"]


def test_bench_cli_writes_well_formed_json(cache_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--scales", "10:3,20:4", "--rounds", "2", "--skip-app",
                       "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"]
    assert [(s["population"], s["clients"]) for s in report["scales"]] == [(10, 3), (20, 4)]
    assert all(s["a"]["round_s"] > 0 for s in report["scales"])
    printed = capsys.readouterr().out
    assert "| 10 | 3 | 2 |" in printed and "| 20 | 4 | 2 |" in printed


@pytest.mark.parametrize("text", ["10:11", "10:0", "10"])
def test_bad_scales_are_refused(text):
    with pytest.raises(ValueError):
        bench.parse_scales(text)


@pytest.mark.e2e
def test_bench_times_one_tiny_flwr_run(tmp_path):
    """(b) at 4 SuperNodes, 2 per round, 2 rounds: every field filled and consistent."""
    from dpfl_app.tools.bench.simulation import run_app

    result = run_app(tmp_path / "home", 4, "clients=2 deterministic-noise=true", 2,
                     timeout=300, env={partition_cache.CACHE_ENV: str(tmp_path / "cache")})
    assert result["status"] == "finished:completed"
    assert len(result["round_done_s"]) == 2
    assert 0 < result["server_start_s"] < result["first_round_s"] <= result["total_s"]
    assert result["round_s"] == pytest.approx(result["round_done_s"][1]
                                              - result["round_done_s"][0])
    assert result["round_s"] > 0
    assert result["peak_rss_mb"] > 100  # SuperLink + ServerApp + Ray + actors
    assert any("ClientAppActor" in name for name in result["cpu_s"])
    json.dumps(result)  # what the CLI writes



def test_secure_rounds_stage_seconds_skip_round_1_and_are_printed(tmp_path):
    """(s): each exchange's mean wall time after round 1, from the operator diagnostics."""
    from dpfl_app.run.outputs import DIAGNOSTICS_FILE
    from dpfl_app.tools.bench.simulation import _stage_seconds

    rounds = [{"secagg_share_keys": 9.0, "train.secagg": 9.0},  # round 1: start-up, left out
              {"secagg_share_keys": 0.1, "train.secagg": 0.5},
              {"secagg_share_keys": 0.3, "train.secagg": 0.7}]
    (tmp_path / DIAGNOSTICS_FILE).write_text("".join(
        json.dumps({"round": i, "secure_aggregation": {"stage_seconds": stages}}) + "\n"
        for i, stages in enumerate(rounds, 1)))
    stages = _stage_seconds(tmp_path)
    assert stages == {"secagg_share_keys": pytest.approx(0.2), "train.secagg": pytest.approx(0.6)}
    assert _stage_seconds(None) == {}
    (line,) = bench.stage_lines([{"population": 100, "clients": 50, "b": {"round_s": 0.5},
                                  "s": {"stage_s": stages}}])
    assert "secagg_share_keys 0.200" in line and "train.secagg 0.600" in line
    assert bench.stage_lines([{"population": 100, "clients": 50, "b": {"round_s": 0.5}}]) == []

# --- the partition disk cache ------------------------------------------------
def test_a_cache_hit_gives_identical_tensors_without_repartitioning(cache_dir, monkeypatch):
    expected = data.load_client_data("digits", 3, 10)
    first = partition_cache.load_client_data("digits", 3, 10)
    assert len(list(cache_dir.glob("digits-*.pt"))) == 1
    partition_cache.load_client_data.cache_clear()  # a new process: only the disk is left
    monkeypatch.setattr(data, "load_client_data", lambda *a: pytest.fail("re-partitioned"))
    second = partition_cache.load_client_data("digits", 3, 10)
    for got in (first, second):
        for tensors, want in zip(got, expected):
            assert torch.equal(tensors.images, want.images)
            assert torch.equal(tensors.labels, want.labels)
            assert tensors.images.dtype == want.images.dtype


def test_the_key_covers_every_argument_of_load_client_data(tmp_path):
    assert (list(inspect.signature(partition_cache.cache_key).parameters)
            == list(inspect.signature(data.load_client_data).parameters))
    changed = dict(name="mnist", partition_id=2, num_partitions=11, partitioning="dirichlet",
                   alpha=0.3, seed=7, data_dir=str(tmp_path), image_column="img", label_column="y",
                   val_fraction=0.2)
    base = partition_cache.cache_key(**KEY_ARGS)
    for arg, value in changed.items():
        assert partition_cache.cache_key(**{**KEY_ARGS, arg: value}) != base, arg


def test_the_key_changes_when_a_local_copy_changes(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"one")
    args = {**KEY_ARGS, "data_dir": str(tmp_path)}
    before = partition_cache.cache_key(**args)
    (tmp_path / "train.parquet").write_bytes(b"other")
    assert partition_cache.cache_key(**args) != before


def test_the_key_changes_with_the_split_constants(monkeypatch):
    base = partition_cache.cache_key(**KEY_ARGS)
    monkeypatch.setattr(data, "DIGITS_TEST_FRACTION", 0.3)
    assert partition_cache.cache_key(**KEY_ARGS) != base


def test_a_corrupt_cache_file_is_rebuilt(cache_dir):
    partition_cache.load_client_data("digits", 0, 10)
    (path,) = cache_dir.glob("digits-*.pt")
    path.write_bytes(b"not a torch file")
    partition_cache.load_client_data.cache_clear()
    train_set, _ = partition_cache.load_client_data("digits", 0, 10)
    assert torch.equal(train_set.labels, data.load_client_data("digits", 0, 10)[0].labels)
    assert path.stat().st_size > 100  # rewritten


def test_the_cache_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv(partition_cache.CACHE_ENV, "off")
    assert partition_cache.cache_dir() is None
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(partition_cache.CACHE_ENV)
    assert partition_cache.cache_dir() == tmp_path / ".cache" / "dpfl_app"


def test_a_thousand_clients_on_digits_each_get_data():
    """1,437 images over 1,000 clients: one-image partitions train on their image."""
    train_set, val_set = data.load_client_data("digits", 999, 1000)
    assert len(train_set.labels) == 1 and len(val_set.labels) == 0
    assert val_set.images.shape[1:] == train_set.images.shape[1:]
    train_set, val_set = data.load_client_data("digits", 0, 1000, val_fraction=0.2)
    assert len(train_set.labels) == 1 and len(val_set.labels) == 1


# --- cold start ----------------------------------------------------------------
def test_hand_written_sgd_equals_torch_optim_sgd_bit_for_bit():
    torch.manual_seed(0)
    images, labels = torch.randn(48, 1, 8, 8), torch.randint(0, 10, (48,))
    for name in ("digits-mlp", "digits-cnn"):
        net = build_model(name)
        reference = copy.deepcopy(net)
        train(net, data.loader(data.Tensors(images, labels), 16, True, seed=3), 2, 0.05)
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
        batches = data.loader(data.Tensors(images, labels), 16, True, seed=3)
        for _ in range(2):
            for x, y in batches:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(reference(x), y).backward()
                optimizer.step()
        for got, want in zip(net.state_dict().values(), reference.state_dict().values()):
            assert torch.equal(got, want), name


def test_a_cold_client_process_imports_nothing_heavy(tmp_path):
    """A train message with a cached partition: no datasets, sklearn, dynamo, scipy."""
    env = {**os.environ, "DPFL_CACHE_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "dpfl_app.tools.bench.coldstart", "--child", "train"]
    for _ in ("fills the cache", "reads it"):
        out = subprocess.run(command, env=env, cwd=PROJECT, capture_output=True, text=True,
                             check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy_modules"] == [], report
    assert coldstart.HEAVY  # the list the child checks against


def test_a_cold_secure_aggregation_round_start_imports_no_torch():
    """The timed `query.secagg_share_keys` child (a round's first message, after an
    enrolment) answers the real ClientApp without torch."""
    command = [sys.executable, "-m", "dpfl_app.tools.bench.coldstart", "--child",
               "secagg_share_keys"]
    out = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, check=True,
                         timeout=120)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy_modules"] == [] and report["handle_s"] > 0, report


def test_round_stamps_survive_the_run_folder_getting_its_start_time_back(tmp_path):
    """At its end a run gives every file the start time as mtime (no timing channel); a
    round the poller only sees then is stamped when seen, never before the earlier rounds."""
    import json
    import os
    import threading
    import time

    from dpfl_app.tools.bench.simulation import _watch

    run_dir = tmp_path / "out" / "20261203-120000-run1"
    run_dir.mkdir(parents=True)
    results = run_dir / "results.json"

    def write(rounds: int) -> None:
        results.write_text(json.dumps({"rounds": [{"test_accuracy": 0.5}] * rounds}))

    def server() -> None:
        write(1)
        time.sleep(0.3)
        write(2)
        os.utime(results, (1.0, 1.0))  # settled before the poller saw round 2's mtime
        time.sleep(0.3)
        (run_dir / "privacy.md").write_text("done")

    thread = threading.Thread(target=server)
    thread.start()
    found = _watch(tmp_path / "out", lambda: "running", time.time() + 30)
    thread.join()
    assert found["status"] == "completed" and len(found["round_written"]) == 2
    assert found["round_written"][1] >= found["round_written"][0] > 1.0


def test_the_extractor_bench_times_a_pass_over_flowers_real_link_state(capsys):
    """Flower's own InMemoryLinkState, N nodes, some messages in flight: one timed pass."""
    from dpfl_app.tools.bench import extractor

    row = extractor.one_pass(20, 5)
    assert (row["population"], row["inflight"]) == (20, 5)
    assert row["wall_s"] > 0 and row["cpu_s"] >= 0
    assert extractor.main(["--scales", "10:3"]) == 0
    assert "| 10 | 3 |" in capsys.readouterr().out
