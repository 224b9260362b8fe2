"""Record-level DP-SGD inside one site (Abadi et al. 2016), with `torch.func` per-example gradients.

Each local step:

1. Poisson sampling: every record joins the step independently with
   probability q (`record-sampling-rate`);
2. per-example gradients (`torch.func.vmap(grad(...))`), each clipped to L2
   norm `record-clip` (C_r) over all of the model's arrays;
3. their sum plus Gaussian noise N(0, (sigma * C_r)^2) on every coordinate,
   drawn even when no record was sampled (an empty step is released too);
4. divided by the public `batch-size` (not by q * n as Opacus does: n, the
   site's record count, differs between neighbouring datasets), then the
   app's momentum SGD step (`task.sgd_step`): post-processing.

There are ceil(1/q) steps per local epoch whatever the site's size, so the
epsilon is a public function of the settings (`privacy.record_level`).

The sampling and the noise come from numpy's Generator on ChaCha20 keyed
from the operating system (`privacy.randomness.secure_generator`), as the
server's noise does; tests and the study engine pass a seeded generator.
Why `torch.func` and not Opacus's GradSampleModule and DPOptimizer (which
compute the same clipped sum, tests/client/test_dp_sgd.py): in a fresh ClientApp
process they cost about the same (both load torch._dynamo: Opacus through
torch.optim, torch.func on its first vmap; docs/record-level.md has the
numbers), but here the noise comes from our ChaCha20 generator (Opacus draws
from torch's generator, a CSPRNG only with torchcsprng), and the study engine
batches this same computation over the sites with one more vmap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dpfl_app.data.datasets import Tensors
from dpfl_app.privacy.record_level import steps_per_epoch
from dpfl_app.task import DEVICE, sgd_step


@dataclass(frozen=True)
class DpSgdSettings:
    noise_multiplier: float  # sigma
    clip: float  # C_r
    sampling_rate: float  # q
    epochs: int
    lr: float
    denominator: int  # the public batch-size the noised sum is divided by


def per_example_gradients(net: nn.Module):
    """params, images, labels -> {name: one gradient per example} (cross-entropy)."""

    def loss(params, image, label):
        logits = functional_call(net, params, (image.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, label.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))


def clipped_sum(grads: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Sum over examples of each example's gradient scaled to L2 norm at most `clip`."""
    norms = torch.sqrt(sum(g.flatten(1).double().square().sum(1) for g in grads.values()))
    factors = (clip / norms.clamp_min(1e-30)).clamp(max=1.0).to(next(iter(grads.values())).dtype)
    return {name: torch.einsum("i,i...->...", factors, g) for name, g in grads.items()}


def gaussian_noise(like: dict[str, torch.Tensor], stddev: float,
                   rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """i.i.d. N(0, stddev^2) on every coordinate, drawn from `rng` array after array."""
    return {name: torch.from_numpy(rng.standard_normal(v.shape) * stddev).to(v.dtype).to(v.device)
            for name, v in like.items()}


def noised_gradient(net: nn.Module, grads_fn, data: Tensors, chosen: np.ndarray,
                    settings: DpSgdSettings, rng: np.random.Generator,
                    device=DEVICE) -> dict[str, torch.Tensor]:
    """(clipped sum over the chosen records + noise) / denominator, one array per parameter."""
    params = {name: p.detach() for name, p in net.named_parameters()}
    if len(chosen):
        index = torch.from_numpy(chosen)
        summed = clipped_sum(grads_fn(params, data.images[index].to(device),
                                      data.labels[index].to(device)), settings.clip)
    else:
        summed = {name: torch.zeros_like(p) for name, p in params.items()}
    noise = gaussian_noise(params, settings.noise_multiplier * settings.clip, rng)
    return {name: (summed[name] + noise[name]) / settings.denominator for name in params}


def train_dp_sgd(net: nn.Module, data: Tensors, settings: DpSgdSettings,
                 rng: np.random.Generator, device=DEVICE) -> int:
    """Local DP-SGD with momentum; returns the number of steps (a public number)."""
    net.to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]
    velocity = [torch.zeros_like(p) for p in params]
    grads_fn = per_example_gradients(net)
    steps = settings.epochs * steps_per_epoch(settings.sampling_rate)
    size = len(data.labels)
    for _ in range(steps):
        chosen = np.flatnonzero(rng.random(size) < settings.sampling_rate)
        gradient = noised_gradient(net, grads_fn, data, chosen, settings, rng, device)
        for name, param in net.named_parameters():
            param.grad = gradient[name]
        sgd_step(params, velocity, settings.lr)
    net.zero_grad(set_to_none=True)
    return steps
