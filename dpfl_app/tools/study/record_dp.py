"""A cohort's record-level DP-SGD in one batched computation, for the study engine.

It computes what `dp_sgd.train_dp_sgd` computes at each site: Poisson
sampling at rate q, ceil(1/q) steps per epoch, per-example gradients clipped
to `record-clip`, their sum plus N(0, (sigma * clip)^2) per coordinate,
divided by `batch-size`, then `task.sgd_step`'s momentum step. Every site
has its own generator and draws from it in `train_dp_sgd`'s order (the
Poisson draw over its records, then the noise array after array), so with the
same generators it matches the per-site loop up to floating-point summation
order (tests/tools/test_study_record_dp.py checks). Sites are padded to the
largest one; padding is never sampled.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dpfl_app.data.datasets import Tensors
from dpfl_app.client.dp_sgd import DpSgdSettings
from dpfl_app.privacy.record_level import steps_per_epoch
from dpfl_app.task import MOMENTUM


def site_generators(seed: int, server_round: int, sites: list[int]) -> list[np.random.Generator]:
    """One seeded generator per site and round (the study's noise is reproducible)."""
    return [np.random.default_rng([seed, server_round, site]) for site in sites]


class CohortDpSgd:
    """`train(global, datasets, settings, generators)` -> each site's weights, stacked."""

    def __init__(self, net: nn.Module) -> None:
        def loss(params, image, label):
            logits = functional_call(net, params, (image.unsqueeze(0),))
            return nn.functional.cross_entropy(logits, label.unsqueeze(0))

        # sites x examples: per-example gradients of each site's own parameters
        self._grads = vmap(vmap(grad(loss), in_dims=(None, 0, 0)))

    def train(self, global_state: dict[str, torch.Tensor], datasets: list[Tensors],
              settings: DpSgdSettings, generators: list[np.random.Generator]
              ) -> dict[str, torch.Tensor]:
        count, sizes = len(datasets), [len(d.labels) for d in datasets]
        longest = max(sizes)
        images = torch.zeros((count, longest, *datasets[0].images.shape[1:]))
        labels = torch.zeros((count, longest), dtype=torch.long)
        for i, data in enumerate(datasets):
            images[i, :sizes[i]], labels[i, :sizes[i]] = data.images, data.labels
        params = {k: v.detach().unsqueeze(0).repeat(count, *[1] * v.dim())
                  for k, v in global_state.items()}
        velocity = {k: torch.zeros_like(v) for k, v in params.items()}
        stddev = settings.noise_multiplier * settings.clip
        with torch.no_grad():
            for _ in range(settings.epochs * steps_per_epoch(settings.sampling_rate)):
                mask = torch.zeros((count, longest))
                noise = {k: torch.empty_like(v) for k, v in params.items()}
                for i, rng in enumerate(generators):  # train_dp_sgd's order, site by site
                    mask[i, :sizes[i]] = torch.from_numpy(
                        (rng.random(sizes[i]) < settings.sampling_rate).astype(np.float32))
                    for k, v in global_state.items():
                        noise[k][i] = torch.from_numpy(rng.standard_normal(v.shape) * stddev)
                grads = self._grads(params, images, labels)
                norms = torch.sqrt(sum(g.flatten(2).double().square().sum(2)
                                       for g in grads.values()))
                factors = (settings.clip / norms.clamp_min(1e-30)).clamp(max=1.0).float() * mask
                for name, param in params.items():
                    summed = torch.einsum("si,si...->s...", factors, grads[name])
                    gradient = (summed + noise[name]) / settings.denominator
                    velocity[name].mul_(MOMENTUM).add_(gradient)
                    param.add_(velocity[name], alpha=-settings.lr)
        return params


def record_level_training(trainer: CohortDpSgd, global_state: dict[str, torch.Tensor],
                          datasets: list[Tensors], sites: list[int], cfg: dict, model,
                          server_round: int) -> dict[str, torch.Tensor]:
    """The cohort's DP-SGD under run config `cfg` and RecordLevelModel `model`."""
    settings = DpSgdSettings(model.noise_multiplier, cfg["record-clip"], model.sampling_rate,
                             cfg["local-epochs"], cfg["lr"], cfg["batch-size"])
    return trainer.train(global_state, datasets, settings,
                         site_generators(cfg["seed"], server_round, sites))
