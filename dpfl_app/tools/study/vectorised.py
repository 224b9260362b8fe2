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

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.utils.rnn import pad_sequence

from dpfl_app.data.datasets import Tensors, loader
from dpfl_app.task import MOMENTUM, train
from dpfl_app.tools.study.stacked import matches, stacked_forward, stacked_layers

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
        self.layers = stacked_layers(net) if vectorised else None  # None: vmap's forward
        self._checked = False  # stacked_forward checked against the module on real inputs

    def warm_up(self, data: Tensors) -> None:
        """One throwaway step on one example: the process's first batched call imports
        and builds what later calls reuse (about 1.6 s with torch 2.14), so a run pays
        it in its set-up, not in its first round."""
        state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.train(state, [Tensors(data.images[:1], data.labels[:1])], 1, 1, 0.0, 0)

    def train(self, global_state: dict[str, torch.Tensor], datasets: list[Tensors],
              epochs: int, batch_size: int, lr: float, seed: int) -> dict[str, torch.Tensor]:
        """Each client's weights after local training, stacked along a first axis."""
        if not self.vectorised:
            return self._train_each(global_state, datasets, epochs, batch_size, lr, seed)
        if not self._checked and self.layers is not None:
            if not matches(self.net, self.layers, datasets[0].images[:3]):
                self.layers = None  # the leaves are not applied in order: keep vmap's
            self._checked = True
        sizes = sorted({len(d.labels) for d in datasets})
        orders = [batch_order(size, batch_size, epochs, seed) for size in sizes]
        if len(sizes) == 1:  # every client holds as many examples: one batch order
            images = torch.stack([d.images for d in datasets])  # clients x examples x ...
            labels = torch.stack([d.labels for d in datasets])
            return self._train_stacked(global_state, images, labels, [
                (images[:, batch], labels[:, batch], None, None) for batch in orders[0]], lr)
        return self._train_stacked(global_state, None, None,
                                   _padded_steps(datasets, sizes, orders), lr)

    def _train_stacked(self, global_state, images, labels, steps, lr):
        """Momentum SGD on stacked weights; each step is (images, labels, weight, active).

        `weight` (clients x batch) is 1/b on a client's b real examples and 0 on
        padding; `active` marks the clients that still have a batch at this step
        (a client with fewer examples stops earlier, its weights and momentum kept).
        """
        count = next(iter(steps))[0].shape[0] if steps else 0
        params = {k: v.detach().unsqueeze(0).repeat(count, *[1] * v.dim()).requires_grad_()
                  for k, v in global_state.items()}
        velocity = [torch.zeros_like(v) for v in params.values()]
        for x, y, weight, active in steps:
            logits = (self._logits(params, x) if self.layers is None  # clients x batch x classes
                      else stacked_forward(self.layers, params, x))
            if weight is None:  # the sum over clients of each one's mean loss
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                                   reduction="sum") / y.shape[1]
            else:
                losses = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                                     reduction="none")
                loss = (losses.view_as(weight) * weight).sum()
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():  # task.sgd_step, all clients at once
                for param, buf, grad_ in zip(params.values(), velocity, grads):
                    if active is None:
                        buf.mul_(MOMENTUM).add_(grad_)
                        param.add_(buf, alpha=-lr)
                    else:
                        mask = active.view(-1, *[1] * (buf.dim() - 1))
                        buf.copy_(torch.where(mask, buf * MOMENTUM + grad_, buf))
                        param.sub_(torch.where(mask, buf * lr, 0.0))
        return {k: v.detach() for k, v in params.items()}

    def _train_each(self, global_state, datasets, epochs, batch_size, lr, seed):
        trained = []
        for data in datasets:
            self.net.load_state_dict(global_state)
            train(self.net, loader(data, batch_size, shuffle=True, seed=seed), epochs, lr,
                  device="cpu")
            trained.append({k: v.detach().clone() for k, v in self.net.state_dict().items()})
        return {k: torch.stack([t[k] for t in trained]) for k in self.names}


def _padded_steps(datasets: list[Tensors], sizes: list[int], orders: list[list[torch.Tensor]]):
    """The steps of clients of several sizes as one stacked batch per step.

    Each size has its own batch order (the loader's, for that many examples);
    at step k a client's batch is its size's k-th, padded to the widest with
    weight 0. One batched call per step instead of one per size.
    """
    count = len(datasets)
    images = pad_sequence([d.images for d in datasets], batch_first=True)
    labels = pad_sequence([d.labels for d in datasets], batch_first=True)
    lengths = torch.tensor([len(d.labels) for d in datasets])
    kind = torch.searchsorted(torch.tensor(sizes), lengths)  # each client's place in `sizes`
    rows = torch.arange(count).unsqueeze(1)
    steps = []
    for k in range(max(len(order) for order in orders)):
        batches = [order[k] if k < len(order) else torch.zeros(0, dtype=torch.long)
                   for order in orders]
        width = max(len(b) for b in batches)
        index = torch.zeros(len(sizes), width, dtype=torch.long)
        weight = torch.zeros(len(sizes), width)
        for row, batch in enumerate(batches):
            index[row, :len(batch)] = batch
            weight[row, :len(batch)] = 1.0 / max(len(batch), 1)
        picked = index[kind]
        active = torch.tensor([len(b) > 0 for b in batches])[kind]
        steps.append((images[rows, picked], labels[rows, picked], weight[kind],
                      None if bool(active.all()) else active))
    return steps
