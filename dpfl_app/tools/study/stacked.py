"""A cohort's forward pass written out on stacked weights, without `vmap`.

For the models built only of `Linear`, `Conv2d`, `ReLU`, `MaxPool2d` and
`Flatten` (the digits and MNIST models), each client's layer runs as one
batched kernel: a `Linear` as one `baddbmm` over the clients, a `Conv2d` as
one grouped convolution (groups = clients: client c's input channels meet
only client c's filters). That is the arithmetic `vmap(functional_call)`
dispatches to, without its per-call cost (swapping every parameter into the
module and flattening pytrees, a fixed 0.4-1.5 ms per step, measured with
torch 2.14 on one thread), which is most of a step for small cohorts.

The leaves are taken in registration order, which is the order the app's
models apply them (a `Linear` after a convolution flattens, as their
`forward`'s `torch.flatten(x, 1)` does). `matches` checks that assumption
numerically against the module itself; the trainer falls back to `vmap`
where it fails or where a layer is not one of the five.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

LAYERS = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten)


def stacked_layers(net: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model's leaf layers in order, or None when one is not of `LAYERS`."""
    leaves = [(name, mod) for name, mod in net.named_modules() if not list(mod.children())]
    if not all(isinstance(mod, LAYERS) for _, mod in leaves):
        return None
    if any(isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros")
           for _, mod in leaves):
        return None
    return leaves


def stacked_forward(layers, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits, clients x batch x classes, of each client's weights (`params`, stacked along
    a first axis) on its own batch (`x`: clients x batch x ...)."""
    clients, batch = x.shape[:2]
    images = False  # True while x is batch x (clients * channels) x height x width
    for name, mod in layers:
        if isinstance(mod, nn.Conv2d):
            if not images:
                x = x.transpose(0, 1).reshape(batch, -1, *x.shape[-2:])
                images = True
            weight = params[name + ".weight"]
            bias = params.get(name + ".bias")
            x = F.conv2d(x, weight.reshape(-1, *weight.shape[2:]),
                         None if bias is None else bias.reshape(-1),
                         mod.stride, mod.padding, mod.dilation, clients)
        elif isinstance(mod, nn.MaxPool2d):
            x = F.max_pool2d(x, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                             mod.ceil_mode)
        elif isinstance(mod, nn.ReLU):
            x = F.relu(x)
        else:  # Flatten, or a Linear, which sees its input flattened
            x = x.reshape(batch, clients, -1).transpose(0, 1) if images else \
                x.reshape(clients, batch, -1)
            images = False
            if isinstance(mod, nn.Linear):
                weight = params[name + ".weight"].transpose(1, 2)
                bias = params.get(name + ".bias")
                x = torch.bmm(x, weight) if bias is None else \
                    torch.baddbmm(bias.unsqueeze(1), x, weight)
    if images:
        x = x.reshape(batch, clients, -1).transpose(0, 1)
    return x


@torch.no_grad()
def matches(net: nn.Module, layers, images: torch.Tensor) -> bool:
    """Whether `stacked_forward` of two perturbed copies of `net` gives each copy's own
    logits on `images` (one example set, shared by both)."""
    state = net.state_dict()
    generator = torch.Generator().manual_seed(0)
    copies = [{k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
              for _ in range(2)]
    stacked = {k: torch.stack([c[k] for c in copies]) for k in state}
    try:
        got = stacked_forward(layers, stacked, torch.stack([images, images]))
    except RuntimeError:  # shapes that do not chain: not the forward's order
        return False
    want = [torch.func.functional_call(net, c, (images,)) for c in copies]
    return all(g.shape == w.shape and torch.allclose(g, w, rtol=1e-4, atol=1e-5)
               for g, w in zip(got, want))
