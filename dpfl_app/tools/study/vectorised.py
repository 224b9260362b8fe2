"""A cohort's local training in one batched computation (`torch.func.vmap` over clients).

It computes what `task.train` computes for each client: the ClientApp's
loader (`data.datasets.loader`, same batch size and per-round shuffle seed),
cross-entropy, and `task.sgd_step`'s momentum SGD. Clients whose training sets
have the same size draw the same batch order (the loader's seed is the
round's), so they are stacked and stepped together: one `vmap(grad(...))`
per batch instead of one backward pass per client. Up to floating-point
summation order the result equals the sequential loop's; the engine's test
checks the accuracy against the real app.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dpfl_app.data.datasets import Tensors, loader
from dpfl_app.task import MOMENTUM, train

# Models whose forward pass vmap supports (no data-dependent control flow or
# in-place buffers); others are trained one client at a time with `task.train`.
VECTORISED_MODELS = (
    "digits-linear", "digits-mlp", "digits-cnn", "mnist-cnn", "lenet")


def batch_order(size: int, batch_size: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The index batches the ClientApp's loader yields for `size` examples, every epoch."""
    indices = torch.arange(size)
    batches = loader(Tensors(indices, indices), batch_size, shuffle=True, seed=seed)
    return [labels for _ in range(epochs) for _, labels in batches]


class CohortTrainer:
    """Trains stacked copies of one model: `train(global, datasets, ...)` -> stacked weights."""

    def __init__(self, net: nn.Module, vectorised: bool = True) -> None:
        self.net = net
        self.names = list(net.state_dict())
        trainable = [name for name, p in net.named_parameters() if p.requires_grad]
        if trainable != self.names:  # the clip acts on every array: keep them all trainable
            vectorised = False
        self.vectorised = vectorised

        def loss(params, images, labels):
            logits = functional_call(net, params, (images,))
            return nn.functional.cross_entropy(logits, labels)

        self._grads = vmap(grad(loss))

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
        params = {k: v.detach().unsqueeze(0).repeat(count, *[1] * v.dim())
                  for k, v in global_state.items()}
        velocity = {k: torch.zeros_like(v) for k, v in params.items()}
        with torch.no_grad():
            for batch in batches:
                grads = self._grads(params, images[:, batch], labels[:, batch])
                for name, param in params.items():  # task.sgd_step, all clients at once
                    velocity[name].mul_(MOMENTUM).add_(grads[name])
                    param.add_(velocity[name], alpha=-lr)
        return params

    def _train_each(self, global_state, datasets, epochs, batch_size, lr, seed):
        trained = []
        for data in datasets:
            self.net.load_state_dict(global_state)
            train(self.net, loader(data, batch_size, shuffle=True, seed=seed), epochs, lr,
                  device="cpu")
            trained.append({k: v.detach().clone() for k, v in self.net.state_dict().items()})
        return {k: torch.stack([t[k] for t in trained]) for k in self.names}
