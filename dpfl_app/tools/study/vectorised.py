"""A cohort's local training in one batched computation (`torch.func.vmap` over clients).

It computes what `task.train` computes for each client: the ClientApp's
loader (`data.datasets.loader`, same batch size and per-round shuffle seed),
cross-entropy, and `task.sgd_step`'s momentum SGD. Clients whose training sets
have the same size draw the same batch order (the loader's seed is the
round's), so they are stacked and stepped together, one batched step per
batch instead of one backward pass per client.

The step vmaps only the forward pass over the stacked weights; one ordinary
backward pass of the sum of the clients' mean losses then gives each client
its own gradient (client c's weights appear only in client c's loss). That is
the same gradient as `vmap(grad(loss))`, at a third to a tenth of its cost
for small cohorts, where functorch's per-call overhead dominates. Up to
floating-point summation order the result equals the sequential loop's; the
tests check both against `task.train`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.func import functional_call, vmap

from dpfl_app.data.datasets import Tensors, loader
from dpfl_app.task import MOMENTUM, train

# Models whose forward pass vmap supports (no data-dependent control flow or
# in-place buffers); others are trained one client at a time with `task.train`.
VECTORISED_MODELS = (
    "digits-linear", "digits-mlp", "digits-cnn", "mnist-cnn", "lenet")


def batch_order(size: int, batch_size: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The index batches the ClientApp's loader yields for `size` examples, every epoch.

    Drawn from the loader's generator in the loader's order, without building
    one (a quarter of the cost): each epoch's iterator first draws its base
    seed, then the `RandomSampler` draws the permutation it yields and, when
    exhausted, one more that it cuts to zero length. tests/tools/
    test_study_engine.py checks it against `data.datasets.loader`.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(epochs):
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the base seed
        batches.extend(torch.randperm(size, generator=generator).split(batch_size))
        torch.randperm(size, generator=generator)  # the sampler's empty tail
    return batches


class CohortTrainer:
    """Trains stacked copies of one model: `train(global, datasets, ...)` -> stacked weights."""

    def __init__(self, net: nn.Module, vectorised: bool = True) -> None:
        self.net = net
        self.names = list(net.state_dict())
        trainable = [name for name, p in net.named_parameters() if p.requires_grad]
        if trainable != self.names:  # the clip acts on every array: keep them all trainable
            vectorised = False
        self.vectorised = vectorised

        self._logits = vmap(lambda params, images: functional_call(net, params, (images,)))

    def warm_up(self, data: Tensors) -> None:
        """One throwaway step on one example: the process's first batched call imports
        and builds what later calls reuse (about 1.6 s with torch 2.14), so a run pays
        it in its set-up, not in its first round."""
        state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.train(state, [Tensors(data.images[:1], data.labels[:1])], 1, 1, 0.0, 0)

    def train(self, global_state: dict[str, torch.Tensor], datasets: list[Tensors],
              epochs: int, batch_size: int, lr: float, seed: int) -> dict[str, torch.Tensor]:
        """Each client's weights after local training, stacked along a first axis."""
        out = {name: torch.empty((len(datasets), *v.shape), dtype=v.dtype)
               for name, v in global_state.items()}
        groups: dict[int, list[int]] = defaultdict(list)
        for position, data in enumerate(datasets):
            groups[len(data.labels)].append(position)
        for size, positions in groups.items():
            if self.vectorised:
                trained = self._train_group(global_state, [datasets[p] for p in positions],
                                            batch_order(size, batch_size, epochs, seed), lr)
            else:
                trained = self._train_each(global_state, [datasets[p] for p in positions],
                                           epochs, batch_size, lr, seed)
            index = torch.tensor(positions)
            for name in out:
                out[name][index] = trained[name]
        return out

    def _train_group(self, global_state, datasets, batches, lr):
        count = len(datasets)
        images = torch.stack([d.images for d in datasets])  # clients x examples x ...
        labels = torch.stack([d.labels for d in datasets])
        params = {k: v.detach().unsqueeze(0).repeat(count, *[1] * v.dim()).requires_grad_()
                  for k, v in global_state.items()}
        velocity = [torch.zeros_like(v) for v in params.values()]
        for batch in batches:
            logits = self._logits(params, images[:, batch])  # clients x batch x classes
            # The sum over clients of each client's mean loss (all share the batch size).
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, batch].flatten(),
                                               reduction="sum") / len(batch)
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():  # task.sgd_step, all clients at once
                for param, buf, grad_ in zip(params.values(), velocity, grads):
                    buf.mul_(MOMENTUM).add_(grad_)
                    param.add_(buf, alpha=-lr)
        return {k: v.detach() for k, v in params.items()}

    def _train_each(self, global_state, datasets, epochs, batch_size, lr, seed):
        trained = []
        for data in datasets:
            self.net.load_state_dict(global_state)
            train(self.net, loader(data, batch_size, shuffle=True, seed=seed), epochs, lr,
                  device="cpu")
            trained.append({k: v.detach().clone() for k, v in self.net.state_dict().items()})
        return {k: torch.stack([t[k] for t in trained]) for k in self.names}
