"""Server optimizers: how the global model steps along the released noised mean.

The noised mean update is the mechanism's output (privacy/mechanism.py); what
the server does with it afterwards is post-processing and costs no privacy,
so any optimizer may consume it, and its state may be saved in checkpoints.
The optimizers are torch.optim's, fed the pseudo-gradient -mean (Reddi et al.
2021, "Adaptive Federated Optimization", Algorithm 2):

- `sgd`:      w += server-lr * mean (torch.optim.SGD; bit for bit the plain
              step of `mechanism.dp_fedavg_step`, which a test checks, so the
              ServerApp takes that step and never builds this one);
- `momentum`: DP-FedAvgM (McMahan et al. 2018; Andrew et al. 2021):
              v = server-momentum * v + mean; w += server-lr * v
              (torch.optim.SGD with momentum, no dampening);
- `adam`:     FedAdam (Reddi et al. 2021): torch.optim.Adam with
              betas (server-momentum, 0.99) and eps = 1e-3, the paper's
              beta_2 and adaptivity tau.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")
# Reddi et al. 2021 (Adaptive Federated Optimization), section 5: beta_2 = 0.99
# and the adaptivity tau (Adam's eps) = 1e-3 for their FedAdam runs.
ADAM_BETA2 = 0.99
ADAM_EPS = 1e-3


class ServerOptimizer:
    """A torch.optim optimizer over the global model, stepped with -noised mean."""

    def __init__(self, name: str, like: Sequence[np.ndarray], lr: float,
                 momentum: float = 0.9) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server-optimizer={name!r} is unknown; allowed: "
                             f"{', '.join(SERVER_OPTIMIZERS)}")
        self.name = name
        self.params = [torch.nn.Parameter(torch.zeros(a.shape, dtype=torch.float32))
                       for a in like]
        if name == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                self.params, lr=lr, betas=(momentum, ADAM_BETA2), eps=ADAM_EPS)
        else:
            self.optimizer = torch.optim.SGD(
                self.params, lr=lr, momentum=momentum if name == "momentum" else 0.0)

    def step(self, global_model: Sequence[np.ndarray],
             mean_update: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The next global model: one optimizer step from `global_model`.

        The params are reset to the global model first, so the optimizer
        follows the model the server actually holds (also after a resume).
        """
        with torch.no_grad():
            for param, weights, update in zip(self.params, global_model, mean_update):
                param.copy_(torch.from_numpy(np.asarray(weights, dtype=np.float32)))
                param.grad = -torch.from_numpy(np.asarray(update, dtype=np.float32))
        self.optimizer.step()
        return [param.detach().numpy().astype(np.asarray(weights).dtype, copy=True)
                for param, weights in zip(self.params, global_model)]

    def state_dict(self) -> dict:
        """Momentum / Adam moments: functions of released values only."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
