"""Models, train and test: the machine-learning half of dpfl_app.

Modelled on Flower's quickstart-pytorch `task.py`; the data lives in `data.py`.
The models have no BatchNorm: its integer `num_batches_tracked` buffer would be part of the update
the clip acts on, and an integer cannot be clipped or noised (Andrew et al. 2021 clip
the whole float update), so every array of every model is float.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class DigitsLinear(nn.Module):
    """Multinomial logistic regression on 8x8 digits: 650 weights.

    The default for digits: at the default's z = 0.3 and m = 6 the noise on the
    mean update has norm about z*C/m*sqrt(d), so a quarter of the MLP's weights
    halves the noise against the (clipped) signal (docs/results.md).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsMLP(nn.Module):
    """Small MLP for 8x8 grey digits: 2,410 weights (the recipes' model)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 grey digits (sklearn `load_digits`)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16x4x4
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32x2x2
        )
        self.classifier = nn.Linear(32 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MnistCNN(nn.Module):
    """A small CNN for 28x28 grey images (MNIST, Fashion-MNIST)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),  # 16x12x12
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),  # 32x4x4
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class LeNet(nn.Module):
    """LeNet-5 (LeCun et al. 1998) for 32x32 colour images (CIFAR-10), with GroupNorm."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.GroupNorm(2, 6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


MODELS = {"digits-linear": DigitsLinear, "digits-mlp": DigitsMLP, "digits-cnn": DigitsCNN,
          "mnist-cnn": MnistCNN, "lenet": LeNet}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Instantiate a model of the registry by name."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is unknown; allowed: {', '.join(MODELS)}")
    return MODELS[name](num_classes)


MOMENTUM = 0.9


def sgd_step(params: list[torch.Tensor], velocity: list[torch.Tensor], lr: float) -> None:
    """One step of `torch.optim.SGD(lr=lr, momentum=MOMENTUM)`, written out.

    torch.optim imports torch._dynamo on first use. Measured on torch 2.14.1
    (2-core machine, CPU seconds of a fresh process, 3 runs each): `import
    torch` 3.2-3.6 s; the first two `torch.optim.SGD` steps add 2.5-3.0 s;
    these two written-out steps add 0.001 s. A deployed ClientApp starts a
    fresh process per message and would pay that every time, so we keep this. Same arithmetic, in the same order, as
    torch.optim.SGD's for-loop path (no dampening, Nesterov or weight decay;
    a zero initial velocity equals its first-step copy of the gradient), which
    tests/tools/test_bench.py checks bit for bit.
    """
    with torch.no_grad():
        for param, buf in zip(params, velocity):
            if param.grad is not None:
                buf.mul_(MOMENTUM).add_(param.grad)
                param.add_(buf, alpha=-lr)


def train(
    net: nn.Module, loader: DataLoader, epochs: int, lr: float, device=DEVICE
) -> float:
    """Local SGD with momentum on the client's own data; returns the mean training loss."""
    net.to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]
    velocity = [torch.zeros_like(p) for p in params]
    criterion = nn.CrossEntropyLoss()
    total_loss, batches = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            net.zero_grad(set_to_none=True)
            loss = criterion(net(images), labels)
            loss.backward()
            sgd_step(params, velocity, lr)
            total_loss += loss.item()
            batches += 1
    return total_loss / max(batches, 1)


def test(net: nn.Module, loader: DataLoader, device=DEVICE) -> tuple[float, float]:
    """Mean loss and accuracy of `net` on `loader`."""
    net.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (outputs.argmax(1) == labels).sum().item()
            total += labels.size(0)
    return loss / max(total, 1), correct / max(total, 1)
