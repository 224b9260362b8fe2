"""The distributed-DP benchmark runs, and its noise table says what the accountant says."""

from __future__ import annotations

import pytest

from dpfl_app.tools.bench import distributed_dp


def test_bench_prints_the_client_stages(capsys):
    distributed_dp.main(["--dims", "100", "--bits", "20", "--population", "200", "--clients",
                         "40", "--epsilons", "", "--reps", "2"])  # part 2: the test below
    out = capsys.readouterr().out
    assert "load average" in out and "encode total" in out and "upload 323 B" in out


def test_noise_table_rows_meet_the_target_and_cost_at_least_central():
    # central z given (its calibration is tested elsewhere, and takes seconds)
    rows = distributed_dp.noise_table(200, 40, 5, 1e-5, 8.0, 0.5, [20], 100, z_central=1.0)
    (row,) = rows
    sampled, client = row["sampled"], row["client"]
    assert client["z_at_t"] >= sampled["z_at_t"]  # no amplification: more noise
    # all survivors' noise is at least the threshold's, which at least matches central DP's z
    assert sampled["std_ratio_all_survive"] >= sampled["z_at_t"] / row["z_central_update"]
    assert sampled["inflation"] == pytest.approx(1.0, abs=1e-2)  # 20 bits: rounding is cheap


def test_overhead_times_the_apps_train_and_the_encoding_of_its_update():
    r = distributed_dp.time_overhead("digits-mlp", images=2, epochs=1, bits=18, clients=40,
                                     reps=1)
    assert r["dim"] == 2410 and r["train"] > 0 and r["encode"] > 0
    assert r["ratio"] == r["encode"] / r["train"]
    assert r["bytes"] == (4096 + 1) * 18 // 8 + 1  # d' + 1 coordinates of 18 bits, packed
