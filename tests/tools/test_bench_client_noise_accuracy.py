"""The accuracy comparison's variants and table (its runs are the study engine's, tested there)."""

from __future__ import annotations

import json

from dpfl_app.tools.bench import client_noise_accuracy as bench


def test_variants_name_their_settings_and_set_the_run_config_keys():
    named = {name: (keys, options) for name, keys, options in
             bench.variants(18, [0.8], ideal=True, clients=1437)}
    assert named["central"] == ({}, None)
    plain, ideal = named["clients m=1437 t=0.8m b=18"], named["clients m=1437 t=0.8m b=18 ideal"]
    assert plain == ({"secure-aggregation": True, "noise-at": "clients", "noise-bits": 18,
                      "noise-threshold": 0.8, "clients": 1437}, None)
    assert ideal[0] == plain[0] and ideal[1].remove_excess
    assert "central" not in {v[0] for v in bench.variants(18, [0.8], False, central=False)}


def test_a_client_noise_recipes_own_tuning_is_in_its_variants_keys_and_name():
    (only,) = bench.variants(18, [0.9], False, central=False, clients=1437,
                             tuned={"server-lr": 48.0})
    assert only == ("clients m=1437 t=0.9m b=18 server-lr=48",
                    {"secure-aggregation": True, "noise-at": "clients", "noise-bits": 18,
                     "noise-threshold": 0.9, "clients": 1437, "server-lr": 48.0}, None)


def test_table_gives_mean_and_sd_per_recipe_and_variant(tmp_path):
    rows = [{"recipe": "r", "seed": s, "variant": "central", "test_accuracy": a, "epsilon": 4.0}
            for s, a in ((1, 0.90), (2, 0.92))]
    rows.append({"recipe": "r", "seed": 1, "variant": "clients", "test_accuracy": 0.8,
                 "epsilon": 3.5, "bits": 18, "bytes_per_client": 9219})
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = bench.table(path)
    assert "| r | central | 2 | 0.910 ± 0.014 (n=2) | - | 4.00 | - | - |" in table
    # the paired difference uses the seeds both variants ran: seed 1 only
    assert "| r | clients | 1 | 0.800 ± nan (n=1) | -0.100 ± nan (n=1) | 3.50 | 18 | 9219 |" in table
