"""Each site's DP-SGD step (dpfl_app/client/dp_sgd.py): the clip, the noise, the step count, Opacus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpfl_app.data.datasets import Tensors
from dpfl_app.client.dp_sgd import (DpSgdSettings, clipped_sum, noised_gradient, per_example_gradients,
                             train_dp_sgd)
from dpfl_app.task import build_model

CLIP = 3.0


def _data(size: int = 40, seed: int = 0) -> Tensors:
    gen = torch.Generator().manual_seed(seed)
    return Tensors(torch.randn(size, 1, 8, 8, generator=gen),
                   torch.randint(0, 10, (size,), generator=gen))


def _net(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("digits-mlp")


def _settings(noise: float = 0.0, **kw) -> DpSgdSettings:
    return DpSgdSettings(**{"noise_multiplier": noise, "clip": CLIP, "sampling_rate": 0.25,
                            "epochs": 1, "lr": 0.1, "denominator": 8, **kw})


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def _per_example(net, data):
    params = {n: p.detach() for n, p in net.named_parameters()}
    return per_example_gradients(net)(params, data.images, data.labels)


def test_a_huge_example_is_clipped_to_record_clip_and_small_ones_are_not():
    net, data = _net(), _data()
    data.images[3] *= 1e4  # one example whose gradient is enormous
    grads = _per_example(net, data)
    norms = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
    assert norms[3] > 100 * CLIP
    alone = _flat(noised_gradient(net, per_example_gradients(net), data, np.array([3]),
                                  _settings(), np.random.default_rng(0), "cpu")) * 8
    assert alone.norm() == pytest.approx(CLIP, rel=1e-5)  # clipped to exactly C_r
    small = int(torch.argmin(norms))
    assert norms[small] < CLIP
    kept = clipped_sum({k: v[small:small + 1] for k, v in grads.items()}, CLIP)
    torch.testing.assert_close(_flat(kept), torch.cat([g[small].flatten() for g in grads.values()]))
    # the sum of all of them moves by at most C_r when any one example is removed
    full = _flat(clipped_sum(grads, CLIP))
    without = _flat(clipped_sum({k: torch.cat([v[:3], v[4:]]) for k, v in grads.items()}, CLIP))
    assert (full - without).norm() <= CLIP * (1 + 1e-5)


def test_noise_stddev_is_sigma_times_clip_per_coordinate_on_the_summed_gradient():
    """The noised sum minus the clipped sum, over 200 steps x 2,410 coordinates = 482,000
    draws: the sample stddev of a Gaussian has relative sd 1/sqrt(2n) = 0.1 %, so 1 % is
    ten of them; the mean is within 5 sd (sd = sigma*C/sqrt(n))."""
    sigma, net, data = 1.7, _net(), _data()
    grads_fn, rng = per_example_gradients(net), np.random.default_rng(2024)
    chosen = np.arange(0, 40, 3)
    exact = _flat(clipped_sum({k: v[torch.from_numpy(chosen)]
                               for k, v in _per_example(net, data).items()}, CLIP)).double()
    noise = torch.stack([
        _flat(noised_gradient(net, grads_fn, data, chosen, _settings(sigma), rng, "cpu")) * 8
        - exact for _ in range(200)]).double()
    assert noise.std().item() == pytest.approx(sigma * CLIP, rel=0.01)
    assert abs(noise.mean().item()) < 5 * sigma * CLIP / noise.numel() ** 0.5


def test_the_number_of_steps_is_public_and_does_not_depend_on_the_site_size():
    settings = _settings(1.0, sampling_rate=0.1, epochs=3)
    steps = [train_dp_sgd(_net(), _data(size), settings, np.random.default_rng(1), "cpu")
             for size in (7, 40, 300)]
    assert steps == [30, 30, 30]


def test_an_empty_poisson_sample_still_releases_noise():
    net, data = _net(), _data()
    empty = noised_gradient(net, per_example_gradients(net), data, np.array([], dtype=int),
                            _settings(1.0), np.random.default_rng(3), "cpu")
    assert all(g.abs().sum() > 0 for g in empty.values())


def test_the_clipped_sum_equals_opacus_dpoptimizer_without_noise():
    """Opacus's GradSampleModule + DPOptimizer (noise 0): the same per-example clip and the
    same division by the expected batch size (Opacus clips to C/(norm + 1e-6): 1e-5 relative)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    net, data = _net(5), _data(seed=5)
    data.images[0] *= 50  # some examples clipped, some not
    chosen = np.arange(0, 40, 2)
    ours = noised_gradient(net, per_example_gradients(net), data, chosen, _settings(),
                           np.random.default_rng(0), "cpu")
    module = GradSampleModule(_net(5), loss_reduction="mean")
    optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=0.0), noise_multiplier=0.0,
                            max_grad_norm=CLIP, expected_batch_size=8, loss_reduction="mean")
    index = torch.from_numpy(chosen)
    # mean reduction: Opacus rescales per-sample gradients by the batch size, then divides
    # the noised sum by expected_batch_size, as we divide by the public batch-size
    loss = torch.nn.functional.cross_entropy(module(data.images[index]), data.labels[index])
    loss.backward()
    optimizer.pre_step()
    theirs = {name.removeprefix("_module."): p.grad for name, p in module.named_parameters()}
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-7)
