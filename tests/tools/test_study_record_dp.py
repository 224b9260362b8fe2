"""The study engine's batched DP-SGD against the ClientApp's per-site DP-SGD, same generators."""

from __future__ import annotations

import torch

from dpfl_app.data.datasets import Tensors
from dpfl_app.client.dp_sgd import DpSgdSettings, train_dp_sgd
from dpfl_app.privacy.record_level import RecordLevelModel, record_epsilon
from dpfl_app.task import build_model
from dpfl_app.tools.study.engine import run_study
from dpfl_app.tools.study.record_dp import CohortDpSgd, site_generators
from tests.inprocess import default_run_config


def test_the_cohort_trainer_computes_each_sites_dp_sgd():
    gen = torch.Generator().manual_seed(0)
    sites = [Tensors(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen))
             for n in (7, 12, 10)]  # unequal sizes: padding must never be sampled
    torch.manual_seed(1)
    net = build_model("digits-linear")
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    settings = DpSgdSettings(1.3, 0.8, 0.3, 2, 0.1, 4)
    batched = CohortDpSgd(build_model("digits-linear")).train(
        start, sites, settings, site_generators(9, 1, [0, 1, 2]))
    for i, (data, rng) in enumerate(zip(sites, site_generators(9, 1, [0, 1, 2]))):
        net.load_state_dict(start)
        train_dp_sgd(net, data, settings, rng, device="cpu")
        for name, value in net.state_dict().items():
            torch.testing.assert_close(batched[name][i], value, rtol=1e-4, atol=1e-5)


def test_a_study_run_reports_the_record_level_epsilon_of_its_rounds():
    config = default_run_config(**{"noise": 0.0, "record-noise": 1.5, "rounds": 2, "clients": 3,
                                   "local-epochs": 1, "record-sampling-rate": 0.5,
                                   "deterministic-noise": True})
    result = run_study(config, 3)
    model = RecordLevelModel(1.5, 0.5, 1, 1e-5)
    assert [r["record_epsilon"] for r in result["rounds"]] == [
        record_epsilon(model, 1), record_epsilon(model, 2)]
    assert result["final"]["record_epsilon"] == record_epsilon(model, 2)
    assert result["final"]["test_accuracy"] > 0.1


def test_a_record_only_study_sends_its_updates_unclipped():
    """No user-level clip (config.user_level_clip_on): the initial clip norm changes nothing,
    no clip norm or clipped count is reported. With a clip of 1e-4 the old engine froze."""
    base = {"noise": 0.0, "record-noise": 1.5, "rounds": 2, "clients": 3, "local-epochs": 1,
            "record-sampling-rate": 0.5, "deterministic-noise": True}
    tiny, large = (run_study(default_run_config(**base, **{"initial-clip": clip}), 3)
                   for clip in (1e-4, 100.0))
    assert tiny["final"]["test_accuracy"] == large["final"]["test_accuracy"]
    assert tiny["final"]["test_accuracy"] > tiny["initial"]["test_accuracy"] + 0.2
    assert all(r["clip_norm"] is None and r["noisy_unclipped_fraction"] is None
               for r in tiny["rounds"])
