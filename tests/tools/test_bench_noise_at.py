"""The noise-at benchmark runs and prints both modes (its numbers go to the docs, not here)."""

from __future__ import annotations

import json

from dpfl_app.tools.bench import noise_at


def test_protocol_only_bench_times_both_modes(capsys):
    assert noise_at.main(["--protocol-only", "--clients", "6", "--dim", "100", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[:out.rindex("}") + 1])
    assert len(result["round_seconds"]["server"]) == len(result["round_seconds"]["clients"]) == 2
    assert result["ratio"] > 0 and "noise-at=clients: ratio" in out
